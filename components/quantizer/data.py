"""Transform output → calibration / evaluation data for nano_tfx.

* ``sample_records``: a Beam pipeline that draws ``sample_size`` serialized examples from a split
  with bounded memory (a heap of ``n`` per file, keyed by a content hash, merged once: the
  sample is deterministic, whatever the sharding or runner) and writes them to one TFRecord
  file — so a rerun calibrates on the same sample and its trials can be reused.
* ``TransformedExamplesSource``: a picklable ``nano_tfx.BatchSource`` that streams batches of
  parsed transformed features (dict keyed by signature input) and labels from TFRecord files.
  It travels inside the ``TrialJob`` to Beam workers; nothing is held in memory between batches.
"""
from __future__ import annotations

import hashlib
import heapq
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from nano_tfx.data import BatchSource

SAMPLE_FILE = "calibration_sample.tfrecord.gz"


def _compression(paths: Sequence[str]) -> str:
    return "GZIP" if paths and all(p.endswith(".gz") for p in paths) else ""


def split_file_pattern(examples_artifact: Any, split: str, what: str = "the transformed examples") -> str:
    """Glob of the TFRecord files of one split of an Examples artifact (clear error if absent;
    ``what`` names the artifact in it)."""
    from tfx.types import artifact_utils

    names = artifact_utils.decode_split_names(examples_artifact.split_names)
    if split not in names:
        raise ValueError(
            f"split {split!r} is not in {what} (splits: {names}); "
            "set calibration_split / evaluation_split to one of them"
        )
    return os.path.join(artifact_utils.get_split_uri([examples_artifact], split), "*")


def _hash_key(record: bytes) -> bytes:
    return hashlib.sha1(record).digest()


def _expand_pattern(pattern: str) -> list[str]:
    from apache_beam.io.filesystems import FileSystems

    files = sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list)
    if not files:
        raise ValueError(f"examples: no files match {pattern!r}")
    return files


def _iter_records(path: str) -> Iterator[bytes]:
    """Stream the records of one (possibly gzipped) TFRecord file, Beam's TFRecord framing."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.io.tfrecordio import _TFRecordUtil

    with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as f:
        while True:
            record = _TFRecordUtil.read_record(f)
            if record is None:
                return
            yield record


class _SmallestOfFile:
    """Per file: the ``n`` records with the smallest content hash (a heap of ``n``: O(n) memory)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, path: str) -> tuple[None, list]:
        return None, heapq.nsmallest(self.n, _iter_records(path), key=_hash_key)


class _MergeAndWrite:
    """Merge the per-file heaps, keep the global ``n`` smallest and write them (sorted) as one
    gzipped TFRecord file. Memory: ``n`` records per input file."""

    def __init__(self, n: int, path: str):
        self.n, self.path = n, path

    def __call__(self, keyed: tuple[None, Iterable[list]]) -> int:
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems
        from apache_beam.io.tfrecordio import _TFRecordUtil

        _, parts = keyed
        records = heapq.nsmallest(self.n, (r for part in parts for r in part), key=_hash_key)
        with FileSystems.create(self.path, compression_type=CompressionTypes.GZIP) as f:
            for record in records:
                _TFRecordUtil.write_record(f, record)
        return len(records)


def sample_records(pipeline: Any, file_pattern: str, sample_size: int, out_dir: str) -> str:
    """Run a Beam pipeline sampling ``sample_size`` records of ``file_pattern`` into ``out_dir``.

    ``pipeline`` is an unstarted ``beam.Pipeline`` (built with the component's Beam args). Files
    are spread over workers, each streams its file keeping a heap of ``sample_size`` (smallest
    content hash: deterministic, whatever the sharding or runner), one GroupByKey merges. Only
    ParDo + GroupByKey (no ``Read`` source, no combiner lifting, no ``finish_bundle`` output),
    so every runner — the DaskRunner included — runs it. Returns the written file's path.
    """
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems

    if not FileSystems.exists(out_dir):
        FileSystems.mkdirs(out_dir)
    path = FileSystems.join(out_dir, SAMPLE_FILE)
    with pipeline as p:
        _ = (
            p
            | "Pattern" >> beam.Create([file_pattern])
            | "Files" >> beam.FlatMap(_expand_pattern)
            | "Spread" >> beam.Reshuffle()
            | "SampleFile" >> beam.Map(_SmallestOfFile(sample_size))
            | "Gather" >> beam.GroupByKey()
            | "MergeWrite" >> beam.Map(_MergeAndWrite(sample_size, path))
        )
    if not FileSystems.exists(path):
        raise RuntimeError(f"calibration sampling wrote no file at {path}")
    return path


