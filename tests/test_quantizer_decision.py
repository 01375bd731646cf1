"""The Quantizer's decision dataclass (issue 17, item 6a): ``report.json["tfx"]`` keeps its keys,
the blessing properties keep their names and types, and every verdict is worded without reprs.
Plain dataclasses: no pipeline, no quantization."""
from __future__ import annotations

import pytest

from components.quantizer.decision import QuantizerDecision, bounds_text
from nano_tfx.report import Report, TrialRecord

# Every key the executor's tfx_info dict had (tests, `nano-tfx report` and resume read them).
TFX_KEYS = {
    "fp32_model", "fp32_model_id", "signature_name", "accelerator", "precision", "beam_runner", "notes",
    "derived_signature_model", "evaluator", "metric", "baseline", "baseline_source", "value_bounds",
    "user_criterion", "effective_criterion", "calibration_sampling_seconds", "label_key", "calibration_split",
    "evaluation_split", "sample_size", "fp32_fingerprint", "request_key", "resumed_from", "trial_parallelism",
    "tuning_runner", "min_speedup", "speedup", "fp32_latency_ms", "backend", "serving_dir", "raw_parse_keys",
    "blessed", "blessing_message", "int8_metric", "seconds",
    "engine_fp32_latency_ms", "int8_gain",  # issue 20: speed vs the same engine's FP32
    "result_precision",  # issue 20: what the blessed model runs in (precision='auto' picks a rung)
    # issue 19: the sharded sequential evaluation
    "evaluation_mode", "evaluation_shards", "fp32_results", "fp32_results_dir", "evaluation_pipelines",
}
CRITERION = {"relative": 0.01, "higher_is_better": True}


def _decision(**kw) -> QuantizerDecision:
    base = dict(fp32_model="/m/Format-Serving", fp32_model_id=3, signature_name="from_transformed_features",
                accelerator=None, precision="int8", beam_runner="DirectRunner", metric="accuracy", baseline=0.97,
                baseline_source="evaluator", value_bounds={"lower_bound": 0.9, "upper_bound": None},
                user_criterion=CRITERION, effective_criterion=CRITERION, min_speedup=1.0)
    return QuantizerDecision(**dict(base, **kw))


def _report(metric: float, speedup: float, passed: bool = True) -> Report:
    return Report(backend="inc", precision="int8", metric_name="accuracy", baseline=0.97, criterion=CRITERION,
                  chosen=0 if passed else None, met=passed, fp32_latency_ms=0.5, speedup=speedup,
                  stop_reason="max_trials", trials=[TrialRecord(index=0, key="k", backend="inc", precision="int8",
                                                                config={}, metric=metric, passed=passed)])


def _no_repr(message: str) -> None:
    assert "{'" not in message and "None" not in message and "[0.9" not in message, message


def test_report_json_tfx_keeps_its_keys_and_round_trips():
    d = _decision()
    assert set(d.to_dict()) == TFX_KEYS
    assert QuantizerDecision.from_dict(dict(d.to_dict(), unknown_future_key=1)) == d


def test_blessed_verdict_and_properties():
    d = _decision()
    d.judge(_report(0.965, 3.0), met=True, speed_refused=False)
    assert d.blessed and d.int8_metric == 0.965 and d.speedup == 3.0
    assert d.blessing_message.startswith("INT8 accuracy=0.9650 vs FP32 0.9700: within the criterion "
                                         "(≤ 1 % relative drop) and the Evaluator's bounds (≥ 0.9); INT8 ")
    _no_repr(d.blessing_message)
    props = d.blessing_properties()
    assert props == {"blessed": 1, "blessing_message": d.blessing_message, "quantized_metric": 0.965,
                     "fp32_metric": 0.97, "speedup": 3.0, "fp32_latency_ms": 0.5, "precision": "int8"}
    assert all(isinstance(props[k], float) for k in ("quantized_metric", "fp32_metric", "speedup"))


def test_gain_over_the_same_engine_is_a_property_and_in_the_message():
    d = _decision()
    rep = _report(0.965, 3.0)
    rep.engine_fp32_latency_ms, rep.int8_gain, rep.result_backend = 0.3, 1.8, "inc"
    d.judge(rep, met=True, speed_refused=False)
    assert d.int8_gain == 1.8 and d.engine_fp32_latency_ms == 0.3
    props = d.blessing_properties()
    assert props["int8_gain"] == 1.8 and props["engine_fp32_latency_ms"] == 0.3
    assert "1.80× the same engine's FP32 (inc 0.300 ms)" in d.blessing_message


@pytest.mark.parametrize("metric, speedup, met, speed_refused, words", [
    (0.965, 0.5, True, False, "not 1× as fast as FP32"),
    (0.965, 0.5, False, True, "not 1× as fast as FP32"),
    (0.90, 3.0, False, False, "no trial met the criterion (≤ 1 % relative drop"),
    (0.85, 3.0, True, False, "misses the Evaluator's bounds (≥ 0.9)"),
])
def test_refusals_are_worded(metric, speedup, met, speed_refused, words):
    d = _decision()
    d.judge(_report(metric, speedup, passed=met), met=met, speed_refused=speed_refused)
    assert not d.blessed and words in d.blessing_message
    _no_repr(d.blessing_message)
    assert d.blessing_properties()["blessed"] == 0


def test_bounds_text():
    assert bounds_text(0.9, None) == "≥ 0.9" and bounds_text(None, 0.3) == "≤ 0.3"
    assert bounds_text(0.1, 0.9) == "between 0.1 and 0.9" and bounds_text(None, None) == "none"
