"""The tuning loop: propose → run trials (a ``TrialRunner``) → judge → stop.

Stops at the first batch of trials that meets the criterion, after ``max_trials`` trials, when
``timeout`` seconds have passed (checked between batches), or when the strategy runs dry.
Without an evaluator there is no search: one fully quantized trial (the seed's default).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from nano_tfx.backends.base import Candidate, SearchSpace, TrialConfig
from nano_tfx.report import Report, TrialRecord
from nano_tfx.tuning.runner import LocalRunner, TrialJob, TrialResult, TrialRunner
from nano_tfx.tuning.strategies import make_strategy

log = logging.getLogger("nano_tfx")


@dataclass
class TuneOutcome:
    chosen: TrialResult | None  # met the criterion (or the only trial without accuracy control)
    best: TrialResult | None  # best score seen (what AccuracyCriterionNotMet carries)
    candidate: Candidate | None  # live model of ``chosen`` or, failing that, of ``best``


def _score(job: TrialJob, result: TrialResult, use_mse: bool) -> float | None:
    if use_mse:
        return None if result.output_mse is None else -result.output_mse
    if result.metric is None:
        return None
    hib = job.criterion.higher_is_better if job.criterion else True
    return result.metric if hib else -result.metric


def _record(report: Report, job: TrialJob, result: TrialResult, status: str | None = None) -> TrialRecord:
    rec = TrialRecord(
        index=len(report.trials), key=result.config.key(), backend=job.backend, precision=job.precision,
        config=result.config.to_dict(), metric=result.metric, passed=result.passed,
        latency_ms=result.latency_ms, latency_batch_ms=result.latency_batch_ms, batch=job.latency_batch,
        size_bytes=result.size_bytes, seconds=round(result.seconds, 3), status=status or result.status,
        output_mse=result.output_mse, worker=result.worker, artifact_dir=result.artifact_dir,
    )
    report.trials.append(rec)
    return rec


def _reused(previous: Report | None, job: TrialJob, config: TrialConfig) -> TrialResult | None:
    """A finished trial of an earlier run of the same model and request (resume)."""
    if previous is None:
        return None
    rec = previous.find(config.key(), job.backend, job.precision)
    if rec is None or rec.metric is None and job.evaluator is not None:
        return None
    # Judge the stored metric against *today's* bar: the criterion or baseline may have changed.
    passed = rec.passed
    if rec.metric is not None and job.criterion is not None and job.baseline is not None:
        passed = job.criterion.met(job.baseline, rec.metric)
    if passed and not (rec.artifact_dir and os.path.isdir(rec.artifact_dir)):
        return None  # a winner must be re-run when its model is gone
    return TrialResult(
        config, metric=rec.metric, passed=passed, latency_ms=rec.latency_ms,
        latency_batch_ms=rec.latency_batch_ms, size_bytes=rec.size_bytes, seconds=0.0,
        status="reused", output_mse=rec.output_mse, worker=rec.worker, artifact_dir=rec.artifact_dir,
    )


def tune(
    job: TrialJob,
    space: SearchSpace,
    report: Report,
    strategy: str | None = None,
    max_trials: int | None = None,
    timeout: float = 0,
    runner: TrialRunner | None = None,
    previous: Report | None = None,
) -> TuneOutcome:
    runner = runner or LocalRunner()
    start = time.perf_counter()
    controlled = job.evaluator is not None and job.criterion is not None and job.baseline is not None
    use_mse = (strategy or "").lower() == "mse"
    job.want_mse = use_mse and job.evaluation is not None
    strat = make_strategy(strategy, space)
    limit = max_trials if controlled else 1
    history: list[tuple[TrialConfig, float | None]] = []
    best: tuple[float, TrialResult] | None = None
    chosen: TrialResult | None = None
    report.stop_reason = "search space exhausted"

    while True:
        if limit is not None and len(report.trials) >= limit:
            report.stop_reason = f"max_trials={max_trials} reached" if controlled else "no accuracy control: one trial"
            break
        if timeout and time.perf_counter() - start >= timeout:
            report.stop_reason = f"timeout={timeout}s reached"
            break
        want = runner.parallelism if limit is None else min(runner.parallelism, limit - len(report.trials))
        configs = strat.propose(history, max(1, want))
        if not configs:
            break
        results: list[TrialResult] = []
        to_run: list[TrialConfig] = []
        for cfg in configs:
            hit = _reused(previous, job, cfg)
            (results.append(hit) if hit else to_run.append(cfg))
        if to_run:
            log.info("nano-tfx: running %d %s/%s trial(s)", len(to_run), job.backend, job.precision)
            results.extend(runner.run(job, to_run))
        passing = []
        for res in results:
            _record(report, job, res)
            score = _score(job, res, use_mse)
            history.append((res.config, score))
            if score is not None and (best is None or score > best[0]):
                best = (score, res)
            ok = not res.status.startswith("failed")
            if (res.passed if controlled else ok):
                passing.append(res)
        for res in results:  # keep live models only for what may still be returned
            if res not in passing and (best is None or res is not best[1]):
                res.candidate = None
        if passing:
            chosen = min(passing, key=lambda r: (len(r.config.fallback), -(_score(job, r, False) or 0.0)))
            report.stop_reason = "criterion met" if controlled else report.stop_reason
            break

    report.seconds = round(time.perf_counter() - start, 3)
    winner = chosen or (best[1] if best else None)
    if chosen is not None:
        report.chosen = next(r.index for r in reversed(report.trials) if r.key == chosen.config.key())
    report.met = (chosen is not None) if controlled else None
    candidate = None
    if winner is not None and not winner.status.startswith("failed"):
        candidate = runner.load_candidate(job, winner) if winner.candidate is None else winner.candidate
    return TuneOutcome(chosen, best[1] if best else None, candidate)
