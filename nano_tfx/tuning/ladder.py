"""``precision='auto'``: the precision ladder, INT8 → INT8 with its fallback layers in BF16 →
BF16 → the engine's own FP32, and the fastest rung that meets the criterion is returned.

Rungs are trial jobs of the one tuner under the one budget (``max_trials``/``timeout`` cover the
whole ladder): the INT8 search of each engine in scope, one BF16 trial where the CPU and the
engine have BF16, one FP32 trial per engine (``Backend.fp32_candidate``: no quantization, the
engine's speed alone). The tuner gives each job a turn in ladder order, so the single-trial rungs
run right after INT8's first trial and the INT8 search goes on with what is left. The
INT8+BF16 rung needs INT8's result (which layers it kept in FP32), so it runs after the search:
the winning INT8 config again with the ``FALLBACK_PRECISION`` knob. Every rung that meets the
criterion is then timed side by side in one process (``nano_tfx.api._fastest``) and the fastest
wins; ``report.ladder`` says, rung by rung, which won and why each other lost or was skipped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from nano_tfx.backends.base import (
    FALLBACK_PRECISION, FP32, INT8_BF16, BackendOptions, TrialConfig, backend_class, trial_precision,
)
from nano_tfx.cpu import bf16_support
from nano_tfx.progress import TrialHook
from nano_tfx.report import Report
from nano_tfx.tuning.runner import TrialRunner
from nano_tfx.tuning.tuner import Budget, TuneOutcome, judge_speed, record_trial, reused_trial

log = logging.getLogger("nano_tfx")

#: the rungs, in ladder order (most INT8 first)
RUNGS = ("int8", INT8_BF16, "bf16", FP32)


@dataclass
class LadderPlan:
    """The (backend, precision) jobs to tune, in turn order, and the rungs skipped before any work."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def _row(rung: str, backend: str, status: str, reason: str, **extra: Any) -> dict:
    """One ``report.ladder`` row; every row has every key (a stable JSON schema)."""
    return {"rung": rung, "backend": backend, "status": status, "reason": reason, "trial": None,
            "latency_ms": None, "metric": None, **extra}


def plan_ladder(backends: Sequence[str], options: BackendOptions, approach: str, calibrated: bool) -> LadderPlan:
    """The ladder's jobs for the engines in scope: every INT8 job first (the goal), then BF16,
    then FP32; a rung the CPU or engine can't run is a skipped row with its reason."""
    plan = LadderPlan()
    bf16, why_cpu = bf16_support()
    for name in backends:
        if calibrated or approach == "dynamic":
            plan.pairs.append((name, "int8"))
        else:
            plan.skipped.append(_row("int8", name, "skipped", "static INT8 needs calibration data"))
    for name in backends:
        engine = backend_class(name)(options)
        if not bf16:
            plan.skipped.append(_row(INT8_BF16, name, "skipped", why_cpu))
            plan.skipped.append(_row("bf16", name, "skipped", why_cpu))
            continue
        why_engine = engine.bf16_fallback()
        if why_engine:
            plan.skipped.append(_row(INT8_BF16, name, "skipped", why_engine))
        if "bf16" in engine.precisions:
            plan.pairs.append((name, "bf16"))
        else:
            plan.skipped.append(_row("bf16", name, "skipped", why_engine or f"{name}: no BF16 precision"))
    plan.pairs += [(name, FP32) for name in backends]
    return plan


def bf16_fallback_rungs(outcomes: Sequence[TuneOutcome], report: Report, budget: Budget, runner: TrialRunner,
                        previous: Report | None = None, hooks: Sequence[TrialHook] = ()) -> tuple[list, list[dict]]:
    """The INT8+BF16 rung of every engine whose INT8 search met the criterion: its winning config
    with the fallback layers in BF16. Returns (outcomes that met the criterion, rows of the
    rungs that did not run or did not meet it)."""
    met, rows = [], []
    bf16, _ = bf16_support()
    for outcome in outcomes:
        job = outcome.job
        if job.precision != "int8" or not bf16:
            continue
        engine = backend_class(job.backend)(job.options)
        if engine.bf16_fallback():
            continue  # already a skipped row of the plan
        winner = outcome.chosen
        if winner is None:
            rows.append(_row(INT8_BF16, job.backend, "skipped",
                             "INT8 did not meet the criterion; BF16 in place of its FP32 layers only adds error"))
            continue
        why = engine.bf16_fallback(winner.config)
        if why:
            rows.append(_row(INT8_BF16, job.backend, "skipped", why))
            continue
        stop = budget.spent(winner.seconds, f"{job.backend} {INT8_BF16} trial")
        if stop:
            rows.append(_row(INT8_BF16, job.backend, "skipped", stop))
            continue
        config = TrialConfig.make({**dict(winner.config.knobs), FALLBACK_PRECISION: "bf16"}, winner.config.fallback)
        result = reused_trial(previous, job, config) or runner.run(job, [config])[0]
        judge_speed(job, result)
        rec = record_trial(report, job, result)
        budget.trials += 1
        for hook in hooks:
            hook(rec)
        controlled = job.evaluator is not None and job.criterion is not None and job.baseline is not None
        if not result.failed and (result.passed if controlled else True):
            candidate = result.candidate or runner.load_candidate(job, result)
            met.append(TuneOutcome(job, chosen=result, best=result, candidate=candidate, chosen_index=rec.index,
                                   best_index=rec.index, stop_reason="criterion met"))
        elif result.failed:
            rows.append(_row(INT8_BF16, job.backend, "failed", result.error or "failed", trial=rec.index))
        else:
            rows.append(_row(INT8_BF16, job.backend, "not met", _missed(report, result.metric), trial=rec.index,
                             metric=result.metric))
    return met, rows


