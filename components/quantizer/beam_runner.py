"""Trials as Beam work: ``Create(configs) → Reshuffle → Map(run_trial) → write results``.

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
from nano_tfx.tuning.runner import TrialJob, TrialResult, TrialRunner, run_trial

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
      parallelism: trials per batch; default from the Beam args (``default_parallelism``).
    """

    def __init__(
        self,
        beam_pipeline_args: Sequence[str] = (),
        results_dir: str | None = None,
        artifact_root: str | None = None,
        make_pipeline: Callable[[], Any] | None = None,
        parallelism: int | None = None,
    ):
        import tempfile

        self.beam_pipeline_args = with_runner_defaults(beam_pipeline_args)
        self.results_dir = results_dir or tempfile.mkdtemp(prefix="nano_tfx_trials_")
        self.artifact_root = artifact_root or os.path.join(self.results_dir, "trials")
        self.make_pipeline = make_pipeline
        self.parallelism = parallelism or default_parallelism(self.beam_pipeline_args)
        self.batches_run = 0

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
        out_dir = FileSystems.join(self.results_dir, f"batch-{self.batches_run:04d}-{uuid.uuid4().hex[:8]}")
        FileSystems.mkdirs(out_dir)
        self.batches_run += 1
        items = [(i, c.to_dict()) for i, c in enumerate(configs)]
        log.info("nano-tfx: %d trial(s) as Beam work on %s", len(items), runner_name(self.beam_pipeline_args))
        with self._pipeline() as p:
            _ = (
                p
                | "Configs" >> beam.Create(items, reshuffle=False)
                | "Spread" >> beam.Reshuffle()
                | "RunTrial" >> beam.Map(_RunAndWrite(job, out_dir))
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
            results.append(result)
        return results
