"""The tuning loop: propose → run trials (a ``TrialRunner``) → judge → stop, for one or several
backends under ONE budget.

``max_trials`` and ``timeout`` bound the whole ``quantize`` call, ``accelerator='auto'`` included:
the backends take turns (a round gives each unfinished backend one batch of trials), a backend
leaves the rotation when one of its trials meets the criterion or its strategy runs dry, and the
call stops when every backend has left, after ``max_trials`` trials in all, or at the timeout.

The timeout rule: a running trial is never interrupted, so work is only started when it is
expected to *end* before the deadline. The very first trial of the call always runs; after it, a
batch of trials does not start when its expected duration would end past the deadline, and a
backend is not prepared when its preparation plus one trial would. Expected durations come from
this call: a backend's earlier steps (trials plus the diagnosis between them); before its first
trial, the longer of its own preparation (conversion) time and the shortest step seen so far;
before preparing it, the cheapest preparation + first step of the backends already tried.
Without an evaluator there is no search: one fully quantized trial per backend (the seed's default).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

from nano_tfx.backends.base import Candidate, SearchSpace, TrialConfig, backend_class, trial_precision
from nano_tfx.diagnosis import rank_by_harm
from nano_tfx.errors import QuantizationFailed
from nano_tfx.progress import TrialHook
from nano_tfx.report import Report, TrialRecord
from nano_tfx.tuning.runner import (
    LocalRunner, TrialJob, TrialResult, TrialRunner, _backend_and_prepared, diagnose_trial,
)
from nano_tfx.tuning.strategies import Strategy, make_strategy

log = logging.getLogger("nano_tfx")


@dataclass
class Budget:
    """What one ``quantize`` call may spend: trials in all and wall seconds (0 = no limit)."""

    max_trials: int | None = None
    timeout: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    trials: int = 0

    def left(self) -> int | None:
        return None if self.max_trials is None else max(0, self.max_trials - self.trials)

    def seconds_left(self) -> float | None:
        """Seconds until the deadline (negative past it); None without a timeout."""
        return None if not self.timeout else self.started + self.timeout - time.perf_counter()

    def spent(self, expected_s: float = 0.0, what: str = "trial") -> str | None:
        """Why work expected to take ``expected_s`` seconds may not start (None while the budget
        lasts). The first trial of the call always may."""
        if self.max_trials is not None and self.trials >= self.max_trials:
            return f"max_trials={self.max_trials} reached"
        left = self.seconds_left()
        if left is None or self.trials == 0:
            return None
        if left <= 0:
            return f"timeout={self.timeout:g}s reached"
        if expected_s > left:
            return (f"timeout={self.timeout:g}s: the next {what} (~{expected_s:.1f}s expected) "
                    f"would end {expected_s - left:.1f}s past it")
        return None


@dataclass
class TuneOutcome:
    """How one (backend, precision) job ended."""

    job: TrialJob
    chosen: TrialResult | None = None  # met the criterion (or the one trial without accuracy control)
    best: TrialResult | None = None  # best score seen (what AccuracyCriterionNotMet carries)
    candidate: Candidate | None = None  # live model of ``chosen`` or, failing that, of ``best``
    chosen_index: int | None = None  # index of ``chosen`` in the report's trials
    best_index: int | None = None
    stop_reason: str | None = None


@dataclass
class _State:
    """One job while it tunes."""

    job: TrialJob
    outcome: TuneOutcome
    strategy: Strategy | None = None
    controlled: bool = False
    use_mse: bool = False
    history: list = field(default_factory=list)
    best_score: float | None = None
    trials: int = 0
    done: bool = False
    prepare_seconds: float | None = None  # backend preparation (conversion) in this call
    step_seconds: list = field(default_factory=list)  # wall time of each step: trials + diagnosis


def _expected_step_s(state: _State, states: Sequence[_State]) -> float:
    """How long this job's next step is expected to take (see the module doc)."""
    if state.step_seconds:
        return sum(state.step_seconds) / len(state.step_seconds)
    seen = [s.step_seconds[0] for s in states if s.step_seconds]
    return max(state.prepare_seconds or 0.0, min(seen, default=0.0))


