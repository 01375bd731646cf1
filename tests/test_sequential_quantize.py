"""``trial_evaluation='sequential'`` through ``nano_tfx.quantize`` (issue 19, in-process): FP32 once,
trials decided on as few examples as the criterion needs, the chosen model's metric on the whole
split, and the same decisions as ``trial_evaluation='full'``.

Data: the digits test images, 24 noisy copies (~12 000 labelled rows) so that a clear decision
has room to come early."""
import numpy as np
import pytest

import nano_tfx
from conftest import accuracy


@pytest.fixture(scope="module")
def big_eval(digits):
    _, (xte, yte) = digits
    rng = np.random.default_rng(7)
    xs = np.concatenate([np.clip(xte + rng.normal(0, 0.04, xte.shape), 0, 1) for _ in range(24)]).astype("float32")
    return xs, np.tile(yte, 24)


def test_a_clear_pass_is_decided_early_and_the_chosen_metric_is_the_whole_split(keras3_cnn, digits, big_eval):
    xs, ys = big_eval
    _, (xte, _) = digits
    q = nano_tfx.quantize(keras3_cnn, accelerator="onnxruntime", calib_dataset=xte[:100], eval_dataset=(xs, ys),
                          metric="accuracy", accuracy_criterion={"relative": 0.05, "higher_is_better": True},
                          trial_evaluation="sequential", batch=256, max_trials=3)
    report = q.report
    assert report.trial_evaluation == "sequential" and report.met
    chosen = report.chosen_trial
    seq = chosen.sequential
    assert seq["decided"] == "early-pass" and seq["verdict"] == "pass", seq
    assert seq["examples_evaluated"] <= 0.25 * len(ys) and seq["n_total"] == len(ys)
    low, high = seq["interval"]
    assert low <= seq["metric_int8"] - seq["metric_fp32"] <= high and seq["confidence"] == 0.99
    # the chosen model's metric (the blessing's, the bounds') is on the whole split, exactly
    assert chosen.metric == pytest.approx(accuracy(q.predict(xs, batch_size=256), ys), abs=1e-9)
    # FP32 once + the sequential look + the full-split confirmation of the chosen one
    assert chosen.evaluations == 2


def test_a_clear_fail_is_decided_early_and_agrees_with_the_full_split(planted, big_eval):
    """The planted MLP's full INT8 on OpenVINO loses ~1 point (on ONNX Runtime and INC it collapses,
    a failed trial): a 0.1 % criterion fails it, sequentially on a
    fraction of the rows, exactly like the whole split does."""
    xs, ys = big_eval
    crit = {"relative": 0.001, "higher_is_better": True}
    runs = {}
    for evaluation in ("sequential", "full"):
        with pytest.raises(nano_tfx.AccuracyCriterionNotMet) as err:
            nano_tfx.quantize(planted, accelerator="openvino", calib_dataset=(xs[:200], ys[:200]),
                              eval_dataset=(xs, ys), metric="accuracy", accuracy_criterion=crit,
                              trial_evaluation=evaluation, batch=256, max_trials=1)
        runs[evaluation] = err.value.report.trials[0]
    seq, full = runs["sequential"], runs["full"]
    assert full.sequential is None and full.passed is False
    assert seq.passed is False and seq.sequential["decided"] in ("early-fail", "full")
    # a clear fail: decided on a few hundred rows (the bar: <= 5 % of the split)
    assert seq.sequential["examples_evaluated"] <= 0.05 * len(ys), seq.sequential
    # the whole split's INT8 - FP32 difference lies in the interval the early decision read
    low, high = seq.sequential["interval"]
    baseline = err.value.report.baseline
    assert low <= full.metric - baseline <= high, (low, full.metric - baseline, high)


@pytest.fixture(scope="module")
def planted(digits):
    import os
    import sys

    import keras

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import planted as planted_models

    model, _ = planted_models.deep_mlp_with_outlier(keras, digits, depth=8, bad=6, epochs=8)
    return model


@pytest.mark.parametrize("kwargs, match", [
    (dict(trial_evaluation="fast"), r"trial_evaluation: expected one of \['full', 'sequential'\]"),
    (dict(trial_evaluation="sequential", confidence=1.0), r"confidence: expected a probability"),
    (dict(trial_evaluation="sequential", confidence=True), r"confidence: expected a probability"),
])
def test_bad_evaluation_arguments_name_themselves(keras3_cnn, digits, kwargs, match):
    _, (xte, yte) = digits
    with pytest.raises(ValueError, match=match):
        nano_tfx.quantize(keras3_cnn, calib_dataset=(xte, yte), metric="accuracy", **kwargs)


def test_a_metric_that_does_not_merge_falls_back_to_the_full_split(keras3_cnn, digits):
    _, (xte, yte) = digits
    q = nano_tfx.quantize(keras3_cnn, accelerator="onnxruntime", calib_dataset=(xte, yte),
                          metric=lambda y, p: float(np.mean(np.argmax(p, -1) == y)),
                          accuracy_criterion={"relative": 0.05, "higher_is_better": True},
                          trial_evaluation="sequential", max_trials=2)
    assert q.report.trial_evaluation == "full" and q.report.chosen_trial.sequential is None
