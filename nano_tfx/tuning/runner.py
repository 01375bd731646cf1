"""Trials as pure data: ``run_trial(job, config) -> TrialResult``, and who runs them.

``run_trial`` is what the in-process ``LocalRunner`` calls, and what the TFX component's Beam
runner calls inside a DoFn on a worker: everything it needs travels in the picklable
``TrialJob``; what it returns is plain data plus, in-process, the live candidate.
"""
from __future__ import annotations

import abc
import hashlib
import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from nano_tfx.backends.base import AccuracyContext, BackendOptions, CalibrationData, Candidate, TrialConfig, backend_class
from nano_tfx.criterion import AccuracyCriterion
from nano_tfx.diagnosis import sqnr_db
from nano_tfx.interchange import SavedModelSource
from nano_tfx.metrics import Evaluator
from nano_tfx.result import QuantizedModel, read_manifest, write_model_dir
from nano_tfx.timing import rows

log = logging.getLogger("nano_tfx")


@dataclass
class TrialJob:
    """Everything a worker needs to run any trial of one tuning run (picklable)."""

    source: SavedModelSource
    backend: str  # registry key: "inc" | "onnxruntime" | "openvino"
    options: BackendOptions
    precision: str
    approach: str
    calibration: CalibrationData | None
    evaluation: Any = None  # ModelBatches or another re-iterable of (inputs, labels)
    evaluator: Evaluator | None = None
    baseline: float | None = None
    criterion: AccuracyCriterion | None = None
    artifact_root: str | None = None  # save each trial's model here (Beam); None keeps it in memory
    measure_latency: bool = True
    latency_batch: int | None = None
    want_mse: bool = False
    # Time each trial side by side with the FP32 reference in the trial's process (its
    # ``speedup``), and the speed gate each trial must pass (None: no per-trial gate, e.g. ``auto``).
    compare_fp32: bool = True
    min_speedup: float | None = None
    workdir: str | None = None
    sequential: Any = None  # nano_tfx.tuning.paired_eval.PairedEvaluation: trial_evaluation='sequential'
    # Build, check, time and save the trial, but leave its evaluation to the caller
    # (``evaluate_trial``): a trial running as Beam work whose evaluation is itself Beam work.
    defer_evaluation: bool = False


@dataclass
class TrialResult:
    config: TrialConfig
    metric: float | None = None
    passed: bool | None = None
    latency_ms: float | None = None
    latency_batch_ms: float | None = None
    size_bytes: int | None = None
    seconds: float = 0.0
    speedup: float | None = None  # fp32_latency_ms / latency_ms, timed side by side in the trial's process
    fp32_latency_ms: float | None = None
    status: str = "ok"  # "ok" | "reused" | "failed" (see nano_tfx.report.TrialStatus)
    error: str | None = None  # one line, when failed
    traceback: str | None = None
    evaluations: int = 0  # metric evaluations this trial made (NNCF accuracy control: many)
    output_mse: float | None = None
    int8_ops: dict[str, list[int]] | None = None  # INT8 coverage, counted by the backend (nano_tfx.coverage)
    sequential: dict | None = None  # trial_evaluation='sequential': examples evaluated, interval, decision
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    artifact_dir: str | None = None
    candidate: Candidate | None = None  # in-process only; dropped when pickled

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @staticmethod
    def failure(config: TrialConfig, err: BaseException | str) -> "TrialResult":
        """A failed trial as data: the one-line reason and, for an exception, its traceback."""
        if isinstance(err, str):
            return TrialResult(config, status="failed", error=err)
        line = traceback.format_exception_only(type(err), err)[-1].strip()
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        return TrialResult(config, status="failed", error=line[:500], traceback=tb)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["candidate"] = None
        return state


_PREPARED: dict[tuple, tuple[Any, Any]] = {}


def _backend_and_prepared(job: TrialJob):
    """One backend instance and one ``prepare`` per (process, source, backend, options)."""
    # job.workdir is in the key: a prepared model lives in its call's workdir, which is removed
    # when that call's result goes away (two calls on the same SavedModel path must not share it).
    # The precision is not: the rungs of ``precision='auto'`` share one conversion per engine.
    key = (job.source.path, job.source.signature_key, job.backend, repr(job.options), job.workdir)
    if key not in _PREPARED:
        _forget_finished_calls()
        backend = backend_class(job.backend)(job.options)
        workdir = job.workdir or job.artifact_root or os.path.join(os.path.dirname(job.source.path), "work")
        workdir = os.path.join(workdir, f"prepare_{job.backend}_{os.getpid()}")
        os.makedirs(workdir, exist_ok=True)
        _PREPARED[key] = (backend, backend.prepare(job.source, workdir))
    return _PREPARED[key]


