"""Side-by-side timer (``nano_tfx.speed``): interleaved, budgeted, ratios that hold under noise."""
from __future__ import annotations

import time

import numpy as np
import pytest

from nano_tfx.speed import side_by_side, wake_calls


def _busy(ms_per_row: float):
    """A call costing ``ms_per_row`` per input row, spent on the CPU (like an engine)."""
    def run(inputs):
        end = time.perf_counter() + ms_per_row * len(inputs[0]) / 1000.0
        while time.perf_counter() < end:
            pass
        return [inputs[0]]
    return run


def test_ratios_batches_and_budget():
    x = [np.zeros((8, 3), np.float32)]
    start = time.perf_counter()
    res = side_by_side({"slow": _busy(0.6), "fast": _busy(0.2)}, x, batch=4, budget_s=1.0)
    took = time.perf_counter() - start
    assert res.fastest() == "fast"
    # Busy calls end at a wall-clock deadline: a descheduled call only runs late, never early.
    assert 2.0 <= res.speedup("slow", "fast") <= 4.5
    assert res.b1_ms["fast"] >= 0.2 and res.b1_ms["slow"] >= 0.6
    assert res.batch == 4 and res.batch_ms["slow"] >= 2.4 and res.batch_ms["slow"] > 2 * res.batch_ms["fast"]
    assert res.rounds >= 3 and min(res.calls.values()) >= 3
    assert took < 3.0  # the budget (plus warm-up and settle pauses) bounds the wall time
    assert set(res.to_dict()["b1_ms"]) == {"slow", "fast"}


def test_wake_calls_rewarm_a_slot_without_eating_a_slow_models_budget():
    # a slot of one slow call (BERT-base at batch 1) keeps one wake-up; a millisecond model's slot
    # of 9+ calls gets 3, so the cold calls after another engine ran are not measured
    assert [wake_calls(n) for n in (1, 2, 5, 9, 100)] == [1, 1, 1, 3, 3]


