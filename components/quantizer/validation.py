"""Constructor-time validation of the Quantizer's parameters (fail at pipeline construction,
not hours later in the executor). Messages name the parameter and the allowed values."""
from __future__ import annotations

import numbers
from typing import Any

from nano_tfx.api import ACCELERATORS, DEFAULT_CRITERION, PRECISIONS, QuantizationRequest
from nano_tfx.criterion import AccuracyCriterion

#: the engine's default, one definition (nano_tfx.api)
DEFAULT_ACCURACY_CRITERION = DEFAULT_CRITERION
# The Quantizer never blesses a model slower than the FP32 model it replaces (the Keras API's
# default is no gate; the speed-up is reported either way).
DEFAULT_MIN_SPEEDUP = 1.0


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate_accuracy_criterion(criterion: Any) -> dict | None:
    """Check the Keras API's accuracy_criterion dict (nano_tfx's own parser); plain JSON copy."""
    if criterion is None:
        return None
    parsed = AccuracyCriterion.parse(criterion)
    return parsed.to_dict()


def _engine_check(accelerator: Any, precision: str) -> None:
    """What the chosen backend can't do (precision per accelerator), before any run."""
    from nano_tfx.backends.base import backend_class

    if accelerator == "auto" or precision == "auto":  # the ladder runs what each engine has
        return
    cls = backend_class(accelerator)
    supported = dict(cls.precisions)
    if precision not in supported:
        raise ValueError(
            f"precision: accelerator={accelerator!r} supports {sorted(supported)}, got {precision!r}"
        )


def validate_parameters(
    *,
    accelerator: Any,
    precision: Any,
    accuracy_criterion: Any,
    metric: Any,
    label_key: Any,
    tuning_strategy: Any,
    max_trials: Any,
    timeout: Any,
    calibration_split: Any,
    evaluation_split: Any,
    sample_size: Any,
    batch_size: Any,
    signature_name: Any,
    min_speedup: Any = DEFAULT_MIN_SPEEDUP,
    trial_evaluation: Any = "full",
    confidence: Any = 0.99,
) -> dict:
    """Validate every parameter; return the exec-property dict (None for unset optionals)."""
    if accelerator not in ACCELERATORS:  # first: the precision checks below depend on it
        QuantizationRequest.from_kwargs(has_metric=True, accelerator=accelerator)
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    criterion = validate_accuracy_criterion(accuracy_criterion)
    for name, value in (("metric", metric), ("label_key", label_key), ("tuning_strategy", tuning_strategy)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{name}: expected a non-empty string or None, got {value!r}")
    if max_trials is not None and (not _is_int(max_trials) or max_trials < 1):
        raise ValueError(f"max_trials: expected a positive integer or None, got {max_trials!r}")
    for name, value in (
        ("calibration_split", calibration_split),
        ("evaluation_split", evaluation_split),
        ("signature_name", signature_name),
    ):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
    if not _is_int(sample_size) or sample_size < 1:
        raise ValueError(f"sample_size: expected a positive integer (calibration samples), got {sample_size!r}")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size: expected a positive integer or None, got {batch_size!r}")
    # The engine's own checks and defaults, exactly as quantize() and the callback apply them.
    request = QuantizationRequest.from_kwargs(
        has_metric=True, accelerator=accelerator, precision=precision, accuracy_criterion=accuracy_criterion,
        tuning_strategy=tuning_strategy, max_trials=max_trials,
        timeout=float(timeout) if _is_number(timeout) else timeout, batch=batch_size,
        sample_size=int(sample_size), min_speedup=min_speedup, trial_evaluation=trial_evaluation,
        confidence=confidence)
    _engine_check(accelerator, precision)
    return {
        "accelerator": accelerator,
        "precision": precision,
        "accuracy_criterion": criterion,
        "metric": metric,
        "label_key": label_key,
        "tuning_strategy": tuning_strategy,
        "max_trials": int(max_trials) if max_trials is not None else None,
        "timeout": request.timeout,
        "calibration_split": calibration_split,
        "evaluation_split": evaluation_split,
        "sample_size": int(sample_size),
        "batch_size": int(batch_size) if batch_size is not None else None,
        "signature_name": signature_name,
        "min_speedup": 0.0 if request.min_speedup is None else request.min_speedup,  # None = no gate
        "trial_evaluation": request.trial_evaluation,
        "confidence": request.confidence,
    }
