"""Trials as Beam work: ``Create(configs) → Reshuffle → Map(run_trial) → write results``.

Beam pays only where it buys something: on the local DirectRunner (any
``direct_running_mode``) each batch of trials would start fresh worker processes that import
TensorFlow again (measured: 2.7× the in-process tuning time, see ``benchmarks/tuning_bench.py``)
and the two cores are the same ones the in-process trial uses anyway, so ``BeamTrialRunner``
runs the trials in-process there (``in_process``). Dask, Flink, Spark, Dataflow and portable
runners keep trials as Beam work.

``BeamTrialRunner`` is the ``trial_runner=`` the Quantizer passes to ``nano_tfx.quantize``. Each
batch of configs the tuner proposes becomes one Beam pipeline built with the component's
``beam_pipeline_args``, so the same code runs on the DirectRunner (multi_processing), Dask,
Dataflow, Flink or Spark. ``Reshuffle`` breaks fusion with ``Create`` so trials spread over
workers; each worker writes its pickled ``TrialResult`` to ``results_dir`` (a shared path: local
disk for local runners, GCS/HDFS for clusters), which is also how results get back without a
runner-specific "collect" (the DaskRunner, e.g., only computes the last transform).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import uuid
from typing import Any, Callable, Sequence

from nano_tfx.backends.base import TrialConfig
from nano_tfx.tuning.runner import TrialJob, TrialResult, TrialRunner, evaluate_trial, run_trial

log = logging.getLogger("nano_tfx")

DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"


class _RunAndWrite:
    """The trial DoFn body (picklable; ``job`` travels once per bundle with the transform)."""

    def __init__(self, job: TrialJob, results_dir: str):
        self.job = job
        self.results_dir = results_dir

    def __call__(self, item: tuple[int, dict]) -> None:
        from apache_beam.io.filesystems import FileSystems

        index, config = item
        result = run_trial(self.job, TrialConfig.from_dict(config))
        result.candidate = None
        path = FileSystems.join(self.results_dir, f"{index:05d}.pkl")
        with FileSystems.create(path) as f:
            f.write(pickle.dumps(result))


def _options(beam_pipeline_args: Sequence[str]):
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions(list(beam_pipeline_args))


def runner_name(beam_pipeline_args: Sequence[str]) -> str:
    from apache_beam.options.pipeline_options import StandardOptions

    return _options(beam_pipeline_args).view_as(StandardOptions).runner or "DirectRunner"


def _is_dask(runner: Any) -> bool:
    return "DaskRunner" in str(runner)


IN_PROCESS = "in-process"
_LOCAL_RUNNERS = ("DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner", "FnApiRunner")


def is_local_direct(beam_pipeline_args: Sequence[str]) -> bool:
    """True for the local DirectRunner in any ``direct_running_mode`` (trials run in-process)."""
    runner = str(runner_name(beam_pipeline_args))
    return runner.rsplit(".", 1)[-1] in _LOCAL_RUNNERS


def default_parallelism(beam_pipeline_args: Sequence[str]) -> int:
    """How many trials to propose at once: the number of Beam workers the args ask for."""
    from apache_beam.options.pipeline_options import DirectOptions, GoogleCloudOptions, WorkerOptions

    args = list(beam_pipeline_args)
    options = _options(args)
    runner = str(runner_name(args))
    all_opts = options.get_all_options(drop_default=True)
    if _is_dask(runner):
        address = all_opts.get("address")
        if address:
            try:
                from distributed import Client

                with Client(address, timeout=30) as client:
                    return max(1, sum(client.nthreads().values()))
            except Exception as err:  # noqa: BLE001 - fall back to a fixed guess
                log.warning("nano-tfx: could not ask the Dask scheduler for its workers: %s", err)
        return max(2, os.cpu_count() or 2)
    if "Dataflow" in runner:
        workers = options.view_as(WorkerOptions)
        return max(1, workers.max_num_workers or workers.num_workers or 1)
    if "Flink" in runner or "Spark" in runner:
        par = all_opts.get("parallelism")
        return max(1, int(par)) if par and int(par) > 0 else max(2, os.cpu_count() or 2)
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode in ("multi_processing", "multi_threading"):
        return direct.direct_num_workers if direct.direct_num_workers > 0 else (os.cpu_count() or 1)
    del GoogleCloudOptions
    return 1


def evaluation_mode(beam_pipeline_args: Sequence[str]) -> str:
    """Where the sharded evaluation's chunks run: ``'in-process'`` on the local DirectRunner with
    one worker (or in_memory mode: a pipeline would add only its start-up), else ``'beam'``."""
    from apache_beam.options.pipeline_options import DirectOptions

    if not is_local_direct(beam_pipeline_args):
        return "beam"
    direct = _options(beam_pipeline_args).view_as(DirectOptions)
    if direct.direct_running_mode not in ("multi_processing", "multi_threading"):
        return "in-process"
    return "beam" if default_parallelism(beam_pipeline_args) > 1 else "in-process"


def with_runner_defaults(beam_pipeline_args: Sequence[str]) -> list[str]:
    """One trial per Dask partition (Dask's default packs 128 elements per partition)."""
    args = list(beam_pipeline_args)
    if _is_dask(runner_name(args)) and not any(
        a.startswith(("--dask_npartitions", "--dask_partition_size")) for a in args
    ):
        args.append("--dask_partition_size=1")
    return args


class BeamTrialRunner(TrialRunner):
    """Run each batch of trial configs as one Beam pipeline.

    Args:
      beam_pipeline_args: the component's Beam args (runner, workers, ...).
      results_dir: shared directory for per-trial results (and, unless ``artifact_root`` is set
        on the job, ``trials/`` with each trial's model so the winner can be loaded back).
      artifact_root: where workers save trial models (must outlive the run for resume).
      make_pipeline: optional factory of ``beam.Pipeline`` (the executor's, for tests).
      parallelism: trials per batch; default from the Beam args (``default_parallelism``),
        1 when the trials run in-process.
      in_process: run the trials in this process instead of as Beam work; default (None):
        only on the local DirectRunner (``is_local_direct``).
    """

    def __init__(
        self,
        beam_pipeline_args: Sequence[str] = (),
        results_dir: str | None = None,
        artifact_root: str | None = None,
        make_pipeline: Callable[[], Any] | None = None,
        parallelism: int | None = None,
        in_process: bool | None = None,
        sharded_evaluation: Callable[..., Any] | None = None,
    ):
        import tempfile

        self.beam_pipeline_args = with_runner_defaults(beam_pipeline_args)
        self.in_process = is_local_direct(self.beam_pipeline_args) if in_process is None else bool(in_process)
        self.results_dir = results_dir or tempfile.mkdtemp(prefix="nano_tfx_trials_")
        self.artifact_root = artifact_root or os.path.join(self.results_dir, "trials")
        self.make_pipeline = make_pipeline
        self.parallelism = parallelism or (1 if self.in_process else default_parallelism(self.beam_pipeline_args))
        self.batches_run = 0
        self.sharded_evaluation = sharded_evaluation
        self.evaluation_mode = evaluation_mode(self.beam_pipeline_args)
        self.chunks = None  # the ShardedChunks of this run, once built

    def paired_chunks(self, metric: Any, evaluation: Any, reference: Any) -> Any:
        """The evaluator of ``trial_evaluation='sequential'`` (``PairedEvaluation.make``'s
        ``chunks``): ``sharded_evaluation(mode=, make_pipeline=, reference=)`` — the Quantizer's
        ``ShardedChunks`` — or None (chunks in this process over ``evaluation``)."""
        del metric, evaluation
        if self.sharded_evaluation is None:
            return None
        self.chunks = self.sharded_evaluation(mode=self.evaluation_mode, make_pipeline=self._pipeline,
                                              reference=reference)
        return self.chunks

    @property
    def description(self) -> str:
        """Where trials run: ``in-process`` or ``beam:<runner>`` (recorded in the report)."""
        return IN_PROCESS if self.in_process else f"beam:{runner_name(self.beam_pipeline_args)}"

    def _pipeline(self):
        if self.make_pipeline is not None:
            return self.make_pipeline()
        import apache_beam as beam

        return beam.Pipeline(argv=self.beam_pipeline_args)

    def run(self, job: TrialJob, configs: list[TrialConfig]) -> list[TrialResult]:
        import apache_beam as beam
        from apache_beam.io.filesystems import FileSystems

        if not configs:
            return []
        job = job if job.artifact_root else dataclasses.replace(job, artifact_root=self.artifact_root)
        if self.in_process:  # live candidates stay in memory; models are still saved for resume
            self.batches_run += 1
            return [run_trial(job, c) for c in configs]
        out_dir = FileSystems.join(self.results_dir, f"batch-{self.batches_run:04d}-{uuid.uuid4().hex[:8]}")
        FileSystems.mkdirs(out_dir)
        self.batches_run += 1
        # A sequential evaluation that is itself Beam work runs from here, not nested in a worker:
        # workers build, check, time and save each trial; the driver then evaluates the saved ones.
        deferred = job.sequential is not None and job.evaluator is not None
        worker_job = dataclasses.replace(job, sequential=None, defer_evaluation=True) if deferred else job
        items = [(i, c.to_dict()) for i, c in enumerate(configs)]
        log.info("nano-tfx: %d trial(s) as Beam work on %s", len(items), runner_name(self.beam_pipeline_args))
        with self._pipeline() as p:
            _ = (
                p
                | "Configs" >> beam.Create(items, reshuffle=False)
                | "Spread" >> beam.Reshuffle()
                | "RunTrial" >> beam.Map(_RunAndWrite(worker_job, out_dir))
            )
        results = []
        for i, config in enumerate(configs):
            path = FileSystems.join(out_dir, f"{i:05d}.pkl")
            if not FileSystems.exists(path):
                results.append(TrialResult.failure(config, "the Beam worker wrote no result"))
                continue
            with FileSystems.open(path) as f:
                result = pickle.loads(f.read())
            result.config = config  # the proposer's object (identity matters to the tuner)
            if deferred and not result.failed:
                result = _evaluate_here(job, result)
            results.append(result)
        return results


def _evaluate_here(job: TrialJob, result: TrialResult) -> TrialResult:
    """The driver's half of a deferred trial: its (sharded) sequential evaluation."""
    try:
        evaluate_trial(job, result, None)
        return result
    except Exception as err:  # noqa: BLE001 - a failed evaluation is a failed trial, as in run_trial
        failed = TrialResult.failure(result.config, err)
        failed.seconds, failed.worker, failed.artifact_dir = result.seconds, result.worker, result.artifact_dir
        log.warning("nano-tfx: trial %s: evaluation failed: %s", result.config.key(), failed.error)
        return failed
