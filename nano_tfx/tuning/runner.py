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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nano_tfx.backends.base import AccuracyContext, BackendOptions, CalibrationData, Candidate, TrialConfig, backend_class
from nano_tfx.criterion import AccuracyCriterion
from nano_tfx.interchange import SavedModelSource
from nano_tfx.metrics import Evaluator
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


@dataclass
class TrialResult:
    config: TrialConfig
    metric: float | None = None
    passed: bool | None = None
    latency_ms: float | None = None
    latency_batch_ms: float | None = None
    size_bytes: int | None = None
    seconds: float = 0.0
    speedup: float | None = None  # FP32 b1 ms / latency_ms, timed side by side in the trial's process
    status: str = "ok"  # "ok" | "reused" | "failed" (see nano_tfx.report.TrialStatus)
    error: str | None = None  # one line, when failed
    traceback: str | None = None
    evaluations: int = 0  # metric evaluations this trial made (NNCF accuracy control: many)
    output_mse: float | None = None
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
    key = (job.source.path, job.source.signature_key, job.backend, repr(job.options), job.precision, job.workdir)
    if key not in _PREPARED:
        backend = backend_class(job.backend)(job.options)
        workdir = job.workdir or job.artifact_root or os.path.join(os.path.dirname(job.source.path), "work")
        workdir = os.path.join(workdir, f"prepare_{job.backend}_{os.getpid()}")
        os.makedirs(workdir, exist_ok=True)
        _PREPARED[key] = (backend, backend.prepare(job.source, workdir))
    return _PREPARED[key]


_REFERENCE: dict[tuple, Any] = {}


def reference_outputs(job: TrialJob) -> list[list[np.ndarray]]:
    """FP32 outputs over the evaluation data, cached per process (for the mse strategy)."""
    key = (job.source.path, job.source.signature_key, id(job.evaluation))
    if key not in _REFERENCE:
        from nano_tfx.backends.tf_reference import TFSignatureCandidate

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
    from nano_tfx.result import QuantizedModel

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
    """A quantized candidate whose outputs are non-finite, or the same for every input."""


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


def _varies(outputs: list[np.ndarray]) -> bool:
    """Whether any output differs between rows of the batch."""
    for out in outputs:
        a = np.asarray(out)
        if a.ndim and len(a) > 1 and a.dtype.kind in "fiub" and np.ptp(a.reshape(len(a), -1), axis=0).max() > 0:
            return True
        if a.dtype.kind not in "fiub":
            return True  # strings etc.: not judged
    return False


_REFERENCE_VARIES: dict[tuple, bool] = {}


def check_outputs(job: TrialJob, candidate: Candidate) -> None:
    """Refuse a garbage model: non-finite outputs on calibration rows, or the same output for
    every row while the FP32 model's outputs differ between them."""
    probe = _probe_inputs(job)
    if probe is None or len(probe[0]) == 0:
        return
    outs = [np.asarray(o) for o in candidate.run(probe)]
    for name, out in zip(job.source.output_names, outs):
        if out.dtype.kind == "f" and not np.all(np.isfinite(out)):
            bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
            raise GarbageModelError(f"output {name!r} has {bad} non-finite value(s) on calibration data")
    if len(probe[0]) < 2 or _varies(outs):
        return
    key = (job.source.path, job.source.signature_key, len(probe[0]))
    if key not in _REFERENCE_VARIES:
        _REFERENCE_VARIES[key] = _varies(fp32_reference(job).run(probe))
    if _REFERENCE_VARIES[key]:
        raise GarbageModelError(
            f"the quantized model gives the same output for all {len(probe[0])} calibration rows "
            "(the FP32 model does not): a collapsed model"
        )


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
        result.speedup = round(speed.speedup("fp32", "trial"), 4)


def run_trial(job: TrialJob, config: TrialConfig) -> TrialResult:
    """Quantize with ``config``, check, evaluate, time, optionally save. Failures become data."""
    start = time.perf_counter()
    candidate = None
    try:
        backend, prepared = _backend_and_prepared(job)
        ctx = accuracy_context(job)
        candidate = backend.quantize(prepared, job.precision, config, job.calibration, ctx)
        check_outputs(job, candidate)
        result = TrialResult(config, candidate=candidate, evaluations=ctx.evaluations if ctx else 0)
        if job.evaluator is not None:
            result.evaluations += 1
            from nano_tfx.result import QuantizedModel

            model = QuantizedModel(candidate, job.source)
            result.metric = job.evaluator.evaluate(candidate.run, job.evaluation, model=model)
            if not np.isfinite(result.metric):
                raise GarbageModelError(f"{job.evaluator.name} is {result.metric} on this candidate")
            if job.criterion is not None and job.baseline is not None:
                result.passed = job.criterion.met(job.baseline, result.metric)
        if job.want_mse and job.evaluation is not None:
            result.output_mse = _output_mse(job, candidate)
        if job.measure_latency and job.calibration is not None:
            _time_trial(job, candidate, next(iter(job.calibration)), result)
        if job.artifact_root:
            out = os.path.join(job.artifact_root, trial_dir_name(config, job.backend, job.precision))
            from nano_tfx.result import write_model_dir

            write_model_dir(out, candidate, job.source.inputs, job.source.outputs, config, job.backend)
            result.artifact_dir = out
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
    from nano_tfx.diagnosis import take_samples

    if job.calibration is None:
        raise NotImplementedError("diagnosis needs calibration data")
    backend, prepared = _backend_and_prepared(job)
    return backend.diagnose(prepared, candidate, take_samples(job.calibration, max_samples))


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
        from nano_tfx.result import read_manifest

        return backend.load(result.artifact_dir, read_manifest(result.artifact_dir))


class LocalRunner(TrialRunner):
    """In-process, one trial at a time (the Keras API and the callback)."""

    def run(self, job: TrialJob, configs: list[TrialConfig]) -> list[TrialResult]:
        return [run_trial(job, c) for c in configs]
