"""``precision='auto'``: the precision ladder INT8 → INT8+BF16 → BF16 → FP32 (issue 20).

The model where INT8 cannot meet the bar: the planted MLP (``benchmarks/planted.py``: layer fc6
gets a 1000x outlier input channel, FP32 function unchanged) with ``max_trials=2``: the INT8
search gets one trial (full INT8, which the planted channel wrecks), the other goes to the next
rung. BF16 rungs exist only on CPUs with native BF16 (``nano_tfx.cpu``); both branches are
tested by what the CPU has and by forcing them (``NANO_TFX_BF16``).
"""
import json
import os
import sys

import numpy as np
import pytest

import nano_tfx
from nano_tfx.cpu import bf16_support
from nano_tfx.tuning.ladder import RUNGS, plan_ladder

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import planted  # noqa: E402
from outlier_encoder import smoothing_off  # noqa: E402

CRITERION = {"relative": 0.01, "higher_is_better": True}


@pytest.fixture(scope="module", autouse=True)
def _no_smoothing():
    """The planted 1000x channel is an activation outlier channel, which the default strategy's
    SmoothQuant fixes in INT8 (tests/test_smoothquant.py); the ladder needs a model INT8 can't
    serve, so these tests search the spaces without SmoothQuant."""
    with smoothing_off():
        yield


@pytest.fixture(scope="module")
def planted_mlp(digits):
    import keras

    model, _ = planted.deep_mlp_with_outlier(keras, digits, depth=8, bad=6, epochs=8)
    return model


def _lscpu_has_bf16() -> bool:
    import subprocess

    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return "avx512_bf16" in flags or "amx_bf16" in flags


def test_bf16_support_follows_the_cpu_and_can_be_forced(monkeypatch):
    monkeypatch.delenv("NANO_TFX_BF16", raising=False)
    have, why = bf16_support()
    assert have is _lscpu_has_bf16(), why
    monkeypatch.setenv("NANO_TFX_BF16", "0")
    assert bf16_support() == (False, "NANO_TFX_BF16=0")
    monkeypatch.setenv("NANO_TFX_BF16", "1")
    assert bf16_support() == (True, "NANO_TFX_BF16=1")


