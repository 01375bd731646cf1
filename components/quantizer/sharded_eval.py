"""The Quantizer's evaluator of ``trial_evaluation='sequential'``: the evaluation split in shards,
FP32 once as Beam work and kept with the run, each chunk of a trial over the shards in parallel.

``ShardedChunks`` is the ``PairedChunks`` that ``nano_tfx.tuning.paired_eval.PairedEvaluation``
calls (one engine: the decision loop is the Keras API's; only where rows are evaluated differs).

* **Shards**: each TFRecord file of the split, cut into ``parts`` by record index when there are
  fewer files than wanted shards (``tf.data``'s ``shard``).
* **FP32 once** (``ensure_fp32``): per shard, every example's key (``stable_hash`` of its
  serialized bytes — the fixed hash order, computable by any worker on its own), label and FP32
  output, written as ``shard-NNNNN.npz`` under ``fp32_dir`` with a ``meta.json`` written last
  (a half-written directory is never reused), and the records whose key is in the first
  ``PREFIX_FRACTION`` of the hash space as ``prefix-NNNNN.tfrecord`` (early looks read only those). The meta's ``key`` is the FP32 model's fingerprint
  + the split's files digest + the layout: a resumed run whose key matches reuses the results
  (from its own directory or copied from ``previous_dir``, the previous run's report artifact).
  The driver keeps only the chunk boundaries of the hash order (the hash at each
  ``chunk_schedule`` end; sorting the keys costs 8 bytes a row, once).
* **A chunk** of a trial: rows whose hash lies in (cut[lo], cut[hi]]. Per shard a worker reads
  the shard's records, parses and runs the candidate on the chunk's rows only (the candidate is
  loaded once per worker process: ``apache_beam.utils.shared.Shared``), pairs them with the stored
  FP32 outputs and emits a ``PairedMetric`` state; ``PairedStateCombineFn`` merges the states
  (sums: counts merge bit-exactly, loss sums to float round-off). Only ParDo + GroupByKey +
  ``CombineValues`` (no combiner lifting, no ``Read`` source), so the DirectRunner, Dask and
  portable runners all run it.
* **Where it runs** (``mode``): ``'in-process'`` evaluates the shards in a loop in this process
  with the live candidate — the local DirectRunner with one worker, where a pipeline would only
  add worker start-up; ``'beam'`` runs a chunk of at least ``beam_min_rows`` rows as one Beam
  pipeline (smaller chunks, a few hundred rows, stay in-process: a pipeline's start-up would cost
  more than they do). Results are identical either way (the same shard function).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from nano_tfx.metric_states import PairedMetric
from nano_tfx.sequential import stable_hash
from nano_tfx.tuning.paired_eval import FIRST_CHUNK, TrialModel, chunk_schedule

log = logging.getLogger("nano_tfx")

META = "meta.json"
FP32_DIR = "fp32_eval"  # in the report artifact: FP32 results kept with the run
LAYOUT_VERSION = 2
READ_BATCH = 4096
#: the hash order's first 1/8 (keys below PREFIX_HASH; keys are uniform on uint64) is also kept
#: as its own small record file per shard: the early looks of a trial read only that
PREFIX_FRACTION = 1 / 8
PREFIX_HASH = int(2 ** 64 * PREFIX_FRACTION)


@dataclass(frozen=True)
class Shard:
    file: str
    part: int = 0
    parts: int = 1


@dataclass
class ShardedSplit:
    """The evaluation split as shards + how to parse it (plain data: pickled to workers)."""

    files: list[str]
    features: dict  # signature input name -> (dtype name, shape)
    label: tuple  # (name, dtype name, shape)
    input_names: list[str]  # the candidate's input order
    compression: str = ""
    shards: list[Shard] = field(default_factory=list)
    batch_size: int = 1024
    autotune: bool = True  # tf.data autotuning of the reads (off in Beam workers: ``record_batches``)

    @staticmethod
    def plan(files: Sequence[str], features: dict, label: tuple, input_names: Sequence[str],
             min_shards: int = 1, batch_size: int = 1024) -> "ShardedSplit":
        files = sorted(files)
        if not files:
            raise ValueError("evaluation split: no files")
        parts = max(1, math.ceil(min_shards / len(files)))
        compression = "GZIP" if all(f.endswith(".gz") for f in files) else ""
        shards = [Shard(f, p, parts) for f in files for p in range(parts)]
        return ShardedSplit(list(files), dict(features), tuple(label), list(input_names), compression, shards,
                            int(batch_size))

    def layout(self) -> dict:
        return {"version": LAYOUT_VERSION, "shards": [[os.path.basename(s.file), s.part, s.parts] for s in self.shards],
                "features": sorted(self.features.items()), "label": list(self.label)}

    # -- reading ----------------------------------------------------------------------------
    def _spec(self, with_label: bool = True) -> dict:
        import tensorflow as tf

        spec = {k: tf.io.FixedLenFeature(s, tf.as_dtype(d)) for k, (d, s) in self.features.items()}
        if with_label:
            name, dtype, shape = self.label
            spec[name] = tf.io.FixedLenFeature(shape, tf.as_dtype(dtype))
        return spec

    def serialized(self, shard: Shard):
        """Batches of serialized records of one shard (tf string tensors), in a fixed order."""
        return record_batches(shard.file, self.compression, shard.parts, shard.part, self.autotune)

    def parse(self, serialized, with_label: bool = True) -> tuple[list[np.ndarray], np.ndarray | None]:
        """(the candidate's inputs, the labels or None) of a batch of serialized records."""
        import tensorflow as tf

        parsed = tf.io.parse_example(serialized, self._spec(with_label))
        return ([parsed[n].numpy() for n in self.input_names],
                parsed[self.label[0]].numpy() if with_label else None)


def record_batches(path: str, compression: str = "", parts: int = 1, part: int = 0, autotune: bool = True):
    """Batches (tf string tensors of up to ``READ_BATCH``) of the records of one TFRecord file,
    in file order; with ``parts`` > 1 only records ``part``, ``part + parts``, ... (``shard``).

    ``autotune=False`` where shards run side by side in worker threads (the DirectRunner's
    multi_threading): there, deleting an exhausted ``tf.data`` iterator with autotuning on
    blocked until the other thread's shard was done (measured: ~0.6 s of a 0.65 s shard, in about
    one shard of four; two workers took 0.84x one worker's time). Alone in a process, autotuning
    is kept: it reads ahead on a spare core (1.24 cores busy, a shard ~10 % faster)."""
    import tensorflow as tf

    ds = tf.data.TFRecordDataset([path], compression_type=compression)
    if parts > 1:
        ds = ds.shard(parts, part)
    ds = ds.batch(READ_BATCH)
    if not autotune:
        options = tf.data.Options()
        options.autotune.enabled = False
        ds = ds.with_options(options)
    return ds


def _run_batched(run: Callable, xs: list[np.ndarray], batch: int) -> np.ndarray:
    outs = []
    for i in range(0, len(xs[0]), batch):
        got = run([x[i:i + batch] for x in xs])
        if len(got) != 1:
            raise ValueError("sharded evaluation needs a model with one output")
        outs.append(np.asarray(got[0]))
    return np.concatenate(outs)


def _save_npz(path: str, **arrays: np.ndarray) -> None:
    from apache_beam.io.filesystems import FileSystems

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with FileSystems.create(path) as f:
        f.write(buf.getvalue())


def _load_npz(path: str) -> dict:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
        data = np.load(io.BytesIO(f.read()))
        return {k: data[k] for k in data.files}


def shard_path(fp32_dir: str, index: int) -> str:
    return os.path.join(fp32_dir, f"shard-{index:05d}.npz")


# -- per-worker models (Beam's shared pattern) --------------------------------------------------
_SHARED = None


def _shared():
    global _SHARED
    if _SHARED is None:
        from apache_beam.utils.shared import Shared

        _SHARED = Shared()
    return _SHARED


class _Holder:
    """Weak-referenceable box for ``Shared`` (a candidate may hold unweakrefable sessions)."""

    def __init__(self, model: Any):
        self.model = model


def load_fp32(source: Any):
    """The FP32 signature run by TensorFlow (``source``: a ``SavedModelSource``)."""
    from nano_tfx.backends.tf_reference import TFSignatureCandidate

    return TFSignatureCandidate(source)


def load_trial(trial: TrialModel):
    from nano_tfx.backends.base import backend_class
    from nano_tfx.result import read_manifest

    return backend_class(trial.backend)(trial.options).load(trial.artifact_dir, read_manifest(trial.artifact_dir))


# -- the shard functions (the same in-process and in Beam workers) ------------------------------
def prefix_path(fp32_dir: str, index: int) -> str:
    return os.path.join(fp32_dir, f"prefix-{index:05d}.tfrecord")


def fp32_shard(split: ShardedSplit, index: int, fp32_dir: str, run: Callable) -> int:
    """FP32 once on shard ``index``: keys, labels, outputs → ``shard-NNNNN.npz``, and the records
    in the hash order's first ``PREFIX_FRACTION`` → ``prefix-NNNNN.tfrecord``; returns its rows."""
    import tensorflow as tf

    keys, labels, outs = [], [], []
    with tf.io.TFRecordWriter(prefix_path(fp32_dir, index)) as prefix:
        for serialized in split.serialized(split.shards[index]):
            records = list(serialized.numpy())
            key = stable_hash(records)
            keys.append(key)
            for i in np.flatnonzero(key < PREFIX_HASH):
                prefix.write(records[i])
            xs, y = split.parse(serialized)
            labels.append(y)
            outs.append(_run_batched(run, xs, split.batch_size))
    if keys:
        key, y_true, y_fp32 = np.concatenate(keys), np.concatenate(labels), np.concatenate(outs)
    else:
        key, y_true, y_fp32 = np.zeros(0, np.uint64), np.zeros(0), np.zeros(0)
    _save_npz(shard_path(fp32_dir, index), key=key, y_true=y_true, y_fp32=y_fp32)
    return len(key)


def chunk_shard(split: ShardedSplit, index: int, fp32_dir: str, metric: PairedMetric, low: int | None,
                high: int, run: Callable | None, load: Callable[[], Callable]) -> np.ndarray:
    """The paired state of shard ``index``'s rows whose key lies in (low, high] (low None: no lower
    bound). Only those rows are parsed and run; a shard with none is not read at all, and a chunk
    inside the hash order's prefix reads the prefix file only (an early look costs a few % of
    a pass, not a read of the whole split)."""
    import tensorflow as tf

    stored = _load_npz(shard_path(fp32_dir, index))
    key = stored["key"]
    keep = key <= np.uint64(high)
    if low is not None:
        keep &= key > np.uint64(low)
    state = metric.create()
    if not keep.any():
        return state
    run = run or load()
    if high < PREFIX_HASH:  # every row of the chunk is in the prefix file, in the shard's order
        positions = np.flatnonzero(key < PREFIX_HASH)
        batches = record_batches(prefix_path(fp32_dir, index), autotune=split.autotune)
    else:
        positions = np.arange(len(key))
        batches = split.serialized(split.shards[index])
    start = 0
    for serialized in batches:
        count = int(serialized.shape[0])
        idx = positions[start:start + count]
        start += count
        pick = np.flatnonzero(keep[idx])
        if not len(pick):
            continue
        rows = idx[pick]
        # the labels were stored with FP32's results; a full batch needs no gather
        xs, _ = split.parse(serialized if len(pick) == count else tf.gather(serialized, pick), with_label=False)
        y_int8 = _run_batched(run, xs, split.batch_size)
        state = metric.add(state, stored["y_true"][rows], stored["y_fp32"][rows], y_int8)
    if start != len(positions):
        raise RuntimeError(f"shard {index} of the evaluation split changed since its FP32 results were written")
    return state


class PairedStateCombineFn:
    """Merges ``PairedMetric`` states (a Beam ``CombineFn``; built lazily so importing this module
    does not import Beam)."""

    def __new__(cls, metric: PairedMetric):
        import apache_beam as beam

        class _Combine(beam.CombineFn):
            def __init__(self, m):
                self.metric = m

            def create_accumulator(self):
                return self.metric.create()

            def add_input(self, acc, state):
                return self.metric.merge([acc, state])

            def merge_accumulators(self, accs):
                return self.metric.merge(list(accs))

            def extract_output(self, acc):
                return acc

        return _Combine(metric)


class _Fp32Fn:
    def __init__(self, split, fp32_dir, model):
        self.split, self.fp32_dir, self.model = split, fp32_dir, model

    def __call__(self, index: int) -> int:
        holder = _shared().acquire(lambda: _Holder(load_fp32(self.model)), tag=("fp32", self.model.path))
        return fp32_shard(self.split, index, self.fp32_dir, holder.model.run)


class _ChunkFn:
    def __init__(self, split, fp32_dir, metric, low, high, trial: TrialModel, threads: int | None = None):
        self.split, self.fp32_dir, self.metric, self.low, self.high = split, fp32_dir, metric, low, high
        self.trial = TrialModel(artifact_dir=trial.artifact_dir, backend=trial.backend,
                                options=worker_options(trial.options, threads))

    def _load(self):
        t = self.trial
        return _shared().acquire(lambda: _Holder(load_trial(t)), tag=("trial", t.artifact_dir)).model.run

    def __call__(self, index: int) -> tuple[Any, np.ndarray]:
        return index, chunk_shard(self.split, index, self.fp32_dir, self.metric, self.low, self.high, None, self._load)


def worker_options(options: Any, threads: int | None) -> Any:
    """``options`` with ``thread_num=threads`` where the user left it unset: workers side by side on
    one machine each give their engine its share of the cores (an engine's default takes them all,
    and two spinning pools on the same cores slow both)."""
    if threads is None or options is None or getattr(options, "thread_num", 0) is not None:
        return options
    return replace(options, thread_num=int(threads))


class _WriteState:
    def __init__(self, path: str):
        self.path = path

    def __call__(self, keyed) -> None:
        _save_npz(self.path, state=keyed[1])


class ShardedChunks:
    """``PairedChunks`` over a sharded split, FP32 results persisted in ``fp32_dir``.

    Args:
      split: the shards and how to parse them.
      model: the FP32 model's ``SavedModelSource`` (what workers load).
      fingerprint: of the FP32 model + the split's files (with the layout: the reuse key).
      fp32_dir: where this run keeps FP32's results; ``previous_dir``: a previous run's (reused
        when its key matches).
      mode: 'in-process' | 'beam'; ``make_pipeline``: an unstarted ``beam.Pipeline`` factory.
      beam_min_rows: a chunk smaller than this runs in-process even in 'beam' mode.
      reference: the FP32 model's run in this process (in-process FP32 pass).
      worker_threads: engine threads of a candidate loaded in a Beam worker, where the user set
        none (None: the engine's default; the executor sets cores ÷ workers on the local runner).
    """

    needs_artifact = True

    def __init__(self, split: ShardedSplit, model: Any, fingerprint: str, fp32_dir: str,
                 previous_dir: str | None = None, mode: str = "in-process",
                 make_pipeline: Callable[[], Any] | None = None, beam_min_rows: int = 50_000,
                 reference: Callable | None = None, first: int = FIRST_CHUNK, worker_threads: int | None = None):
        if mode not in ("in-process", "beam"):
            raise ValueError(f"mode: expected 'in-process' or 'beam', got {mode!r}")
        self.split, self.model, self.fp32_dir, self.previous_dir = split, model, fp32_dir, previous_dir
        self.mode, self.make_pipeline, self.beam_min_rows = mode, make_pipeline, int(beam_min_rows)
        self.reference, self.first = reference, first
        if worker_threads is not None and (isinstance(worker_threads, bool) or int(worker_threads) < 1):
            raise ValueError(f"worker_threads: expected a positive int or None, got {worker_threads!r}")
        self.worker_threads = worker_threads
        self.key = json.dumps([fingerprint, split.layout()], sort_keys=True, default=str)
        self.fp32_source = "computed"  # or "reused" / "reused from <dir>"
        self.pipelines_run = 0
        self.fp32_seconds = 0.0
        self._ensure_fp32()

    # -- FP32 once -------------------------------------------------------------------------
    def _meta(self, directory: str | None) -> dict | None:
        from apache_beam.io.filesystems import FileSystems

        if not directory:
            return None
        path = os.path.join(directory, META)
        if not FileSystems.exists(path):
            return None
        with FileSystems.open(path) as f:
            meta = json.loads(f.read().decode())
        return meta if meta.get("key") == self.key else None

    def _ensure_fp32(self) -> None:
        import time

        meta = self._meta(self.fp32_dir)
        if meta is not None:
            self.fp32_source = "reused"
        elif self._meta(self.previous_dir) is not None:
            self._copy_from(self.previous_dir)
            meta = self._meta(self.fp32_dir)
            self.fp32_source = f"reused from {self.previous_dir}"
        if meta is None:
            started = time.perf_counter()
            meta = self._compute_fp32()
            self.fp32_seconds = time.perf_counter() - started
        self.n = int(meta["n"])
        self.ends = [int(e) for e in meta["ends"]]
        self.cuts = {int(k): int(v) for k, v in meta["cuts"].items()}

    def _copy_from(self, directory: str) -> None:
        from apache_beam.io.filesystems import FileSystems

        if not FileSystems.exists(self.fp32_dir):
            FileSystems.mkdirs(self.fp32_dir)
        for i in range(len(self.split.shards)):
            FileSystems.copy([shard_path(directory, i), prefix_path(directory, i)],
                             [shard_path(self.fp32_dir, i), prefix_path(self.fp32_dir, i)])
        FileSystems.copy([os.path.join(directory, META)], [os.path.join(self.fp32_dir, META)])

    def _compute_fp32(self) -> dict:
        from apache_beam.io.filesystems import FileSystems

        if FileSystems.exists(self.fp32_dir):
            FileSystems.delete([self.fp32_dir])  # a stale or half-written one: never reused
        FileSystems.mkdirs(self.fp32_dir)
        indices = list(range(len(self.split.shards)))
        if self.mode == "beam":
            import apache_beam as beam

            with self.make_pipeline() as p:
                _ = (p | "Shards" >> beam.Create(indices, reshuffle=False) | "Spread" >> beam.Reshuffle()
                     | "Fp32" >> beam.Map(_Fp32Fn(self._worker_split(), self.fp32_dir, self.model)))
            self.pipelines_run += 1
        else:
            run = self.reference or load_fp32(self.model).run
            for i in indices:
                fp32_shard(self.split, i, self.fp32_dir, run)
        keys = np.concatenate([_load_npz(shard_path(self.fp32_dir, i))["key"] for i in indices])
        n = len(keys)
        if n == 0:
            raise ValueError("evaluation split: no examples")
        ends = chunk_schedule(n, first=self.first)
        ordered = np.sort(keys)  # 8 bytes a row, once: only the chunk boundaries are kept
        cuts = {str(e): int(ordered[e - 1]) for e in ends}
        meta = {"key": self.key, "n": n, "ends": ends, "cuts": cuts}
        with FileSystems.create(os.path.join(self.fp32_dir, META)) as f:  # last: marks it complete
            f.write(json.dumps(meta).encode())
        return meta

    # -- PairedChunks ------------------------------------------------------------------------
    def _bounds(self, lo: int, hi: int) -> tuple[int | None, int]:
        if hi not in self.cuts or (lo and lo not in self.cuts):
            raise ValueError(f"chunk [{lo}, {hi}): boundaries must be chunk_schedule ends {self.ends}")
        return (self.cuts[lo] if lo else None), self.cuts[hi]

    def fp32_state(self, metric: PairedMetric) -> np.ndarray:
        states = []
        for i in range(len(self.split.shards)):
            stored = _load_npz(shard_path(self.fp32_dir, i))
            states.append(metric.add(metric.create(), stored["y_true"], stored["y_fp32"], stored["y_fp32"]))
        return metric.merge(states)

    def chunk_state(self, metric: PairedMetric, trial: TrialModel, lo: int, hi: int) -> np.ndarray:
        low, high = self._bounds(lo, hi)
        indices = list(range(len(self.split.shards)))
        if self.mode == "beam" and hi - lo >= self.beam_min_rows and trial.artifact_dir:
            return self._beam_chunk(metric, trial, low, high, indices)
        run = trial.run
        if run is None:
            run = load_trial(trial).run
        return metric.merge([chunk_shard(self.split, i, self.fp32_dir, metric, low, high, run, None)
                             for i in indices])

    def _worker_split(self) -> ShardedSplit:
        """The split as Beam workers read it (threads side by side: ``record_batches``)."""
        return replace(self.split, autotune=False)

    def _beam_chunk(self, metric, trial, low, high, indices) -> np.ndarray:
        import apache_beam as beam
        from apache_beam.io.filesystems import FileSystems

        out = os.path.normpath(os.path.join(self.fp32_dir, "..", f"chunk-{uuid.uuid4().hex[:12]}"))
        FileSystems.mkdirs(out)
        try:
            with self.make_pipeline() as p:
                states = (p | "Shards" >> beam.Create(indices, reshuffle=False) | "Spread" >> beam.Reshuffle()
                          | "Chunk" >> beam.Map(_ChunkFn(self._worker_split(), self.fp32_dir, metric, low, high, trial,
                                                            self.worker_threads)))
                if _is_dask(p):
                    # The DaskRunner's GroupByKey repeats values (states counted many times, seen with
                    # Beam 2.7x): each shard writes its state, merged below by the same CombineFn.
                    _ = states | "WriteShard" >> beam.Map(_WriteShardState(out))
                else:
                    _ = (states | "OneKey" >> beam.Map(_one_key) | "Gather" >> beam.GroupByKey()
                         | "Merge" >> beam.CombineValues(PairedStateCombineFn(metric))
                         | "Write" >> beam.Map(_WriteState(os.path.join(out, "merged.npz"))))
            self.pipelines_run += 1
            merged = os.path.join(out, "merged.npz")
            if FileSystems.exists(merged):
                return _load_npz(merged)["state"]
            fn = PairedStateCombineFn(metric)
            parts = [_load_npz(os.path.join(out, f"state-{i:05d}.npz"))["state"] for i in indices]
            return fn.extract_output(fn.merge_accumulators(parts))
        finally:
            FileSystems.delete([out])


def _one_key(keyed: tuple) -> tuple[None, np.ndarray]:
    return None, keyed[1]  # every shard's state under one key: one merged state


def _is_dask(pipeline: Any) -> bool:
    from apache_beam.options.pipeline_options import StandardOptions

    return "DaskRunner" in str(pipeline.options.view_as(StandardOptions).runner or "") or \
        "DaskRunner" in type(getattr(pipeline, "runner", None)).__name__


class _WriteShardState:
    def __init__(self, directory: str):
        self.directory = directory

    def __call__(self, keyed) -> None:
        index, state = keyed
        _save_npz(os.path.join(self.directory, f"state-{index:05d}.npz"), state=state)