def _expected_open_s(states: Sequence[_State]) -> float:
    """Preparing a backend and running its first step, from the backends already tried."""
    seen = [(s.prepare_seconds or 0.0) + s.step_seconds[0] for s in states if s.step_seconds]
    return min(seen, default=0.0)


def _score(job: TrialJob, result: TrialResult, use_mse: bool) -> float | None:
    if use_mse:
        return None if result.output_mse is None else -result.output_mse
    if result.metric is None or not math.isfinite(result.metric):
        return None
    hib = job.criterion.higher_is_better if job.criterion else True
    return result.metric if hib else -result.metric


def record_trial(report: Report, job: TrialJob, result: TrialResult) -> TrialRecord:
    """The trial as a row of ``report`` (its index is the row's)."""
    rec = TrialRecord(
        index=len(report.trials), key=result.config.key(), backend=job.backend,
        precision=trial_precision(job.precision, result.config),
        config=result.config.to_dict(), metric=result.metric, passed=result.passed,
        latency_ms=result.latency_ms, latency_batch_ms=result.latency_batch_ms, batch=job.latency_batch,
        size_bytes=result.size_bytes, seconds=result.seconds, speedup=result.speedup,
        fp32_latency_ms=result.fp32_latency_ms,
        status=result.status,  # type: ignore[arg-type]
        error=result.error, traceback=result.traceback, evaluations=result.evaluations,
        output_mse=result.output_mse, worker=result.worker, artifact_dir=result.artifact_dir,
        int8_ops=result.int8_ops, sequential=result.sequential,
    )
    report.trials.append(rec)
    return rec


def reused_trial(previous: Report | None, job: TrialJob, config: TrialConfig) -> TrialResult | None:
    """A finished trial of an earlier run of the same model and request (resume)."""
    if previous is None:
        return None
    rec = previous.find(config.key(), job.backend, trial_precision(job.precision, config))
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
        latency_batch_ms=rec.latency_batch_ms, size_bytes=rec.size_bytes, seconds=0.0, speedup=rec.speedup,
        fp32_latency_ms=rec.fp32_latency_ms,
        status="reused", output_mse=rec.output_mse, worker=rec.worker, artifact_dir=rec.artifact_dir,
        int8_ops=rec.int8_ops, sequential=rec.sequential,
    )


def judge_speed(job: TrialJob, result: TrialResult) -> None:
    """Under a per-trial speed gate a slower trial does not pass, whatever its accuracy (a
    reused trial is judged against today's gate too)."""
    if job.min_speedup and result.passed and (result.speedup is None or result.speedup < job.min_speedup):
        result.passed = False


def _open(state: _State, strategy: str | None, report: Report, strict: bool) -> bool:
    """Prepare the job's backend and its strategy. A backend that cannot do the request is an
    error when it was asked for by name (``strict``), a failed row under ``auto``."""
    job = state.job
    validated = False
    try:
        backend = backend_class(job.backend)(job.options)
        backend.validate(job.precision, job.approach)
        validated = True
        _, prepared = _backend_and_prepared(job)
        space: SearchSpace = backend.space(prepared, job.precision, job.approach)
    except Exception as err:  # noqa: BLE001 - under auto, one backend failing is a row, not a crash
        # A request the backend refuses, or a bad argument, stays the caller's error.
        if strict and (not validated or isinstance(err, (ValueError, TypeError))):
            raise
        result = TrialResult.failure(TrialConfig.make(), err)
        log.warning("nano-tfx: %s/%s cannot run: %s\n%s", job.backend, job.precision, result.error, result.traceback)
        record_trial(report, job, result)
        state.outcome.stop_reason = f"failed: {result.error}"
        state.done = True
        if strict:  # the one backend asked for cannot convert this model: no model at all
            report.stop_reason, report.met = f"failed: {result.error}", False
            raise QuantizationFailed(
                f"quantization failed ({job.backend}): cannot prepare the model: {result.error}", report) from err
        return False
    state.controlled = job.evaluator is not None and job.criterion is not None and job.baseline is not None
    state.use_mse = (strategy or "").lower() == "mse"
    job.want_mse = state.use_mse and job.evaluation is not None
    state.strategy = make_strategy(strategy, space)
    aim = getattr(state.strategy, "set_target", None)
    if aim is not None and state.controlled and not state.use_mse:
        bound = job.criterion.bound(job.baseline)
        hib = job.criterion.higher_is_better
        # in score units (higher is better); the allowed drop doubles as the noise floor of a step
        aim(bound if hib else -bound, abs(job.baseline - bound))
    return True