class TransformedExamplesSource(BatchSource):
    """Batches ``({input_name: array}, labels)`` from TFRecords of transformed tf.Examples.

    ``features`` maps a signature input name to ``(dtype name, shape without batch)``;
    ``label`` is ``(name, dtype name, shape)`` or None. Plain data only: safe to pickle.
    """

    batched = True

    def __init__(
        self,
        file_pattern: str,
        features: Mapping[str, tuple[str, Sequence[int]]],
        label: tuple[str, str, Sequence[int]] | None,
        batch_size: int = 32,
        limit: int | None = None,
    ):
        self.file_pattern = file_pattern
        self.features = {k: (d, tuple(s)) for k, (d, s) in features.items()}
        self.label = None if label is None else (label[0], label[1], tuple(label[2]))
        self.batch_size = int(batch_size)
        self.limit = limit

    def __repr__(self) -> str:
        return f"TransformedExamplesSource({self.file_pattern!r}, batch={self.batch_size})"

    def _spec(self) -> dict:
        import tensorflow as tf

        spec = {k: tf.io.FixedLenFeature(s, tf.as_dtype(d)) for k, (d, s) in self.features.items()}
        if self.label is not None:
            name, dtype, shape = self.label
            spec[name] = tf.io.FixedLenFeature(shape, tf.as_dtype(dtype))
        return spec

    def files(self) -> list[str]:
        import tensorflow as tf

        files = sorted(tf.io.gfile.glob(self.file_pattern))
        if not files:
            raise ValueError(f"examples: no files match {self.file_pattern!r}")
        return files

    def batches(self) -> Iterator[tuple[dict, Any]]:
        import tensorflow as tf

        files = self.files()
        spec = self._spec()
        ds = tf.data.TFRecordDataset(files, compression_type=_compression(files))
        if self.limit:
            ds = ds.take(self.limit)
        for serialized in ds.batch(self.batch_size):
            parsed = tf.io.parse_example(serialized, spec)
            x = {k: parsed[k].numpy() for k in self.features}
            y = parsed[self.label[0]].numpy() if self.label is not None else None
            yield x, y

    def count(self) -> int:
        return sum(len(next(iter(x.values()))) for x, _ in self.batches())


def feature_layout(
    transformed_feature_spec: Mapping[str, Any], input_names: Sequence[str], label_key: str | None
) -> tuple[dict, tuple | None]:
    """(features, label) descriptions for ``TransformedExamplesSource`` from TFT's feature spec."""
    import tensorflow as tf

    def describe(name: str):
        feature = transformed_feature_spec[name]
        if not isinstance(feature, tf.io.FixedLenFeature):
            raise ValueError(
                f"transformed feature {name!r} is a {type(feature).__name__}; the Quantizer reads dense "
                "(FixedLenFeature) transformed features only"
            )
        return np.dtype(feature.dtype.as_numpy_dtype).name, tuple(feature.shape)

    missing = [n for n in input_names if n not in transformed_feature_spec]
    if missing:
        raise ValueError(
            f"signature inputs {missing} are not transformed features ({sorted(transformed_feature_spec)}); "
            "the quantized signature must take the transformed features by name (see quantizable_signatures)"
        )
    features = {n: describe(n) for n in input_names}
    label = None
    if label_key is not None:
        dtype, shape = describe(label_key)
        label = (label_key, dtype, shape)
    return features, label
