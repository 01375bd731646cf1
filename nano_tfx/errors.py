"""Public exceptions."""
from __future__ import annotations

from typing import Any


class AccuracyCriterionNotMet(Exception):
    """Tuning ended without a model meeting ``accuracy_criterion``.

    ``best_model`` is the best model found (a ``QuantizedModel``), ``report`` the full report.
    """

    def __init__(self, best_model: Any, report: Any):
        self.best_model = best_model
        self.report = report
        metrics = [t.metric for t in report.trials if t.metric is not None]
        hib = (report.criterion or {}).get("higher_is_better", True)
        best = (max if hib else min)(metrics) if metrics else None
        super().__init__(
            f"no quantized model met accuracy_criterion={report.criterion} "
            f"(baseline {report.metric_name}={report.baseline}); {len(report.trials)} trial(s), "
            f"stopped: {report.stop_reason}; best metric {best}"
        )


class SpeedupNotMet(AccuracyCriterionNotMet):
    """The model meets the accuracy bar but is not ``min_speedup`` times faster than FP32.

    A subclass of ``AccuracyCriterionNotMet`` so code that keeps the best model on a missed bar
    (the callback, the CLI's ``--keep-best``, the TFX Quantizer) treats both alike.
    """

    def __init__(self, best_model: Any, report: Any, min_speedup: float):
        self.best_model = best_model
        self.report = report
        self.min_speedup = min_speedup
        Exception.__init__(self, f"min_speedup={min_speedup:g} not met: {report.speed_summary()}")


class QuantizationFailed(RuntimeError):
    """No quantized model at all: the backend could not prepare the model, or every trial failed
    (conversion, calibration or run errors), so there is not even a best model to hand back.

    ``report`` holds the failed trials with their errors (what the TFX Quantizer records before
    refusing to bless). A ``RuntimeError`` subclass: code catching that keeps working.
    """

    def __init__(self, message: str, report: Any = None):
        super().__init__(message)
        self.report = report