def _step(state: _State, report: Report, budget: Budget, runner: TrialRunner, previous: Report | None,
          hooks: Sequence[TrialHook]) -> None:
    """One batch of trials of one job: propose, run (or reuse), record, judge."""
    job, outcome = state.job, state.outcome
    want = runner.parallelism
    if not state.controlled:
        want = 1 - state.trials  # no accuracy control: one fully quantized trial
    left = budget.left()
    if left is not None:
        want = min(want, left)
    configs = state.strategy.propose(state.history, max(1, want)) if want > 0 else []
    if not configs:
        state.done = True
        outcome.stop_reason = outcome.stop_reason or (
            "search space exhausted" if state.controlled else "no accuracy control: one trial")
        return
    results: list[TrialResult] = []
    to_run: list[TrialConfig] = []
    for cfg in configs:
        hit = reused_trial(previous, job, cfg)
        (results.append(hit) if hit else to_run.append(cfg))
    if to_run:
        log.info("nano-tfx: running %d %s/%s trial(s)", len(to_run), job.backend, job.precision)
        results.extend(runner.run(job, to_run))
    passing = []
    for res in results:
        judge_speed(job, res)
        rec = record_trial(report, job, res)
        budget.trials += 1
        state.trials += 1
        score = _score(job, res, state.use_mse)
        state.history.append((res.config, score))
        if score is not None and (state.best_score is None or score > state.best_score):
            state.best_score, outcome.best, outcome.best_index = score, res, rec.index
        elif outcome.best is None and not res.failed:
            outcome.best, outcome.best_index = res, rec.index  # no metric: the only trial
        # Without accuracy control the one trial is returned; the API checks its speed side by side.
        if (res.passed if state.controlled else not res.failed):
            passing.append((res, rec.index))
        for hook in hooks:
            hook(rec)
    if state.controlled and not passing and job.precision == "int8":  # BF16/FP32 rungs: nothing to guide
        _guide(state, report, runner, results)
    for res in results:  # keep live models only for what may still be returned
        if all(res is not p for p, _ in passing) and res is not outcome.best:
            res.candidate = None
    if passing:
        outcome.chosen, outcome.chosen_index = min(
            passing, key=lambda p: (len(p[0].config.fallback), -(_score(job, p[0], False) or 0.0)))
        outcome.stop_reason = "criterion met" if state.controlled else "no accuracy control: one trial"
        state.done = True


