"""Paired metric states and the sequential decision (pure numpy; no backend, no Beam)."""
import json
import math
import pickle
from statistics import NormalDist

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from nano_tfx.criterion import AccuracyCriterion
from nano_tfx.metric_states import PairedConfusion, normal_quantile, state_for
from nano_tfx.sequential import (
    SequentialDecision, SequentialRecord, allowed_difference, chunk_schedule, decide, hash_order,
    run_sequential, stable_hash,
)

Z99 = NormalDist().inv_cdf(0.995)


def binary_scores(rng, n, noise=0.01, shift=0.0):
    """Labels, FP32 scores with AUC ≈ 0.9, INT8 scores = FP32 perturbed (and optionally shifted
    toward 0.5 for positives, i.e. a worse model)."""
    y = rng.integers(0, 2, n)
    s = 1 / (1 + np.exp(-(2 * y - 1) * 1.5 - rng.normal(0, 1.2, n)))
    s8 = np.clip(s + rng.normal(0, noise, n) - shift * y, 0, 1)
    return y, s, s8


def one_pass(m, *arrays):
    return m.add(m.create(), *arrays)


# --- interval maths against a direct computation -------------------------------------------


def test_normal_quantile():
    assert normal_quantile(0.95) == pytest.approx(1.959964, abs=1e-6)
    assert normal_quantile(0.99) == pytest.approx(2.575829, abs=1e-6)
    with pytest.raises(ValueError, match="confidence"):
        normal_quantile(1.0)


def test_accuracy_interval_is_agresti_min_on_the_paired_table():
    rng = np.random.default_rng(0)
    n, classes = 80, 4
    y = rng.integers(0, classes, n)
    p32 = rng.random((n, classes))
    p8 = p32 + rng.normal(0, 0.15, (n, classes))  # enough noise for some flips both ways
    m = state_for("sparse_categorical_accuracy")
    st = one_pass(m, y, p32, p8)
    c32, c8 = p32.argmax(1) == y, p8.argmax(1) == y
    b, c = int(np.sum(c8 & ~c32)), int(np.sum(c32 & ~c8))  # discordant cells
    assert b > 0 and c > 0
    assert m.result(st) == pytest.approx((c32.mean(), c8.mean()), abs=1e-15)
    # Agresti–Min: ½ to each cell of the 2×2 table, then Wald on the difference
    n2, b2, c2 = n + 2, b + 0.5, c + 0.5
    diff = (b2 - c2) / n2
    se = math.sqrt((b2 + c2) / n2 - diff**2) / math.sqrt(n2)
    low, high = m.paired_interval(st, 0.99)
    assert (low, high) == pytest.approx((diff - Z99 * se, diff + Z99 * se), abs=1e-12)


def test_accuracy_interval_with_no_flips_is_not_zero_width():
    # a lucky first chunk without disagreement must not look certain
    y = np.arange(100) % 3
    p = np.eye(3)[y]
    m = state_for("categorical_accuracy")
    low, high = m.paired_interval(one_pass(m, p, p, p), 0.99)
    assert low == pytest.approx(-high) and high == pytest.approx(Z99 * math.sqrt(1 / 102) / math.sqrt(102))
    # standard error ≈ √(flip rate / N): 1 % flips both ways, 1e4 examples
    n = 10_000
    st = np.array([n, 9000, 9000, 0, 100.0])  # [n, Σc32, Σc8, Σd, Σd²]: 100 flips, net 0
    low, high = m.paired_interval(st, 0.99)
    assert (high - low) / 2 == pytest.approx(Z99 * math.sqrt(0.01 / n), rel=1e-2)


def test_mean_loss_interval_is_the_clt_interval_of_the_paired_differences():
    rng = np.random.default_rng(1)
    n = 50
    y = rng.normal(size=(n, 3))
    p32 = y + rng.normal(0, 0.5, (n, 3))
    p8 = p32 + rng.normal(0, 0.05, (n, 3))
    m = state_for("mse")
    st = one_pass(m, y, p32, p8)
    l32, l8 = ((y - p32) ** 2).mean(1), ((y - p8) ** 2).mean(1)
    d = l8 - l32
    assert m.result(st) == pytest.approx((l32.mean(), l8.mean()), rel=1e-12)
    se = d.std(ddof=1) / math.sqrt(n)
    assert m.paired_interval(st, 0.95) == pytest.approx(
        (d.mean() - 1.959964 * se, d.mean() + 1.959964 * se), abs=1e-6 * se)
    assert m.paired_interval(one_pass(m, y[:1], p32[:1], p8[:1])) == (-math.inf, math.inf)
    assert not m.higher_is_better and m.kind == "mean"