def _forget_finished_calls() -> None:
    """Drop the prepared models of calls whose workdir is gone (removed with their result): a
    process that quantizes again and again (the callback, every epoch) must not keep one converted
    model per call."""
    for key in [k for k in _PREPARED if k[4] and not os.path.isdir(k[4])]:
        del _PREPARED[key]


_REFERENCE: dict[tuple, Any] = {}


def reference_outputs(job: TrialJob) -> list[list[np.ndarray]]:
    """FP32 outputs over the evaluation data, cached per process (for the mse strategy)."""
    key = (job.source.path, job.source.signature_key, id(job.evaluation))
    if key not in _REFERENCE:
        from nano_tfx.backends.tf_reference import TFSignatureCandidate

        _REFERENCE.clear()  # one evaluation set's outputs per process, not one per call
        ref = TFSignatureCandidate(job.source)
        _REFERENCE[key] = [ref.run(xs) for xs, _ in job.evaluation]
    return _REFERENCE[key]


def _output_mse(job: TrialJob, candidate: Candidate) -> float:
    errs, count = 0.0, 0
    for (xs, _), ref in zip(job.evaluation, reference_outputs(job)):
        for got, want in zip(candidate.run(xs), ref):
            errs += float(np.sum((np.asarray(got, np.float64) - want) ** 2))
            count += want.size
    return errs / max(count, 1)


def trial_dir_name(config: TrialConfig, backend: str, precision: str) -> str:
    return hashlib.sha1(f"{backend}|{precision}|{config.key()}".encode()).hexdigest()[:16]


def accuracy_context(job: TrialJob) -> AccuracyContext | None:
    if job.evaluator is None or job.baseline is None or job.criterion is None:
        return None

    def evaluate(run):
        ctx.evaluations += 1
        return job.evaluator.evaluate(run, job.evaluation, model=QuantizedModel.from_run(run, job.source))

    ctx = AccuracyContext(
        evaluate=evaluate,
        baseline=job.baseline,
        max_drop=job.criterion.max_drop,
        drop_type=job.criterion.drop_type,
        higher_is_better=job.criterion.higher_is_better,
        eval_batches=lambda: iter(job.evaluation),
    )
    return ctx


class GarbageModelError(RuntimeError):
    """A quantized candidate whose outputs are non-finite, or constant over the inputs and far
    from the FP32 model's."""


#: a constant candidate is refused when its output SQNR against FP32 is below this (relative
#: RMS error above 0.1); a near-uniform FP32 output (a random-weight softmax) whose rows differ
#: by less than one INT8 step is legitimately constant in INT8 and stays far above it
COLLAPSED_SQNR_DB = 20.0


def _probe_inputs(job: TrialJob, rows_wanted: int = 16) -> list[np.ndarray] | None:
    """Up to ``rows_wanted`` calibration rows (several batches when they are small)."""
    if job.calibration is None:
        return None
    parts: list[list[np.ndarray]] = []
    count = 0
    for xs in job.calibration:
        parts.append(xs)
        count += len(xs[0])
        if count >= rows_wanted:
            break
    if not parts:
        return None
    return [np.concatenate([p[i] for p in parts])[:rows_wanted] for i in range(len(parts[0]))]


def _constant(out: np.ndarray) -> bool:
    """Whether a numeric output is the same for every row of the batch (strings: not judged)."""
    a = np.asarray(out)
    if not a.ndim or len(a) < 2 or a.dtype.kind not in "fiub":
        return False
    return not np.ptp(a.reshape(len(a), -1), axis=0).max() > 0