def _guide(state: _State, report: Report, runner: TrialRunner, results: list[TrialResult]) -> None:
    """Sensitivity-guided strategies: diagnose the trial the strategy asks about (the fully
    quantized one, then the latest step that did not help) and hand it the layer ranking."""
    strat, job = state.strategy, state.job
    ask = getattr(strat, "wants_diagnosis", None)
    cfg = ask(state.history) if ask else None
    if cfg is None:
        return
    res = next((r for r in results if r.config.key() == cfg.key()), None)
    layers = None
    if res is not None and (not res.failed or res.candidate is not None):  # collapsed models too
        started = time.perf_counter()
        try:
            layers = diagnose_trial(job, res.candidate or runner.load_candidate(job, res))
            log.info("nano-tfx: %s/%s diagnosed %d layers in %.1fs; worst: %s", job.backend, job.precision,
                     len(layers), time.perf_counter() - started, [r["name"] for r in layers[:3]])
        except NotImplementedError as err:
            log.info("nano-tfx: %s/%s: no diagnosis (%s); using the backend's fallback order",
                     job.backend, job.precision, err)
        except Exception as err:  # noqa: BLE001 - a diagnosis failure must not end the search
            log.warning("nano-tfx: %s/%s diagnosis failed (%s: %s); using the backend's fallback order",
                        job.backend, job.precision, type(err).__name__, err)
    strat.set_ranking(cfg, layers)
    if layers and not any(r.get("backend") == job.backend for r in report.layers):
        report.layers.extend({**row, "backend": job.backend, "precision": job.precision} for row in layers)


def _metric_gains(state: _State) -> dict[str, tuple[float, int]]:
    """Per layer, how much moving it to FP32 raised the metric in this job's trials, NNCF-style
    ranking by measured harm: each trial whose fallback adds layers to an earlier trial's (the
    largest such one) credits them with the score difference (metric units, higher is better)
    and how many layers it added, since one step's gain is not each of its layers' (issue 17).

    A trial that scores where its parent collapsed or failed has no metric to subtract from: its
    new layers get ``math.inf`` (rescued). Left uncredited, the culprit of a collapsed full INT8
    ranked below any layer of a later step that won back a little."""
    if state.use_mse or not state.controlled:
        return {}
    trials = [(cfg.knobs, set(cfg.fallback), score) for cfg, score in state.history]
    gains: dict[str, tuple[float, int]] = {}
    for i, (knobs, fallback, score) in enumerate(trials):
        if not fallback or score is None:
            continue
        # only a parent with the same knobs isolates the layers' effect (refinements change knobs)
        parents = [(fb, sc) for kn, fb, sc in trials[:i] if kn == knobs and fb < fallback]
        scored = [p for p in parents if p[1] is not None]
        if scored:
            parent_fb, parent_score = max(scored, key=lambda p: len(p[0]))
            gain = score - parent_score
        elif parents:
            parent_fb, gain = max(parents, key=lambda p: len(p[0]))[0], math.inf
        else:
            continue
        added = fallback - parent_fb
        for name in added:
            old = gains.get(name)
            if old is None or gain / len(added) > old[0] / old[1]:
                gains[name] = (gain, len(added))
    return gains


def _gain_fields(gain: tuple[float, int]) -> dict:
    """A layer row's record of its step's measured gain (``rescued``: there was no metric to beat)."""
    value, layers = gain
    return {"rescued": True, "step_layers": layers} if math.isinf(value) else {
        "metric_gain": value, "step_layers": layers}


def _credit_gains(state: _State, report: Report, gains: dict[str, tuple[float, int]]) -> None:
    """Put the measured metric gains on this backend's layer rows and re-rank them by harm."""
    backend = state.job.backend
    mine = [r for r in report.layers if r.get("backend") == backend]
    if not gains or not mine:
        return
    for row in mine:
        if row["name"] in gains:
            row.update(_gain_fields(gains[row["name"]]))
    job = state.job
    noise = 0.0
    if job.criterion is not None and job.baseline is not None:
        # a gain within twice the drop the criterion tolerates is not evidence of harm
        noise = 2.0 * abs(job.baseline - job.criterion.bound(job.baseline))
    # One step's layers share its gain: among them the diagnosis that picked the step (the
    # strategy's order) knows the culprit, the full-INT8 one (the rows' order) may not.
    picked = {n: i for i, n in enumerate(getattr(state.strategy, "picked", ()))}
    mine.sort(key=lambda r: picked.get(r["name"], len(picked)))
    ranked = iter(rank_by_harm(mine, noise))
    report.layers[:] = [next(ranked) if r.get("backend") == backend else r for r in report.layers]