def direct_delong_se(y, s32, s8):
    """Textbook DeLong (1988), O(n1·n0), on the given (already bucketed) scores."""
    pos, neg = y == 1, y == 0

    def placements(s):
        x, z = s[pos][:, None], s[neg][None, :]
        psi = (x > z) + 0.5 * (x == z)
        return psi.mean(1), psi.mean(0)  # V10 per positive, V01 per negative

    v10_a, v01_a = placements(s32)
    v10_b, v01_b = placements(s8)
    var = np.var(v10_b - v10_a, ddof=1) / pos.sum() + np.var(v01_b - v01_a, ddof=1) / neg.sum()
    return math.sqrt(var)


def test_auc_bucketed_matches_exact_auc_and_delong_interval():
    rng = np.random.default_rng(2)
    y, s32, s8 = binary_scores(rng, 400, noise=0.05)
    m = state_for("auc")
    st = one_pass(m, y, s32, s8)
    auc32, auc8 = m.result(st)
    assert auc32 == pytest.approx(roc_auc_score(y, s32), abs=1e-3)
    assert auc8 == pytest.approx(roc_auc_score(y, s8), abs=1e-3)
    # with scores in [0, 1] Keras' trapezoid AUC is the Mann–Whitney AUC of the bucket indices
    b32, b8 = m._bucket(s32), m._bucket(s8)
    assert auc32 == pytest.approx(roc_auc_score(y, b32), abs=1e-12)
    se = direct_delong_se(y, b32, b8)
    assert se > 1 / (len(y) + 2)  # the floor is not what is measured here
    low, high = m.paired_interval(st, 0.99)
    assert (low + high) / 2 == pytest.approx(auc8 - auc32, abs=1e-12)
    assert (high - low) / 2 == pytest.approx(Z99 * se, rel=1e-9)
    # and close to DeLong on the raw (unbucketed) scores
    assert se == pytest.approx(direct_delong_se(y, s32, s8), rel=0.1)


def test_auc_interval_covers_the_true_difference_at_about_the_nominal_rate():
    # repeated sampling: the population difference from one large sample, then 200 small ones
    rng = np.random.default_rng(3)
    m = state_for("auc")
    shift = 0.03  # INT8 a little worse, so the true difference is not 0
    y, s32, s8 = binary_scores(rng, 200_000, noise=0.03, shift=shift)
    true_diff = roc_auc_score(y, s8) - roc_auc_score(y, s32)
    assert true_diff < -0.002
    hits, reps = 0, 200
    for _ in range(reps):
        y, s32, s8 = binary_scores(rng, 300, noise=0.03, shift=shift)
        low, high = m.paired_interval(one_pass(m, y, s32, s8), 0.9)
        hits += low <= true_diff <= high
    assert 0.8 <= hits / reps <= 0.97  # nominal 0.9; loose on both sides (200 draws, buckets)


def test_pr_auc_precision_recall_match_keras_formulas_and_intervals_are_sane():
    rng = np.random.default_rng(4)
    y, s32, s8 = binary_scores(rng, 600, noise=0.05)
    pr = PairedConfusion("pr_auc")
    st = one_pass(pr, y, s32, s8)
    from sklearn.metrics import average_precision_score
    assert pr.result(st)[0] == pytest.approx(average_precision_score(y, s32), abs=0.02)  # a different estimator
    low, high = pr.paired_interval(st, 0.99)
    diff = pr.result(st)[1] - pr.result(st)[0]
    assert low < diff < high and high - low < 0.1
    assert pr.paired_interval(st, 0.99) == (low, high)  # seeded bootstrap: deterministic
    for measure in ("precision", "recall"):
        m = PairedConfusion(measure)
        st = one_pass(m, y, s32, s8)
        tp32, tp8 = np.sum((s32 > 0.5) & (y == 1)), np.sum((s8 > 0.5) & (y == 1))
        den32 = np.sum(s32 > 0.5) if measure == "precision" else np.sum(y == 1)
        den8 = np.sum(s8 > 0.5) if measure == "precision" else np.sum(y == 1)
        assert m.result(st) == pytest.approx((tp32 / den32, tp8 / den8), abs=1e-15)
        low, high = m.paired_interval(st, 0.99)
        assert low < tp8 / den8 - tp32 / den32 < high