@pytest.mark.parametrize("forced", [None, "0", "1"])
def test_the_plan_runs_bf16_rungs_only_where_there_is_bf16(monkeypatch, forced):
    from nano_tfx.backends.base import BackendOptions

    if forced is None:
        monkeypatch.delenv("NANO_TFX_BF16", raising=False)
    else:
        monkeypatch.setenv("NANO_TFX_BF16", forced)
    have, why = bf16_support()
    plan = plan_ladder(["inc", "onnxruntime", "openvino"], BackendOptions(), "static", calibrated=True)
    rungs = [p for _, p in plan.pairs]
    # INT8 first (the goal), the FP32 rung of every engine last
    assert plan.pairs[:3] == [("inc", "int8"), ("onnxruntime", "int8"), ("openvino", "int8")]
    assert plan.pairs[-3:] == [("inc", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32")]
    skipped = {(r["rung"], r["backend"]): r["reason"] for r in plan.skipped}
    if not have:
        assert "bf16" not in rungs
        for backend in ("inc", "onnxruntime", "openvino"):
            assert skipped[("bf16", backend)] == why and skipped[("int8+bf16", backend)] == why
    else:
        # ONNX Runtime's CPU EP has no BF16 kernels: skipped with that reason, never run
        assert "CPU execution provider" in skipped[("bf16", "onnxruntime")]
        for backend in ("inc", "openvino"):  # run where the engine offers BF16, else a reason
            assert (backend, "bf16") in plan.pairs or skipped[("bf16", backend)]
        assert ("inc", "bf16") in plan.pairs  # INC's mixed precision follows nano_tfx.cpu
    assert plan_ladder(["openvino"], BackendOptions(), "static", calibrated=False).skipped[0] == {
        "rung": "int8", "backend": "openvino", "status": "skipped", "reason": "static INT8 needs calibration data",
        "trial": None, "latency_ms": None, "metric": None}


@pytest.fixture(scope="module")
def int8_refused(planted_mlp, digits):
    _, (xte, yte) = digits
    with pytest.raises(nano_tfx.AccuracyCriterionNotMet) as err:
        nano_tfx.quantize(planted_mlp, precision="int8", accelerator="openvino", calib_dataset=(xte, yte),
                          metric="accuracy", accuracy_criterion=CRITERION, max_trials=2)
    return err.value


@pytest.mark.parametrize("accelerator", ["openvino", None])
def test_auto_returns_a_faster_bf16_or_fp32_model_where_int8_cannot(planted_mlp, digits, int8_refused, accelerator,
                                                                   tmp_path):
    _, (xte, yte) = digits
    # the same bar and budget refuse INT8 (precision='int8' keeps its meaning exactly)
    assert int8_refused.report.met is False
    assert {t.precision for t in int8_refused.report.trials} == {"int8"}
    q = nano_tfx.quantize(planted_mlp, precision="auto", accelerator=accelerator, calib_dataset=(xte, yte),
                          metric="accuracy", accuracy_criterion=CRITERION, max_trials=2)
    report = q.report
    assert report.met is True and report.precision == "auto"
    assert report.result_precision in ("bf16", "fp32") and q.precision == report.result_precision
    assert report.speedup > 1.0, report.speed_summary()  # faster than TensorFlow FP32
    fp32 = planted_mlp.predict(xte, verbose=0)
    assert np.mean(np.argmax(q.predict(xte), -1) == np.argmax(fp32, -1)) > 0.98
    # the ladder: INT8's one trial missed the bar; the chosen rung says so; the budget was the budget
    # (INC's full INT8 of this model collapses: a failed trial, which is also "INT8 cannot")
    assert len(report.trials) == 2 and report.trials[0].precision == "int8" and report.trials[0].passed is not True
    rows = {(r["rung"], r["status"]) for r in report.ladder}
    assert ({("int8", "not met"), ("int8", "failed")} & rows) and (report.result_precision, "chosen") in rows
    never_ran = [r for r in report.ladder if r["trial"] is None and r["status"] != "skipped"]
    assert not never_ran, never_ran
    assert [r["rung"] for r in report.ladder] == sorted((r["rung"] for r in report.ladder), key=RUNGS.index)
    summary = report.ladder_summary()
    assert summary.startswith(f"auto chose {report.result_precision.upper()}") and "INT8 on" in summary
    assert "not met" in summary or "failed" in summary
    if not bf16_support()[0]:
        assert report.result_precision == "fp32"
        assert any(r["rung"] == "bf16" and r["status"] == "skipped" for r in report.ladder)
    # saved and loaded in the precision it runs in; the report travels in JSON
    path = str(tmp_path / "saved")
    q.save(path)
    back = nano_tfx.load(path)
    assert back.precision == q.precision and back.backend == q.backend
    np.testing.assert_allclose(back.predict(xte[:16]), q.predict(xte[:16]), rtol=1e-5, atol=1e-6)
    again = nano_tfx.Report.from_dict(json.loads(report.to_json()))
    assert again.ladder == report.ladder and again.result_precision == report.result_precision


def test_forced_without_bf16_the_ladder_ends_in_fp32(planted_mlp, digits, monkeypatch):
    monkeypatch.setenv("NANO_TFX_BF16", "0")
    _, (xte, yte) = digits
    q = nano_tfx.quantize(planted_mlp, precision="auto", accelerator="openvino", calib_dataset=(xte, yte),
                          metric="accuracy", accuracy_criterion=CRITERION, max_trials=2)
    assert q.report.result_precision == "fp32" and q.precision == "fp32"
    skipped = [r for r in q.report.ladder if r["status"] == "skipped"]
    assert {r["rung"] for r in skipped} == {"int8+bf16", "bf16"}
    assert all(r["reason"] == "NANO_TFX_BF16=0" for r in skipped)
    assert q.report.speedup > 1.0  # the engine's FP32 beats TensorFlow's


def test_int8_that_meets_with_fallback_layers_gets_a_bf16_fallback_rung(planted_mlp, digits):
    """Enough budget: INT8 meets the bar by keeping fc6 in FP32; on a BF16 CPU the same config
    with that layer in BF16 is a rung of its own (timed, chosen only if fastest)."""
    _, (xte, yte) = digits
    q = nano_tfx.quantize(planted_mlp, precision="auto", accelerator="openvino", calib_dataset=(xte, yte),
                          metric="accuracy", accuracy_criterion=CRITERION, max_trials=8)
    report = q.report
    assert report.met is True
    by_rung = {r["rung"]: r for r in report.ladder}
    assert by_rung["int8"]["status"] in ("chosen", "met"), by_rung["int8"]
    if not bf16_support()[0]:
        assert by_rung["int8+bf16"]["status"] == "skipped"
        return
    row = by_rung["int8+bf16"]
    assert row["status"] in ("chosen", "met", "not met"), row
    trial = report.trials[row["trial"]]
    int8 = report.trials[by_rung["int8"]["trial"]]
    assert trial.precision == "int8+bf16" and trial.config["knobs"]["fallback_precision"] == "bf16"
    assert trial.config["fallback"] == int8.config["fallback"]  # INT8's own FP32 layers, now in BF16
    assert trial.int8_ops == int8.int8_ops
    chosen = next(r for r in report.ladder if r["status"] == "chosen")
    assert report.result_precision == chosen["rung"]
