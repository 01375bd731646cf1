"""What a quantization run did: baseline, every trial, the choice. JSON, a text table, HTML."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

from nano_tfx.coverage import coverage_text, short_text
from nano_tfx.criterion import describe_criterion
from nano_tfx.speed import engine_gain_text, speed_text

TrialStatus = Literal["ok", "reused", "failed"]


@dataclass
class TrialRecord:
    index: int
    key: str
    backend: str
    precision: str
    config: dict
    metric: float | None = None
    passed: bool | None = None
    latency_ms: float | None = None  # batch 1
    latency_batch_ms: float | None = None  # at the user's evaluation batch (auto)
    batch: int | None = None
    size_bytes: int | None = None
    seconds: float = 0.0
    speedup: float | None = None  # fp32_latency_ms / latency_ms, both timed when the trial ran
    fp32_latency_ms: float | None = None  # the FP32 reference's b1 ms, timed beside this trial
    status: TrialStatus = "ok"
    error: str | None = None  # one line, when status == "failed"
    traceback: str | None = None  # the full traceback of a failed trial (for bug reports)
    output_mse: float | None = None
    worker: str | None = None
    artifact_dir: str | None = None
    evaluations: int | None = None  # metric evaluations made by this trial
    # INT8 coverage of this trial's model, counted from its graph by the backend:
    # {"MatMul": [ops in INT8, ops in all], "Conv": [...]} (nano_tfx.coverage); None: not counted
    int8_ops: dict | None = None
    # trial_evaluation='sequential': {"examples_evaluated", "n_total", "interval" [low, high] of
    # metric(INT8) - metric(FP32), "confidence", "decided": "early-pass"|"early-fail"|"full",
    # "verdict", "metric_fp32", "metric_int8" (over the examples evaluated)}; None: whole split
    sequential: dict | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "TrialRecord":
        known = {f for f in TrialRecord.__dataclass_fields__}
        data = {k: v for k, v in data.items() if k in known}
        status = str(data.get("status") or "ok")
        if status.startswith("failed") and status != "failed":  # reports written before 0.2
            data["status"], data["error"] = "failed", data.get("error") or status.partition(":")[2].strip()
        return TrialRecord(**data)


@dataclass
class Report:
    backend: str
    precision: str
    metric_name: str | None = None
    baseline: float | None = None
    criterion: dict | None = None
    strategy: str | None = None
    max_trials: int | None = None
    timeout: float | None = None
    model_fingerprint: str | None = None
    trials: list[TrialRecord] = field(default_factory=list)
    chosen: int | None = None  # index into trials
    met: bool | None = None  # None: no accuracy control
    seconds: float = 0.0
    # Speed, timed side by side in one process at the end of the call (nano_tfx.speed): the FP32
    # reference's batch-1 ms and FP32 ms ÷ the returned model's ms (> 1: the model is faster).
    fp32_latency_ms: float | None = None
    speedup: float | None = None
    min_speedup: float | None = None  # the speed gate of the call (None: no gate)
    # The returned model's engine running its own FP32 model, timed in the same run (variant
    # "<backend> fp32"), and that ms ÷ the returned model's ms: what INT8 (or BF16/FP16) adds over
    # the engine, while ``speedup`` also counts the engine's gain over TensorFlow. None: not timed.
    engine_fp32_latency_ms: float | None = None
    int8_gain: float | None = None
    side_by_side: dict | None = None  # every timed variant at batch 1 and the evaluation batch
    stop_reason: str | None = None
    # accelerator='auto': {trial index: batch-1 ms} of the finalists, re-timed side by side
    selection_latency_ms: dict | None = None
    # quantize(call_path=...): {trial index: batch-1 ms} of the finalists through the served call
    # path (what chose among them then)
    served_latency_ms: dict | None = None
    # per-layer diagnosis of the fully quantized model, worst first (nano_tfx.diagnosis rows
    # plus "backend"); filled when the default strategy needed it, or by QuantizedModel.diagnose
    layers: list[dict] = field(default_factory=list)
    # layers the chosen config keeps in FP32 and why: {"name", "backend", "reason", + its row}
    kept_fp32: list[dict] = field(default_factory=list)
    # every evaluation of the user's metric: baseline + one per trial + in-trial ones (NNCF)
    metric_evaluations: int | None = None
    # INT8 coverage of the returned model (the chosen trial's, or the model returned without
    # meeting the criterion): {"MatMul": [ops in INT8, ops in all], ...}; None: not counted
    int8_ops: dict | None = None
    # precision of the returned model (the request's may be "auto"); None: unknown
    result_precision: str | None = None
    result_backend: str | None = None  # engine of the returned model ("auto" picks one)
    # precision='auto': one row per (rung, engine) in ladder order, {"rung", "backend", "status":
    # "chosen"|"met"|"not met"|"failed"|"skipped", "reason", "trial", "latency_ms", "metric"}
    # (nano_tfx.tuning.ladder); empty for a single precision
    ladder: list[dict] = field(default_factory=list)
    # how trials were evaluated: "full" (every trial on the whole split) or "sequential" (each
    # trial's record says how many examples decided it; nano_tfx.tuning.paired_eval)
    trial_evaluation: str = "full"

    # -- access ----------------------------------------------------------------------------
    def int8_coverage_text(self) -> str | None:
        """"INT8: 2 of 2 MatMul, 2 of 2 Conv ops" for the returned model; a model with no op in
        INT8 says so: "INT8: 0 of 3 MatMul ops (the model runs in FP32)". None when not counted."""
        chosen = self.chosen_trial
        precision = self.result_precision or (chosen.precision if chosen else None) or (
            self.precision if self.precision != "auto" else None)
        return coverage_text(self.int8_ops, precision)

    def speed_summary(self) -> str:
        """"INT8 x ms vs FP32 y ms (z×)" for the returned model (batch 1, side by side), then its
        gain over the same engine's FP32 when timed ("; 1.85× the same engine's FP32 (...)")."""
        ms = self.fp32_latency_ms / self.speedup if self.fp32_latency_ms and self.speedup else None
        precision = self.result_precision or (self.precision if self.precision != "auto" else None)
        text = speed_text(precision, ms, self.fp32_latency_ms)
        if self.min_speedup:
            ok = self.speedup is not None and self.speedup >= self.min_speedup
            text += f", min_speedup={self.min_speedup:g} {'met' if ok else 'NOT met'}"
        gain = engine_gain_text(self.int8_gain, self.engine_fp32_latency_ms, self.result_backend)
        if gain:
            text += f"; {gain}"
        return text

    def ladder_summary(self) -> str | None:
        """``precision='auto'`` in one sentence: the rung that won and why each rung above it
        lost, e.g. "auto chose BF16 on openvino; above it: INT8 on openvino not met (0.91 misses
        the bound 0.93 after 4 trial(s))". None without a ladder."""
        if not self.ladder:
            return None
        won = next((r for r in self.ladder if r["status"] == "chosen"), None)
        head = (f"auto chose {won['rung'].upper()} on {won['backend']}" if won
                else "auto: no rung met the criterion")
        # rows come in ladder order: "above" is every row of a higher rung
        first = next(i for i, r in enumerate(self.ladder) if r["rung"] == won["rung"]) if won else len(self.ladder)
        above = self.ladder[:first]
        if not above:
            return head
        why = "; ".join(f"{r['rung'].upper()} on {r['backend']} {r['status']} ({r['reason']})" for r in above)
        return f"{head}; above it: {why}"

    @property
    def smoothing(self) -> str | None:
        """The SmoothQuant the chosen trial applied (None also when no trial was chosen), e.g. "SmoothQuant alpha=0.5 (INC TensorFlow
        smooth_quant recipe)"; None: no smoothing. In ``to_dict``/JSON as "smoothing"."""
        from nano_tfx.backends.base import smoothing_text

        trial = self.chosen_trial
        return None if trial is None else smoothing_text(trial.config, trial.backend)

    @property
    def chosen_trial(self) -> TrialRecord | None:
        return None if self.chosen is None else self.trials[self.chosen]

    def find(self, key: str, backend: str, precision: str) -> TrialRecord | None:
        for t in self.trials:
            if t.key == key and t.backend == backend and t.precision == precision and not t.failed:
                return t
        return None

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {**asdict(self), "smoothing": self.smoothing}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "Report":
        data = dict(data)
        trials = [TrialRecord.from_dict(t) for t in data.pop("trials", [])]
        for key in ("selection_latency_ms", "served_latency_ms"):  # JSON turned trial indices into strings
            if data.get(key):
                data[key] = {int(k): v for k, v in data[key].items()}
        known = {f for f in Report.__dataclass_fields__}
        return Report(trials=trials, **{k: v for k, v in data.items() if k in known})

    @staticmethod
    def from_json(text: str) -> "Report":
        return Report.from_dict(json.loads(text))

    @staticmethod
    def load(path: str) -> "Report":
        with open(path) as f:
            return Report.from_json(f.read())

    # -- presentation ----------------------------------------------------------------------
    _COLUMNS = ("#", "backend", "precision", "config", "metric", "passed", "latency b1 ms", "speedup", "int8 ops",
                "size KB", "seconds", "status")

    def rows(self) -> list[list[str]]:
        def fmt(v, spec="{:.4f}"):
            return "" if v is None else spec.format(v)

        out = []
        for t in self.trials:
            cfg = t.config or {}
            knobs = ",".join(f"{k}={v}" for k, v in (cfg.get("knobs") or {}).items())
            fb = cfg.get("fallback") or []
            text = knobs + (f" fp32:{len(fb)}" if fb else "")
            mark = "*" if self.chosen == t.index else ""
            out.append([
                f"{t.index}{mark}", t.backend, t.precision, text or "default", fmt(t.metric),
                "" if t.passed is None else ("yes" if t.passed else "no"),
                fmt(t.latency_ms, "{:.3f}"), fmt(t.speedup, "{:.2f}×"), short_text(t.int8_ops),
                fmt(None if t.size_bytes is None else t.size_bytes / 1024, "{:.1f}"),
                f"{t.seconds:.1f}", t.status if not t.failed else f"failed: {(t.error or '')[:120]}",
            ])
        return out

    def table(self) -> str:
        """A markdown table of the trials (``*`` marks the chosen one) with a summary line."""
        head = "| " + " | ".join(self._COLUMNS) + " |"
        sep = "|" + "|".join("---" for _ in self._COLUMNS) + "|"
        body = ["| " + " | ".join(r) + " |" for r in self.rows()]
        summary = (
            f"baseline {self.metric_name}={self.baseline:.4f}, criterion {describe_criterion(self.criterion)}, "
            if self.baseline is not None
            else ""
        ) + f"met={self.met}, trials={len(self.trials)}, {self.seconds:.1f}s; {self.speed_summary()}"
        coverage = self.int8_coverage_text()
        if coverage:
            summary += f"; {coverage}"
        if self.smoothing:
            summary += f"; {self.smoothing}"
        ladder = []
        if self.ladder:  # precision='auto': rung by rung, before the trials they ran
            ladder = ["precision ladder (rung, backend, status, why, batch-1 ms):"]
            for r in self.ladder:
                ms = f" {r['latency_ms']:.4g} ms" if r.get("latency_ms") is not None else ""
                ladder.append(f"  {r['rung']:<10} {r['backend']:<12} {r['status']:<8} {r['reason']}{ms}")
        return "\n".join([summary, *ladder, head, sep, *body])

    _LAYER_COLUMNS = ("#", "backend", "layer", "op", "metric gain in FP32", "own error", "added rel. MSE",
                      "SQNR dB", "rel. MSE", "FP32 min", "FP32 max", "max/p99.9", "max/median")

    def layer_rows(self, top: int | None = None) -> list[list[str]]:
        def f(v, spec="{:.3g}"):
            return "" if v is None else spec.format(v)

        return [
            [str(i), str(r.get("backend") or ""), str(r.get("name")), str(r.get("op") or ""),
             "rescued" if r.get("rescued") else f(r.get("metric_gain"), "{:+.4g}"),
             f(r.get("own_error")), f(r.get("added_mse")),
             f(r.get("sqnr_db"), "{:.1f}"), f(r.get("mse")), f(r.get("fp32_min")), f(r.get("fp32_max")),
             f(r.get("outlier_ratio"), "{:.1f}"), f(r.get("range_ratio"), "{:.0f}")]
            for i, r in enumerate(self.layers[:top] if top else self.layers)
        ]

    def layer_table(self, top: int | None = None) -> str:
        """A markdown table of ``layers`` (worst first)."""
        head = "| " + " | ".join(self._LAYER_COLUMNS) + " |"
        sep = "|" + "|".join("---" for _ in self._LAYER_COLUMNS) + "|"
        return "\n".join([head, sep, *("| " + " | ".join(r) + " |" for r in self.layer_rows(top))])

    def to_html(self, plot_png_base64: str | None = None, extra_sections: list[dict] | None = None) -> str:
        """The report page (``nano_tfx/report_page.py`` + template ``templates/report.html.j2``).

        ``plot_png_base64``: the plot to embed (``report_page.plot_png_base64(report)``).
        ``extra_sections``: ``[{"title": str, "rows": [(key, value)], "items": [str], "text": str,
        "columns": [str], "table": [[str]]}]`` (every key but the title optional) appended by
        callers: the TFX Quantizer adds its decision and workers there."""
        from nano_tfx import report_page

        return report_page.render(self, plot_png_base64, extra_sections)

    def plot_png(self, path: str) -> bool:
        """Latency vs metric scatter of the trials; False when nothing to plot."""
        from nano_tfx import report_page

        png = report_page.plot_png_bytes(self)
        if png is None:
            return False
        with open(path, "wb") as f:
            f.write(png)
        return True