def test_recall_interval_is_the_delta_method_of_a_paired_proportion():
    # recall = mean over positives of "predicted positive": the delta method gives the paired
    # Wald interval over the positives (up to the n/(n-1) over all examples)
    rng = np.random.default_rng(5)
    y, s32, s8 = binary_scores(rng, 2000, noise=0.1)
    m = PairedConfusion("recall")
    st = one_pass(m, y, s32, s8)
    pos = y == 1
    d = ((s8 > 0.5) & pos).astype(float) - ((s32 > 0.5) & pos)
    n, n1 = len(y), pos.sum()
    # influence of example i on recall_int8 − recall_fp32: (d_i − Δrecall·[positive]) / n1
    psi = (d - d.sum() / n1 * pos) / n1
    se = math.sqrt(np.var(psi, ddof=1) * n)
    low, high = m.paired_interval(st, 0.99)
    assert (high - low) / 2 == pytest.approx(Z99 * se, rel=1e-9)


# --- merging ---------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["accuracy", "sparse_categorical_crossentropy", "auc", "pr_auc", "precision"])
def test_states_merged_from_shards_equal_one_pass(metric):
    rng = np.random.default_rng(6)
    n = 1000
    if metric in ("auc", "pr_auc", "precision"):
        y, p32, p8 = binary_scores(rng, n, noise=0.05)
    else:
        y = rng.integers(0, 5, n)
        p32 = rng.dirichlet(np.ones(5), n)
        p8 = np.abs(p32 + rng.normal(0, 0.02, p32.shape))
    m = state_for(metric)
    whole = one_pass(m, y, p32, p8)
    cuts = [0, 7, 250, 251, 600, n]
    shards = [one_pass(m, y[a:b], p32[a:b], p8[a:b]) for a, b in zip(cuts, cuts[1:])]
    merged = m.merge(pickle.loads(pickle.dumps(shards[::-1])))  # any order, through pickle (Beam)
    assert merged.dtype == whole.dtype and merged.shape == whole.shape
    np.testing.assert_allclose(merged, whole, rtol=1e-12, atol=1e-12)
    assert m.result(merged) == pytest.approx(m.result(whole), abs=1e-12)
    assert m.paired_interval(merged) == pytest.approx(m.paired_interval(whole), abs=1e-12)
    assert m.count(merged) == n
    pickle.loads(pickle.dumps(m))  # the metric itself travels to Beam workers


# --- state_for -------------------------------------------------------------------------------


def test_state_for_names_and_non_mergeable_metrics():
    assert state_for("accuracy").kind == "accuracy" and state_for("acc").fn == "accuracy"
    assert state_for("mse").fn == "mean_squared_error" and state_for("MAE").fn == "mean_absolute_error"
    assert state_for("auc").measure == "roc_auc" and state_for("recall").measure == "recall"
    for other in ("f1", "r2", "no_such_metric", len, lambda y, p: 0.0, object()):
        assert state_for(other) is None  # -> evaluated on the full split as today

    class TorchStyle:
        def update(self, preds, target): ...
        def compute(self): return 0.0
        def reset(self): ...
    assert state_for(TorchStyle()) is None


def test_state_for_keras_instances_agree_with_keras():
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(7)
    n, classes = 300, 5
    y = rng.integers(0, classes, n)
    p = rng.dirichlet(np.ones(classes), n).astype("float32")
    yb, sb, _ = binary_scores(rng, n)
    sb = sb.astype("float32")
    cases = [
        (keras.metrics.SparseCategoricalAccuracy(), y, p),
        (keras.metrics.SparseTopKCategoricalAccuracy(k=2), y, p),
        (keras.metrics.CategoricalAccuracy(), np.eye(classes)[y], p),
        (keras.metrics.SparseCategoricalCrossentropy(), y, p),
        (keras.metrics.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1), np.eye(classes)[y], 3 * p),
        (keras.metrics.MeanAbsoluteError(), np.eye(classes)[y], p),
        (keras.metrics.BinaryAccuracy(threshold=0.3), yb, sb),
        (keras.metrics.BinaryCrossentropy(), yb, sb),
        (keras.metrics.AUC(), yb, sb),
        (keras.metrics.AUC(curve="PR", num_thresholds=50), yb, sb),
        (keras.metrics.Precision(thresholds=0.4), yb, sb),
    ]
    for metric, y_true, y_pred in cases:
        m = state_for(metric)
        assert m is not None, metric
        metric.update_state(y_true, y_pred)
        assert m.result(one_pass(m, y_true, y_pred, y_pred))[0] == pytest.approx(
            float(metric.result()), rel=2e-6, abs=2e-6), type(metric).__name__
    assert state_for(keras.metrics.AUC(multi_label=True, num_labels=3)) is None
    assert state_for(keras.metrics.Precision(top_k=2)) is None
    assert state_for(keras.metrics.F1Score()) is None
    assert state_for(keras.metrics.RootMeanSquaredError()) is None