def _missed(report: Report, metric: float | None) -> str:
    bound = None
    if report.criterion and report.baseline is not None:
        from nano_tfx.criterion import AccuracyCriterion

        bound = AccuracyCriterion.parse(report.criterion).bound(report.baseline)
    value = "no metric" if metric is None else f"{metric:.6g}"
    return f"{value} misses the bound {bound:.6g}" if bound is not None else f"{value} misses the criterion"


def _ms(report: Report, index: int | None) -> float | None:
    if index is None or not report.side_by_side:
        return None
    return (report.side_by_side.get("b1_ms") or {}).get(f"trial {index}")


def ladder_rows(report: Report, outcomes: Sequence[TuneOutcome], pick: TuneOutcome | None,
                extra_rows: Sequence[dict]) -> list[dict]:
    """``report.ladder``: one row per (rung, engine), in ladder order: status "chosen" | "met"
    (met the criterion, slower than the chosen one) | "not met" | "failed" | "skipped", with the
    reason in words, the trial index, its side-by-side batch-1 ms and its metric."""
    rows = list(extra_rows)
    pick_ms = _ms(report, pick.chosen_index) if pick is not None else None
    for o in outcomes:
        trial = o.chosen or o.best
        rung = trial_precision(o.job.precision, trial.config) if trial is not None else o.job.precision
        index = o.chosen_index if o.chosen is not None else o.best_index
        ms = _ms(report, index)
        metric = trial.metric if trial is not None else None
        extra = {"trial": index, "latency_ms": ms, "metric": metric}
        if pick is not None and o is pick:
            rows.append(_row(rung, o.job.backend, "chosen", "the fastest rung that meets the criterion", **extra))
        elif o.chosen is not None:
            if ms is None or pick_ms is None:
                slower = "meets the criterion but was not chosen"
            elif ms < pick_ms:  # a tie (nano_tfx.api.RUNG_TIE): the rung nearer FP32 was taken
                slower = (f"meets the criterion, {ms:.4g} ms vs {pick_ms:.4g} ms at batch 1: a tie, "
                          "the rung nearer FP32 was taken")
            else:
                slower = f"meets the criterion but is slower: {ms:.4g} ms vs {pick_ms:.4g} ms at batch 1"
            rows.append(_row(rung, o.job.backend, "met", slower, **extra))
        elif trial is None:  # every trial failed, or none ran (the budget ended first)
            ran = [t for t in report.trials if t.backend == o.job.backend and t.precision == rung]
            if ran:
                rows.append(_row(rung, o.job.backend, "failed", f"{len(ran)} trial(s) failed: {ran[-1].error}",
                                 **{**extra, "trial": ran[-1].index}))
            else:
                rows.append(_row(rung, o.job.backend, "skipped", o.stop_reason or "did not run", **extra))
        elif trial.failed:
            rows.append(_row(rung, o.job.backend, "failed", trial.error or o.stop_reason or "failed", **extra))
        else:
            tried = sum(1 for t in report.trials if t.backend == o.job.backend and t.precision == rung)
            why = f"{_missed(report, metric)} after {tried} trial(s)"
            if o.stop_reason and o.stop_reason not in ("search space exhausted",):
                why += f" ({o.stop_reason})"
            rows.append(_row(rung, o.job.backend, "not met", why, **extra))
    order = {r: i for i, r in enumerate(RUNGS)}
    backends = list(dict.fromkeys(o.job.backend for o in outcomes))
    return sorted(rows, key=lambda r: (order.get(r["rung"], len(order)),
                                       backends.index(r["backend"]) if r["backend"] in backends else len(backends)))