@pytest.mark.parametrize("kwargs, match", [
    (dict(runs={}), "runs: expected at least one"),
    (dict(budget_s=0), "budget_s: expected seconds > 0"),
    (dict(budget_s=True), "budget_s: expected seconds > 0"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    args = dict(runs={"a": _busy(0.01)}, inputs=[np.zeros((1, 1))])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        side_by_side(**args)


# -- through nano_tfx.quantize ---------------------------------------------------------------
def test_api_report_has_speed_and_the_gate_refuses_a_slow_model(keras3_cnn, digits):
    """Speed is always reported; an unreachable min_speedup fails even accurate trials."""
    import nano_tfx

    _, (xte, yte) = digits
    q = nano_tfx.quantize(keras3_cnn, accelerator="onnxruntime", calib_dataset=xte[:64])
    rep = q.report
    assert rep.fp32_latency_ms > 0 and rep.speedup > 0 and rep.min_speedup is None
    assert rep.trials[0].speedup > 0  # timed beside FP32 in the trial's process
    # the engine's own FP32 model is timed in the same run ("onnxruntime fp32": int8_gain)
    assert set(rep.side_by_side["b1_ms"]) == {"fp32", "trial 0", "onnxruntime fp32"}
    assert rep.side_by_side["batch"] == 32
    assert rep.engine_fp32_latency_ms > 0 and rep.int8_gain > 0 and rep.result_backend == "onnxruntime"
    # Stored at full precision: every stored ratio is recomputable from stored times, on any CPU
    # (rounded ms made this fail at ~0.02 ms per call).
    again = nano_tfx.Report.from_json(rep.to_json())
    for r in (rep, again):
        assert r.fp32_latency_ms == r.side_by_side["b1_ms"]["fp32"]
        assert r.speedup == pytest.approx(r.side_by_side["b1_ms"]["fp32"] / r.side_by_side["b1_ms"]["trial 0"], rel=1e-9)
        assert r.engine_fp32_latency_ms == r.side_by_side["b1_ms"]["onnxruntime fp32"]
        assert r.int8_gain == pytest.approx(
            r.side_by_side["b1_ms"]["onnxruntime fp32"] / r.side_by_side["b1_ms"]["trial 0"], rel=1e-9)
        t = r.trials[0]
        assert t.speedup == pytest.approx(t.fp32_latency_ms / t.latency_ms, rel=1e-9)
    assert "ms vs FP32" in rep.table().splitlines()[0]
    assert "× the same engine's FP32 (onnxruntime " in rep.table().splitlines()[0]
    assert again.int8_gain == rep.int8_gain and again.engine_fp32_latency_ms == rep.engine_fp32_latency_ms
    assert again.speedup == rep.speedup and again.trials[0].speedup == rep.trials[0].speedup

    with pytest.raises(nano_tfx.SpeedupNotMet, match=r"min_speedup=1e\+06 not met: INT8 .* ms vs FP32 .* ms") as info:
        nano_tfx.quantize(keras3_cnn, accelerator="onnxruntime", calib_dataset=(xte[:64], yte[:64]),
                          metric="sparse_categorical_accuracy", accuracy_criterion={"absolute": 0.2},
                          max_trials=2, min_speedup=1e6)
    err = info.value
    assert isinstance(err, nano_tfx.AccuracyCriterionNotMet) and err.best_model is not None
    assert err.report.met is False and err.report.chosen is None and len(err.report.trials) == 2
    # Accurate enough, but slower than the bar: no trial passes.
    assert all(t.metric >= err.report.baseline - 0.2 and t.passed is False for t in err.report.trials)


@pytest.mark.parametrize("bad", [float("nan"), -1.0, True, "2", float("inf")])
def test_min_speedup_is_checked_before_any_work(keras3_cnn, bad):
    import nano_tfx

    with pytest.raises(ValueError, match="min_speedup: expected a finite number >= 0"):
        nano_tfx.quantize(keras3_cnn, calib_dataset=np.zeros((4, 8, 8, 1), np.float32), min_speedup=bad)


def test_report_shows_speed_in_table_html_and_plot(tmp_path):
    from nano_tfx.report import Report, TrialRecord

    rep = Report(backend="onnxruntime", precision="int8", metric_name="accuracy", baseline=0.9,
                 fp32_latency_ms=6.0, speedup=3.0, min_speedup=1.0, chosen=0,
                 trials=[TrialRecord(index=0, key="k", backend="onnxruntime", precision="int8", config={},
                                     metric=0.89, passed=True, latency_ms=2.1, speedup=2.857)])
    summary = rep.table().splitlines()[0]
    assert "INT8 2.000 ms vs FP32 6.000 ms (3.00×), min_speedup=1 met" in summary
    assert "| 2.86× |" in rep.table()
    assert "INT8 2.000 ms vs FP32 6.000 ms (3.00×)" in rep.to_html()
    assert rep.plot_png(str(tmp_path / "p.png")) and (tmp_path / "p.png").stat().st_size > 0
    # the gain over the same engine's FP32, after the speed-up over TensorFlow
    rep.engine_fp32_latency_ms, rep.int8_gain, rep.result_backend = 3.7, 3.7 / 2.0, "onnxruntime"
    assert rep.speed_summary() == ("INT8 2.000 ms vs FP32 6.000 ms (3.00×), min_speedup=1 met; "
                                   "1.85× the same engine's FP32 (onnxruntime 3.700 ms)")
    assert rep.table().splitlines()[0].endswith(rep.speed_summary())
    page = rep.to_html()
    assert "1.85× the same engine" in page and "FP32 (onnxruntime 3.700 ms)" in page
    slow = Report(backend="inc", precision="int8", fp32_latency_ms=30.2, speedup=30.2 / 33.4, min_speedup=1.0)
    assert slow.speed_summary() == "INT8 33.400 ms vs FP32 30.200 ms (0.90×), min_speedup=1 NOT met"