def test_state_for_tf_keras_and_nano_tfx_evaluators():
    tf_keras = pytest.importorskip("tf_keras")
    from nano_tfx.metrics import make_evaluator

    assert state_for(tf_keras.metrics.BinaryAccuracy(threshold=0.3)).params == {"threshold": 0.3}
    assert state_for(tf_keras.metrics.AUC(curve="PR")).measure == "pr_auc"
    assert state_for(tf_keras.metrics.SparseCategoricalAccuracy()).fn == "sparse_categorical_accuracy"
    assert state_for(make_evaluator("accuracy")).fn == "accuracy"
    assert state_for(make_evaluator("sparse_categorical_crossentropy")).fn == "sparse_categorical_crossentropy"
    assert state_for(make_evaluator(lambda y, p: 1.0)) is None
    assert state_for(make_evaluator(eval_func=lambda model: 1.0)) is None


# --- the decision rule -----------------------------------------------------------------------

ABS = AccuracyCriterion("absolute", 0.01, True)


def test_decide_touching_the_bound_is_undecided():
    edge = allowed_difference(0.9, ABS)
    assert edge == pytest.approx(-0.01, abs=2e-6)
    tiny = 1e-9
    assert decide((edge + tiny, 0.02), 0.9, ABS) == "pass"
    assert decide((edge, 0.02), 0.9, ABS) == "continue"  # touching from inside
    assert decide((-0.05, edge - tiny), 0.9, ABS) == "fail"
    assert decide((-0.05, edge), 0.9, ABS) == "continue"  # touching from outside
    assert decide((edge, edge), 0.9, ABS) == "continue"
    assert decide((-0.05, 0.02), 0.9, ABS) == "continue"  # straddles
    assert decide((-math.inf, math.inf), 0.9, ABS) == "continue"
    assert decide((math.nan, 0.0), 0.9, ABS) == "continue"


def test_decide_lower_is_better_and_relative():
    loss = AccuracyCriterion("relative", 0.05, False)  # a loss of 2.0 may rise by 0.1
    edge = allowed_difference(2.0, loss)
    assert edge == pytest.approx(0.1, abs=3e-6) and edge > 0.1
    assert decide((-0.3, edge - 1e-9), 2.0, loss) == "pass"
    assert decide((-0.3, edge), 2.0, loss) == "continue"
    assert decide((edge + 1e-9, 0.5), 2.0, loss) == "fail"
    assert decide((edge, 0.5), 2.0, loss) == "continue"
    # a relative criterion scales with |baseline|
    rel = AccuracyCriterion("relative", 0.01, True)
    assert allowed_difference(0.5, rel) == pytest.approx(-0.005, abs=2e-6)
    assert decide((-0.006, 0.0), 0.5, rel) == "continue"
    assert decide((-0.006, 0.0), 0.9, rel) == "pass"  # allowed drop 0.009 there
    # improvements always pass, whatever the direction of "better"
    assert decide((0.01, 0.02), 0.9, ABS) == "pass" and decide((-0.2, -0.1), 2.0, loss) == "pass"


def test_decide_on_the_full_split_is_the_exact_rule():
    # today's rule, float tolerance included: 0.98 -> 0.97 with a 0.01 absolute drop passes
    assert decide((-1.0, 1.0), 0.98, ABS, full=True, value=0.97) == "pass"
    assert decide((-1.0, 1.0), 0.98, ABS, full=True, value=0.969) == "fail"
    with pytest.raises(ValueError, match="value"):
        decide((0.0, 0.0), 0.98, ABS, full=True)


# --- order, chunks, records ------------------------------------------------------------------


def test_chunk_schedule():
    assert chunk_schedule(3000, first=256) == [256, 512, 1024, 2048, 3000]
    assert chunk_schedule(100, first=256) == [100]
    assert chunk_schedule(10, first=1, growth=1.5) == [1, 2, 3, 5, 7, 10]
    assert len(chunk_schedule(10**6)) == 13
    for bad in (dict(n_total=0), dict(n_total=10, first=0), dict(n_total=10, growth=1.0)):
        with pytest.raises(ValueError):
            chunk_schedule(**bad)


