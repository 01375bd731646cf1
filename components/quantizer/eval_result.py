"""Read the Evaluator's output: FP32 baseline, value thresholds, blessing, label key.

The Evaluator writes a TFMA EvalResult (``eval_config.json`` + ``metrics-*`` + ``validations``).
With a baseline model, metric keys carry ``model_name='candidate'`` (and ``'baseline'`` plus
``is_diff`` change metrics); without one, the candidate may be named ``''``. We read the overall
slice of the *candidate* (the non-baseline model spec), whatever it is called.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

_LOWER_IS_BETTER_HINTS = ("loss", "error", "mse", "mae", "mape", "rmse", "hinge", "crossentropy", "divergence")


@dataclass
class EvaluatorInfo:
    candidate_name: str
    label_keys: list[str]
    first_metric: Optional[str]
    first_metric_config: Optional[dict]  # {"class_name", "module", "config"} of the first metric
    metrics: dict[str, float]  # overall slice, candidate model, no sub-keys
    thresholds: dict[str, dict]  # metric name -> {"lower_bound", "upper_bound", "direction"}
    validation_ok: Optional[bool]
    uri: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def baseline(self, metric: str) -> Optional[float]:
        return self.metrics.get(metric)

    def value_bounds(self, metric: str) -> tuple[Optional[float], Optional[float]]:
        t = self.thresholds.get(metric) or {}
        return t.get("lower_bound"), t.get("upper_bound")

    def higher_is_better(self, metric: str) -> Optional[bool]:
        direction = (self.thresholds.get(metric) or {}).get("direction")
        if direction == "HIGHER_IS_BETTER":
            return True
        if direction == "LOWER_IS_BETTER":
            return False
        return None


def guess_higher_is_better(metric: str) -> bool:
    name = metric.lower()
    return not any(h in name for h in _LOWER_IS_BETTER_HINTS)


def _candidate_name(eval_config) -> str:
    names = [s.name for s in eval_config.model_specs if not s.is_baseline]
    return names[0] if names else ""


def _metric_name(metric_config) -> Optional[str]:
    from tensorflow_model_analysis.metrics import metric_specs

    try:
        return metric_specs.metric_instance(metric_config).name
    except Exception:  # noqa: BLE001 - an exotic metric we can't instantiate: no name
        return None


def _double(value) -> Optional[float]:
    if value.HasField("double_value"):
        v = value.double_value.value
        return None if math.isnan(v) else float(v)
    return None


def read_evaluation(uri: str) -> EvaluatorInfo:
    """Parse an Evaluator ``evaluation`` artifact directory."""
    import tensorflow_model_analysis as tfma
    from tensorflow_model_analysis.metrics import metric_specs
    from tensorflow_model_analysis.writers import eval_config_writer, metrics_plots_and_validations_writer

    eval_config, _, _, _ = eval_config_writer.load_eval_run(uri)
    candidate = _candidate_name(eval_config)
    baseline_names = {s.name for s in eval_config.model_specs if s.is_baseline}
    spec = next((s for s in eval_config.model_specs if not s.is_baseline), None)
    label_keys: list[str] = []
    if spec is not None:
        if spec.label_key:
            label_keys.append(spec.label_key)
        label_keys.extend(v for v in spec.label_keys.values() if v not in label_keys)

    first_name, first_cfg = None, None
    for ms in eval_config.metrics_specs:
        if ms.model_names and candidate not in ms.model_names and "" not in ms.model_names:
            continue
        for mc in ms.metrics:
            name = _metric_name(mc)
            if name:
                first_name = name
                first_cfg = {"class_name": mc.class_name, "module": mc.module, "config": mc.config}
                break
        if first_name:
            break

    thresholds: dict[str, dict] = {}
    for key, items in metric_specs.metric_thresholds_from_metrics_specs(
        eval_config.metrics_specs, eval_config=eval_config
    ).items():
        if key.sub_key or key.model_name in baseline_names or key.model_name not in (candidate, ""):
            continue
        for slice_spec, threshold in items:
            if slice_spec is not None and not (
                isinstance(slice_spec, tfma.SlicingSpec)
                and not (slice_spec.feature_keys or slice_spec.feature_values or slice_spec.slice_keys_sql)
            ):
                continue  # only the overall slice is a bar for the quantized model
            entry = thresholds.setdefault(key.name, {})
            if isinstance(threshold, tfma.GenericValueThreshold) and not key.is_diff:
                if threshold.HasField("lower_bound"):
                    entry["lower_bound"] = float(threshold.lower_bound.value)
                if threshold.HasField("upper_bound"):
                    entry["upper_bound"] = float(threshold.upper_bound.value)
            elif isinstance(threshold, tfma.GenericChangeThreshold):
                entry["direction"] = tfma.MetricDirection.Name(threshold.direction)

    metrics: dict[str, float] = {}
    by_model: dict[str, dict[str, float]] = {}
    for mfs in metrics_plots_and_validations_writer.load_and_deserialize_metrics(uri, "tfrecord"):
        if mfs.slice_key.single_slice_keys:
            continue  # overall slice only
        for kv in mfs.metric_keys_and_values:
            k = kv.key
            if k.is_diff or k.HasField("sub_key") or k.output_name or k.HasField("aggregation_type"):
                continue
            v = _double(kv.value)
            if v is not None:
                by_model.setdefault(k.model_name, {})[k.name] = v
    notes: list[str] = []
    if candidate in by_model:
        metrics = by_model[candidate]
    else:
        others = [m for m in by_model if m not in baseline_names]
        if len(others) == 1:
            metrics = by_model[others[0]]
            notes.append(f"candidate model named {others[0]!r} in metrics, {candidate!r} in eval_config")
    validation_ok: Optional[bool] = None
    try:
        validation_ok = bool(tfma.load_validation_result(uri).validation_ok)
    except Exception:  # noqa: BLE001 - no validations file (no thresholds configured)
        validation_ok = None
    return EvaluatorInfo(candidate, label_keys, first_name, first_cfg, metrics, thresholds, validation_ok, uri, notes)


def keras_metric_from_config(cfg: Optional[dict]):
    """The Evaluator's (tf_keras) metric object from its MetricConfig, or None if not Keras."""
    if not cfg or cfg.get("module"):
        return None
    import tf_keras

    cls = getattr(tf_keras.metrics, cfg["class_name"], None)
    if cls is None or not isinstance(cls, type):
        return None
    conf = {}
    if cfg.get("config"):
        text = cfg["config"].strip()
        conf = json.loads(text if text.startswith("{") else "{" + text + "}")
    try:
        return cls(**conf) if conf else cls()
    except Exception:  # noqa: BLE001
        return None