def check_outputs(job: TrialJob, candidate: Candidate) -> None:
    """Refuse a garbage model on calibration rows: non-finite outputs, or an output that is the
    same for every row *and* far from FP32's (SQNR below ``COLLAPSED_SQNR_DB``).

    Constancy alone is not collapse: when the FP32 rows differ by less than one INT8 step, identical
    INT8 rows are the right answer, so distance from FP32 decides."""
    probe = _probe_inputs(job)
    if probe is None or len(probe[0]) == 0:
        return
    outs = [np.asarray(o) for o in candidate.run(probe)]
    for name, out in zip(job.source.output_names, outs):
        if out.dtype.kind == "f" and not np.all(np.isfinite(out)):
            bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
            raise GarbageModelError(f"output {name!r} has {bad} non-finite value(s) on calibration data")
    constant = [i for i, out in enumerate(outs) if _constant(out)]
    if not constant:
        return
    refs = fp32_reference(job).run(probe)
    for i in constant:
        name, want = job.source.output_names[i], np.asarray(refs[i])
        if _constant(want) or want.shape != outs[i].shape:
            continue  # FP32 is constant here too (or not comparable): nothing collapsed
        if want.dtype.kind not in "fiub" or outs[i].dtype.kind not in "fiub":
            continue
        if want.dtype.kind == "f":
            want64 = want.astype(np.float64)
            sqnr = sqnr_db(float(np.sum(want64 ** 2)), float(np.sum((outs[i].astype(np.float64) - want64) ** 2)))
            if sqnr >= COLLAPSED_SQNR_DB:
                continue
            far = f"output SQNR {sqnr:.1f} dB against FP32 < {COLLAPSED_SQNR_DB:g} dB"
        else:  # class ids and the like: far when most rows disagree with FP32
            wrong = float(np.mean(np.any((outs[i] != want).reshape(len(want), -1), axis=1)))
            if wrong <= 0.5:
                continue
            far = f"{wrong:.0%} of rows differ from FP32"
        raise GarbageModelError(
            f"the quantized model gives the same output for all {len(probe[0])} calibration rows on {name!r} "
            f"(the FP32 model does not), far from FP32 ({far}): a collapsed model")


TRIAL_TIMING_BUDGET_S = 1.5
_FP32: dict[tuple, Any] = {}


def fp32_reference(job: TrialJob) -> Candidate:
    """The FP32 signature run by TensorFlow, loaded once per process and source (timing, the
    collapsed-model check)."""
    pb = os.path.join(job.source.path, "saved_model.pb")
    key = (job.source.path, job.source.signature_key, os.path.getmtime(pb) if os.path.exists(pb) else None)
    if key not in _FP32:
        from nano_tfx.backends.tf_reference import TFSignatureCandidate

        _FP32.clear()  # one FP32 model per process: a callback quantizing every epoch must not pile them up
        _FP32[key] = TFSignatureCandidate(job.source)
    return _FP32[key]


def engine_fp32(job: TrialJob) -> Candidate | None:
    """The job's engine running its own FP32 model (``Backend.fp32_candidate`` on the prepare
    cached for this process: no second conversion); None when the backend has none or building
    it fails — the gain is then not reported, the result stands."""
    try:
        backend, prepared = _backend_and_prepared(job)
        return backend.fp32_candidate(prepared)
    except NotImplementedError:
        return None
    except Exception as err:  # noqa: BLE001 - a side number must never fail the call
        log.warning("nano-tfx: %s: the engine's FP32 model was not built (%s: %s); int8_gain not reported",
                    job.backend, type(err).__name__, err)
        return None


def _time_trial(job: TrialJob, candidate: Candidate, inputs: list, result: TrialResult) -> None:
    """The trial's ms at batch 1 (and ``latency_batch``), timed side by side with the FP32
    reference in this process (loaded once per process): its ``speedup`` holds up under load
    that would swing two separately timed numbers apart."""
    from nano_tfx.speed import side_by_side

    runs = {"trial": candidate.run}
    if job.compare_fp32:
        runs["fp32"] = fp32_reference(job).run
    speed = side_by_side(runs, inputs, batch=job.latency_batch, budget_s=TRIAL_TIMING_BUDGET_S)
    result.latency_ms = speed.b1_ms["trial"]
    result.latency_batch_ms = speed.batch_ms.get("trial")
    if job.compare_fp32:
        result.fp32_latency_ms = speed.b1_ms["fp32"]
        result.speedup = speed.speedup("fp32", "trial")


def _int8_ops(job: TrialJob, candidate: Candidate) -> dict[str, list[int]] | None:
    """The candidate's INT8 coverage; None when its backend can't count it. Coverage informs the
    report, so a counting error is logged and never fails the trial."""
    try:
        return candidate.int8_ops()
    except Exception as err:  # noqa: BLE001
        log.warning("nano-tfx: %s/%s: INT8 coverage not counted (%s: %s)", job.backend, job.precision,
                    type(err).__name__, err)
        return None


def _save_trial(job: TrialJob, config: TrialConfig, candidate: Candidate, result: TrialResult) -> None:
    out = os.path.join(job.artifact_root, trial_dir_name(config, job.backend, job.precision))
    write_model_dir(out, candidate, job.source.inputs, job.source.outputs, config, job.backend)
    result.artifact_dir = out