def _kept_fp32(state: _State, gains: dict[str, tuple[float, int]]) -> list[dict]:
    """The chosen config's FP32 layers with the diagnosis that put them there."""
    chosen = state.outcome.chosen
    reasons = getattr(state.strategy, "reasons", {}) if state.strategy else {}
    out = []
    for name in chosen.config.fallback if chosen else ():
        row = reasons.get(name)
        if row is not None and name in gains:
            row = {**row, **_gain_fields(gains[name])}
        why = ("not diagnosed (backend's fallback order)" if row is None else
               f"adds relative MSE {row['added_mse']:.3g} (output SQNR {row['sqnr_db']:.1f} dB, "
               f"input max/median {row.get('range_ratio')})"
               + _gain_reason(row))
        out.append({"name": name, "backend": state.job.backend, "reason": why, **(row or {})})
    return out


def _gain_reason(row: dict) -> str:
    """What keeping the layer in FP32 did to the metric, for ``kept_fp32``'s reason."""
    others = int(row.get("step_layers") or 1) - 1
    with_others = f" (with {others} other layer{'s' if others > 1 else ''})" if others > 0 else ""
    if row.get("rescued"):
        return f"; keeping it in FP32{with_others} made a collapsed or failed trial score"
    if row.get("metric_gain") is not None:
        return f"; keeping it in FP32{with_others} raised the metric by {row['metric_gain']:+.4g}"
    return ""


def tune(
    jobs: Sequence[TrialJob],
    report: Report,
    strategy: str | None = None,
    budget: Budget | None = None,
    runner: TrialRunner | None = None,
    previous: Report | None = None,
    strict: bool = True,
    hooks: Sequence[TrialHook] = (),
) -> list[TuneOutcome]:
    """Tune every job (one per backend/precision) under one ``budget``; records go to ``report``.

    Args:
        jobs: the (backend, precision) jobs, in the order they take turns.
        report: receives every trial's record (indices are global across jobs).
        strategy: a ``tuning_strategy`` name (default ``basic``).
        budget: ``max_trials``/``timeout`` for the whole call.
        runner: runs a batch of trials (in-process by default; Beam in the TFX component).
        previous: an earlier report whose finished trials are reused (resume).
        strict: a backend that can't run raises (True), or becomes a failed row (False, ``auto``).
        hooks: called with each trial record as it is judged.

    Returns:
        One ``TuneOutcome`` per job, in ``jobs`` order.
    """
    runner = runner or LocalRunner()
    budget = budget or Budget()
    states = [_State(job, TuneOutcome(job)) for job in jobs]
    opened: set[int] = set()
    stop = None
    while not stop:
        active = [i for i, s in enumerate(states) if not s.done]
        if not active:
            break
        for i in active:
            state = states[i]
            what = f"{state.job.backend} trial"
            if i not in opened:
                stop = budget.spent(_expected_open_s(states), f"{state.job.backend} preparation and trial")
                if stop:
                    break
                opened.add(i)
                started = time.perf_counter()
                ok = _open(state, strategy, report, strict)
                state.prepare_seconds = time.perf_counter() - started
                if not ok:
                    continue
            stop = budget.spent(_expected_step_s(state, states), what)
            if stop:
                break
            started = time.perf_counter()
            _step(state, report, budget, runner, previous, hooks)
            state.step_seconds.append(time.perf_counter() - started)
    for state in states:
        if not state.done:
            state.outcome.stop_reason = stop
    report.stop_reason = stop or (states[0].outcome.stop_reason if len(states) == 1 else "all backends tried")
    report.kept_fp32 = []
    for state in states:
        gains = _metric_gains(state)
        _credit_gains(state, report, gains)
        report.kept_fp32 += _kept_fp32(state, gains)
    for state in states:
        outcome = state.outcome
        winner = outcome.chosen or outcome.best
        if winner is not None and not winner.failed:
            outcome.candidate = winner.candidate or runner.load_candidate(state.job, winner)
    return [s.outcome for s in states]