def test_hash_order_is_fixed_and_a_permutation():
    order = hash_order(1000, seed=0)
    assert sorted(order.tolist()) == list(range(1000))
    assert order[:5].tolist() == hash_order(np.arange(1000), seed=0)[:5].tolist()
    assert order[:5].tolist() == [int(i) for i in hash_order(list(range(1000)))[:5]]
    assert hash_order(1000, seed=1)[:20].tolist() != order[:20].tolist()
    # pinned: the order must not change between versions or processes (no salted hash())
    assert stable_hash(3, seed=0).tolist() == stable_hash(np.arange(3, dtype=np.uint64)).tolist()
    assert stable_hash([b"ex1", "ex2"], seed=7).tolist() == stable_hash([b"ex1", b"ex2"], seed=7).tolist()
    assert hash_order([b"a", b"b", b"c", b"d"]).tolist() == PINNED_BYTES_ORDER
    assert order[:8].tolist() == PINNED_INDEX_ORDER


PINNED_INDEX_ORDER = [286, 250, 781, 728, 844, 509, 453, 233]  # SplitMix64, seed 0
PINNED_BYTES_ORDER = [3, 0, 1, 2]  # keyed BLAKE2b, seed 0


def test_record_round_trips_through_strict_json():
    rec = SequentialRecord(4096, (-0.004, 0.002), "early-pass", 0.99, "pass", 10**6, 0.95, 0.949)
    assert SequentialRecord.from_dict(json.loads(json.dumps(rec.to_dict(), allow_nan=False))) == rec
    open_ = SequentialRecord(1, (-math.inf, math.inf), "full", 0.99, "fail", 1)
    d = json.loads(json.dumps(open_.to_dict(), allow_nan=False))
    assert d["interval"] == [None, None] and SequentialRecord.from_dict(d) == open_


# --- simulation ------------------------------------------------------------------------------


def simulated_chunks(n_total, flip_rate, int8_accuracy=None, seed=0):
    """Binary-classification chunks in schedule order, generated lazily (1e6 examples are never
    all built): FP32 right 95 % of the time; INT8 flips a prediction with `flip_rate`, half of the
    flips each way (no net drop) — or is a collapsed model right `int8_accuracy` of the time."""
    rng = np.random.default_rng(seed)
    start = 0
    for end in chunk_schedule(n_total):
        k = end - start
        y = rng.integers(0, 2, k)
        right32 = rng.random(k) < 0.95
        if int8_accuracy is None:
            # as many right→wrong flips as wrong→right ones: no net change
            r = rng.random(k)
            down, up = r < flip_rate / 2, (r >= flip_rate / 2) & (r < flip_rate)
            right32 = np.where(down, True, np.where(up, False, right32))
            right8 = np.where(down, False, np.where(up, True, right32))
        else:
            right8 = rng.random(k) < int8_accuracy
        p32 = np.where(right32, y, 1 - y) * 0.8 + 0.1
        p8 = np.where(right8, y, 1 - y) * 0.8 + 0.1
        yield y, p32, p8
        start = end


def test_simulation_small_flip_rate_passes_early_and_collapse_fails_fast():
    m = state_for("binary_accuracy")
    n = 10**6
    decision = SequentialDecision(ABS, baseline=0.95, confidence=0.99)
    rec, _ = run_sequential(m, simulated_chunks(n, flip_rate=0.01), decision, n_total=n)
    assert rec.decided == "early-pass" and rec.verdict == "pass"
    assert rec.examples_evaluated <= 8192  # ≈ z²·flip/δ² ≈ 700 needed; of 1e6
    assert rec.interval[0] > -0.01 and rec.n_total == n
    rec, _ = run_sequential(m, simulated_chunks(n, 0.0, int8_accuracy=0.1), decision, n_total=n)
    assert rec.decided == "early-fail" and rec.verdict == "fail"
    assert rec.examples_evaluated <= 512 and rec.interval[1] < -0.01


def test_simulation_on_the_edge_goes_to_the_full_split_and_decides_exactly():
    # INT8 exactly as good: a 0-drop criterion can never be passed early, only on the full split
    m = state_for("binary_accuracy")
    zero = AccuracyCriterion("absolute", 0.0, True)
    n = 5000
    baseline = m.result(m.merge(one_pass(m, *c) for c in simulated_chunks(n, 0.0)))[0]  # FP32, full split
    rec, st = run_sequential(m, simulated_chunks(n, flip_rate=0.0), SequentialDecision(zero, baseline), n_total=n)
    assert rec.decided == "full" and rec.examples_evaluated == n and rec.verdict == "pass"
    assert m.result(st)[0] == m.result(st)[1]
    with pytest.raises(ValueError, match="ended after"):
        run_sequential(m, [(np.ones(3), np.ones(3), np.ones(3))], SequentialDecision(zero, 0.95), n_total=10)
