"""One progress hook: ``on_trial_end(record)`` under ``quantize(verbose=1)``, the callback and the CLI."""
import numpy as np
import pytest

import nano_tfx
from nano_tfx.progress import ProgressLine, trial_line
from nano_tfx.report import TrialRecord


def test_verbose_prints_one_line_per_trial_through_the_hook(keras3_cnn, digits, capsys):
    _, (xte, yte) = digits
    seen = []
    q = nano_tfx.quantize(keras3_cnn, accelerator="onnxruntime", calib_dataset=(xte[:64], yte[:64]),
                          metric="accuracy", accuracy_criterion={"absolute": 0.5}, max_trials=2,
                          verbose=1, on_trial_end=seen.append)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "[onnxruntime/int8" in ln]
    assert len(lines) == len(q.report.trials) == len(seen) >= 1
    assert [r.index for r in seen] == [t.index for t in q.report.trials]
    assert lines[0].startswith("trial 1/2 [onnxruntime/int8") and "metric " in lines[0] and "× FP32" in lines[0]


def test_silent_by_default_and_bad_hooks_are_named(keras3_cnn, digits, capsys):
    _, (xte, _) = digits
    x = np.ascontiguousarray(xte[:16])
    for kwargs, match in [(dict(verbose=-1), "verbose: expected 0 or 1"),
                          (dict(verbose="yes"), "verbose: expected 0 or 1"),
                          (dict(on_trial_end=[print, 3]), "on_trial_end: expected a callable")]:
        with pytest.raises(ValueError, match=match):
            nano_tfx.quantize(keras3_cnn, accelerator="onnxruntime", calib_dataset=x, **kwargs)
    assert capsys.readouterr().out == ""


def test_trial_line_words_failures_and_reuse():
    ok = TrialRecord(index=0, key="k", backend="openvino", precision="int8",
                     config={"knobs": {"preset": "mixed"}, "fallback": ["a", "b"]}, metric=0.91234, passed=False,
                     latency_ms=0.5, speedup=4.0, seconds=2.25, status="reused")
    assert trial_line(ok) == "[openvino/int8 preset=mixed fp32:2] metric 0.9123 miss, 0.500 ms (4.00× FP32), reused, 2.2s"
    bad = TrialRecord(index=1, key="k", backend="inc", precision="int8", config={}, status="failed", error="boom")
    out = []
    ProgressLine(out.append, prefix="> ", max_trials=3)(bad)
    assert out == ["> trial 1/3 [inc/int8 default] failed: boom, 0.0s"]
