"""The Quantizer's decision as one dataclass: what it quantized, against which bars, and whether
it blesses the result. ``report.json["tfx"]``, the HTML's TFX sections and the ``blessing``
custom properties are all written from it, so they cannot disagree. No TFX import here: the
page can be rendered (and tested) without a pipeline.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional

from absl import logging

from nano_tfx.criterion import describe_criterion
from nano_tfx.report import Report


def _num(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def bounds_text(lower: Optional[float], upper: Optional[float]) -> str:
    """The Evaluator's value thresholds as a person reads them: "≥ 0.9", "≤ 0.3", "none"."""
    if lower is not None and upper is not None:
        return f"between {lower:.4g} and {upper:.4g}"
    if lower is not None:
        return f"≥ {lower:.4g}"
    if upper is not None:
        return f"≤ {upper:.4g}"
    return "none"


@dataclass
class QuantizerDecision:
    """One Quantizer run's decision. Field names are the keys of ``report.json["tfx"]`` (read by
    tests, ``nano-tfx report`` and resume: keep them); unset fields are written as null."""

    # the FP32 model and the request
    fp32_model: str
    fp32_model_id: int
    signature_name: str
    accelerator: Optional[str]
    precision: str
    beam_runner: str
    notes: list[str] = field(default_factory=list)
    derived_signature_model: Optional[str] = None  # the tmp copy with a derived signature
    evaluator: Optional[dict] = None  # EvaluatorInfo.to_dict()
    # the bars
    metric: Optional[str] = None
    baseline: Optional[float] = None
    baseline_source: Optional[str] = None  # "evaluator" | "fp32 run"
    value_bounds: Optional[dict] = None  # {"lower_bound": x | None, "upper_bound": y | None}
    user_criterion: Optional[dict] = None
    effective_criterion: Optional[dict] = None  # the user's, or an absolute one the Evaluator's bound tightened
    min_speedup: Optional[float] = None  # 0.0: no speed gate
    # data
    calibration_sampling_seconds: Optional[float] = None
    label_key: Optional[str] = None
    calibration_split: Optional[str] = None
    evaluation_split: Optional[str] = None
    sample_size: Optional[int] = None
    # resume
    fp32_fingerprint: Optional[str] = None
    request_key: Optional[str] = None
    resumed_from: Optional[str] = None
    # who ran the trials
    trial_parallelism: Optional[int] = None
    tuning_runner: Optional[str] = None
    # trial_evaluation='sequential': the sharded evaluator (components/quantizer/sharded_eval.py)
    evaluation_mode: Optional[str] = None  # "in-process" | "beam": where chunks of trials run
    evaluation_shards: Optional[int] = None
    fp32_results: Optional[str] = None  # "computed" | "reused" | "reused from <previous run>"
    fp32_results_dir: Optional[str] = None
    evaluation_pipelines: Optional[int] = None  # Beam pipelines the evaluation ran
    # outcome
    speedup: Optional[float] = None  # the report's side-by-side speed-up of the returned model
    fp32_latency_ms: Optional[float] = None
    engine_fp32_latency_ms: Optional[float] = None  # the returned model's engine running FP32
    int8_gain: Optional[float] = None  # engine_fp32_latency_ms ÷ the returned model's ms
    backend: Optional[str] = None
    result_precision: Optional[str] = None  # what the returned model runs in ("auto" picks a rung)
    serving_dir: Optional[str] = None
    raw_parse_keys: Optional[list] = None
    blessed: bool = False
    blessing_message: str = ""
    int8_metric: Optional[float] = None
    seconds: Optional[float] = None

    # -- the bars ------------------------------------------------------------------------------
    @property
    def bounds(self) -> tuple[Optional[float], Optional[float]]:
        b = self.value_bounds or {}
        return b.get("lower_bound"), b.get("upper_bound")

    def bounds_text(self) -> str:
        return bounds_text(*self.bounds)

    # -- the verdict ---------------------------------------------------------------------------
    def refuse(self, message: str) -> None:
        """Not blessed before any trial ran (the Evaluator's gate or bounds)."""
        self.blessed, self.blessing_message = False, message

    def judge(self, report: Report, met: bool, speed_refused: bool) -> None:
        """Bless only when every bar holds (accuracy, the Evaluator's bounds, ``min_speedup``) and
        say why in one message. ``met``: the API returned a model (no AccuracyCriterionNotMet);
        ``speed_refused``: it refused on ``min_speedup`` (SpeedupNotMet)."""
        chosen = report.chosen_trial
        value = chosen.metric if chosen else None
        if chosen is None and report.trials:
            ok = [t.metric for t in report.trials if t.metric is not None]
            if ok:
                value = (max if self.effective_criterion["higher_is_better"] else min)(ok)
        lower, upper = self.bounds
        bounds_ok = value is not None and (lower is None or value >= lower) and (upper is None or value <= upper)
        # Never bless a model slower than min_speedup × FP32 (checked here too: the blessing is ours).
        gate = self.min_speedup
        speed_ok = not gate or (report.speedup is not None and report.speedup >= gate)
        self.speedup, self.fp32_latency_ms, self.int8_metric = report.speedup, report.fp32_latency_ms, value
        self.engine_fp32_latency_ms, self.int8_gain = report.engine_fp32_latency_ms, report.int8_gain
        self.result_precision = report.result_precision or (self.precision if self.precision != "auto" else None)
        prec = (self.result_precision or "int8").upper()
        self.blessed = bool(met and bounds_ok and speed_ok)
        speed, name = report.speed_summary(), self.metric
        criterion = describe_criterion(self.user_criterion)
        if self.blessed:
            within = f"within the criterion ({criterion})"
            if lower is not None or upper is not None:
                within += f" and the Evaluator's bounds ({self.bounds_text()})"
            message = f"{prec} {name}={value:.4f} vs FP32 {report.baseline:.4f}: {within}; {speed}"
        elif not speed_ok or speed_refused:
            message = (f"{speed}: the quantized model is not {gate or 0:g}× as fast as FP32, so it is "
                       f"not blessed (accuracy {name}={_num(value)} vs FP32 {_num(report.baseline)}); "
                       "push the FP32 model instead (see README, 'When the speed gate blocks')")
        elif not met:
            message = (f"no trial met the criterion ({describe_criterion(self.effective_criterion)}; baseline "
                       f"{name}={_num(report.baseline)}); best {_num(value)}; stopped: {report.stop_reason}; {speed}")
        else:
            message = f"{prec} {name}={_num(value)} misses the Evaluator's bounds ({self.bounds_text()}); {speed}"
        # precision='auto': which rung won and why the ones above it lost
        ladder = report.ladder_summary()
        if ladder:
            message += f"; {ladder}"
        # What actually runs in INT8, in every verdict: an "INT8" model that is all FP32 says so.
        coverage = report.int8_coverage_text()
        self.blessing_message = f"{message}; {coverage}" if coverage else message

    # -- what is written from it ---------------------------------------------------------------
    def to_dict(self) -> dict:
        """``report.json["tfx"]``."""
        return asdict(self)

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "QuantizerDecision":
        """From ``report.json["tfx"]`` (e.g. to re-render an old report's page)."""
        known = {f.name for f in fields(QuantizerDecision)}
        return QuantizerDecision(**{k: v for k, v in data.items() if k in known})

    def blessing_properties(self) -> dict[str, Any]:
        """The ``blessing`` artifact's custom properties (``blessed`` is what the Pusher checks)."""
        props: dict[str, Any] = {"blessed": 1 if self.blessed else 0,
                                 "blessing_message": self.blessing_message[:2000]}
        if self.result_precision:
            props["precision"] = self.result_precision
        for key, value in (("quantized_metric", self.int8_metric), ("fp32_metric", self.baseline),
                           ("speedup", self.speedup), ("fp32_latency_ms", self.fp32_latency_ms),
                           ("engine_fp32_latency_ms", self.engine_fp32_latency_ms), ("int8_gain", self.int8_gain)):
            if value is not None:
                props[key] = float(value)
        return props

    def html_rows(self) -> list[tuple[str, str]]:
        """The "TFX decision" table: worded, rounded where a person reads it."""
        rows = [("Blessed", "yes" if self.blessed else "no"), ("Why", self.blessing_message)]
        if self.metric:
            source = {"evaluator": "the Evaluator's", "fp32 run": "measured on the evaluation split"}
            value = f"{self.metric}: INT8 {_num(self.int8_metric)} vs FP32 {_num(self.baseline)}"
            if self.baseline_source:
                value += f" (FP32: {source.get(self.baseline_source, self.baseline_source)})"
            rows.append(("Metric", value))
        if self.user_criterion is not None:
            text = describe_criterion(self.user_criterion)
            if self.effective_criterion and self.effective_criterion != self.user_criterion:
                text += (f"; tightened to {describe_criterion(self.effective_criterion)} by the "
                         "Evaluator's bound")
            rows.append(("Accuracy criterion", text))
        if self.value_bounds is not None:
            rows.append(("Evaluator's bounds", self.bounds_text()))
        if self.min_speedup is not None:
            rows.append(("Speed gate", f"≥ {self.min_speedup:g}× FP32's speed at batch 1" if self.min_speedup
                         else "off (min_speedup=0)"))
        precision = self.precision if self.precision != "auto" else f"auto → {self.result_precision or 'none'}"
        rows.append(("Backend", f"{self.backend or self.accelerator or 'inc'}, {precision}"))
        if self.tuning_runner:
            rows.append(("Trials ran", f"{self.tuning_runner} on {self.beam_runner}, "
                                       f"{self.trial_parallelism or 1} at a time"))
        if self.sample_size is not None:
            rows.append(("Data", f"calibration: {self.sample_size} records of split {self.calibration_split}; "
                                 f"evaluation: split {self.evaluation_split}; label: {self.label_key}"))
        for label, value in (("Resumed from", self.resumed_from), ("Serving model", self.serving_dir),
                             ("FP32 model", self.fp32_model)):
            if value:
                rows.append((label, value))
        if self.seconds is not None:
            rows.append(("Quantizer time", f"{self.seconds:.1f} s"))
        return rows

    def html_sections(self, report: Report) -> list[dict]:
        """``Report.to_html``'s extra sections: the decision, its notes, trials per worker."""
        sections = [{"title": "TFX decision", "rows": self.html_rows(), "items": list(self.notes)}]
        workers: dict[str, int] = {}
        for t in report.trials:
            if t.status != "reused" and t.worker:
                workers[t.worker] = workers.get(t.worker, 0) + 1
        if workers:
            sections.append({"title": "Trials per worker", "columns": ["worker", "trials"],
                             "table": [[w, str(n)] for w, n in sorted(workers.items())]})
        return sections


def report_html(report: Report, decision: QuantizerDecision) -> str:
    """``report.html``: the engine's page plus the Quantizer's decision and workers."""
    from nano_tfx import report_page

    plot = None
    try:
        plot = report_page.plot_png_base64(report)
    except Exception as err:  # noqa: BLE001 - a missing plot must not fail the component
        logging.warning("Quantizer: no plot: %s", err)
    return report.to_html(plot, extra_sections=decision.html_sections(report))