def evaluate_trial(job: TrialJob, result: TrialResult, candidate: Candidate | None) -> None:
    """The trial's metric and pass/fail into ``result``: sequentially (``job.sequential``) or on the
    full split. ``candidate`` None: a sequential evaluator that loads the saved trial
    (``result.artifact_dir``) where it runs — the driver's half of ``defer_evaluation``."""
    result.evaluations += 1
    if job.sequential is not None:  # decided on as few examples as the criterion needs
        from nano_tfx.tuning.paired_eval import TrialModel

        trial = TrialModel(run=candidate.run if candidate is not None else None, artifact_dir=result.artifact_dir,
                           backend=job.backend, options=job.options)
        metric, record = job.sequential.evaluate(trial)
        result.metric, result.sequential = metric, record.to_dict()
    else:
        model = QuantizedModel(candidate, job.source)
        result.metric = job.evaluator.evaluate(candidate.run, job.evaluation, model=model)
    if not np.isfinite(result.metric):
        raise GarbageModelError(f"{job.evaluator.name} is {result.metric} on this candidate")
    if job.sequential is not None:
        result.passed = result.sequential["verdict"] == "pass"
    elif job.criterion is not None and job.baseline is not None:
        result.passed = job.criterion.met(job.baseline, result.metric)


def run_trial(job: TrialJob, config: TrialConfig) -> TrialResult:
    """Quantize with ``config``, check, evaluate, time, optionally save. Failures become data."""
    start = time.perf_counter()
    candidate = None
    try:
        backend, prepared = _backend_and_prepared(job)
        ctx = accuracy_context(job)
        candidate = backend.build(prepared, job.precision, config, job.calibration, ctx)
        check_outputs(job, candidate)
        result = TrialResult(config, candidate=candidate, evaluations=ctx.evaluations if ctx else 0)
        result.int8_ops = _int8_ops(job, candidate)
        if job.sequential is not None and job.sequential.needs_artifact and job.artifact_root:
            _save_trial(job, config, candidate, result)  # sharded evaluation: workers load it from there
        if job.evaluator is not None and not job.defer_evaluation:
            evaluate_trial(job, result, candidate)
        if job.want_mse and job.evaluation is not None:
            result.output_mse = _output_mse(job, candidate)
        if job.measure_latency and job.calibration is not None:
            _time_trial(job, candidate, next(iter(job.calibration)), result)
        if job.artifact_root and result.artifact_dir is None:
            _save_trial(job, config, candidate, result)
        result.size_bytes = candidate.size_bytes(result.artifact_dir)
    except Exception as err:  # a failed trial is a recorded outcome, not a crash of the run
        result = TrialResult.failure(config, err)
        if isinstance(err, GarbageModelError):
            result.candidate = candidate  # a collapsed model is what the diagnosis explains
        log.warning("nano-tfx: %s/%s trial %s failed: %s\n%s", job.backend, job.precision,
                    config.key(), result.error, result.traceback)
    result.seconds = time.perf_counter() - start
    return result


def diagnose_trial(job: TrialJob, candidate: Candidate, max_samples: int = 256) -> list[dict]:
    """Per-layer error of a trial's candidate on calibration rows, worst first (see
    ``nano_tfx.diagnosis``); ``NotImplementedError`` when the backend/precision can't."""
    from nano_tfx.diagnosis import FirstSamples

    if job.calibration is None:
        raise NotImplementedError("diagnosis needs calibration data")
    backend, prepared = _backend_and_prepared(job)
    return backend.diagnose(prepared, candidate, FirstSamples(job.calibration, max_samples))


def job_diagnoser(job: TrialJob) -> Callable[[Any, Candidate, int], list[dict]]:
    """``QuantizedModel.diagnose``'s engine: ``diagnose_trial`` on the user's batches."""
    return lambda batches, candidate, max_samples: diagnose_trial(
        replace(job, calibration=batches), candidate, max_samples)


class TrialRunner(abc.ABC):
    """Runs a batch of trial configs; ``parallelism`` is how many the tuner proposes at once."""

    parallelism: int = 1

    @abc.abstractmethod
    def run(self, job: TrialJob, configs: list[TrialConfig]) -> list[TrialResult]:
        ...

    def load_candidate(self, job: TrialJob, result: TrialResult) -> Candidate:
        """The live model of a finished trial (in memory, or loaded from its artifact)."""
        if result.candidate is not None:
            return result.candidate
        backend, _ = _backend_and_prepared(job)
        return backend.load(result.artifact_dir, read_manifest(result.artifact_dir))


class LocalRunner(TrialRunner):
    """In-process, one trial at a time (the Keras API and the callback)."""

    def run(self, job: TrialJob, configs: list[TrialConfig]) -> list[TrialResult]:
        return [run_trial(job, c) for c in configs]
