"""Progress: one hook shape, ``on_trial_end(record)``, for every face of the engine.

The tuner calls each hook with a trial's ``TrialRecord`` as soon as the trial is judged.
``quantize(verbose=1)``, the Keras callback and the CLI all show progress through
``ProgressLine`` (one line per trial, worded by ``trial_line``); users pass their own hooks with
``quantize(on_trial_end=...)``. The library itself never prints.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterable, TextIO

from nano_tfx.report import TrialRecord

TrialHook = Callable[[TrialRecord], None]


def trial_line(rec: TrialRecord) -> str:
    """``[backend/precision config] metric 0.9712 pass, 0.081 ms (12.30× FP32), 2.1s``."""
    cfg = rec.config or {}
    knobs = ",".join(f"{k}={v}" for k, v in (cfg.get("knobs") or {}).items()) or "default"
    fallback = cfg.get("fallback") or []
    what = f"[{rec.backend}/{rec.precision} {knobs}{f' fp32:{len(fallback)}' if fallback else ''}]"
    if rec.failed:
        status = f"failed: {(rec.error or '')[:120]}"
    elif rec.metric is not None:
        verdict = "" if rec.passed is None else (" pass" if rec.passed else " miss")
        status = f"metric {rec.metric:.4f}{verdict}"
    else:
        status = "ok"
    if rec.latency_ms is not None:
        status += f", {rec.latency_ms:.3f} ms"
        if rec.speedup is not None:
            status += f" ({rec.speedup:.2f}× FP32)"
    if rec.status == "reused":
        status += ", reused"
    return f"{what} {status}, {rec.seconds:.1f}s"


class ProgressLine:
    """An ``on_trial_end`` hook writing ``prefix + trial N[/max] + trial_line`` to ``stream``."""

    def __init__(self, stream: TextIO | Callable[[str], None] | None = None, prefix: str = "",
                 max_trials: int | None = None):
        self._write = stream if callable(stream) else None
        self.stream = None if callable(stream) else stream
        self.prefix = prefix
        self.max_trials = max_trials
        self.count = 0

    def say(self, text: str) -> None:
        """Write one line (the callback's epoch summaries use the same channel)."""
        if self._write is not None:
            self._write(text)
            return
        out = self.stream or sys.stdout
        out.write(text + "\n")
        out.flush()

    def __call__(self, rec: TrialRecord) -> None:
        self.count += 1
        total = f"/{self.max_trials}" if self.max_trials else ""
        self.say(f"{self.prefix}trial {self.count}{total} {trial_line(rec)}")


def as_hooks(on_trial_end: TrialHook | Iterable[TrialHook] | None, argument: str = "on_trial_end") -> list[TrialHook]:
    """``on_trial_end`` as a list of callables; a clear error naming the argument otherwise."""
    if on_trial_end is None:
        return []
    hooks = [on_trial_end] if callable(on_trial_end) else list(on_trial_end)
    bad = [h for h in hooks if not callable(h)]
    if bad:
        raise ValueError(f"{argument}: expected a callable taking a TrialRecord (or a list of them), got {bad[0]!r}")
    return hooks
