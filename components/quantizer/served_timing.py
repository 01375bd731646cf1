"""How a served model is called, for ``accelerator='auto'`` / ``precision='auto'`` to choose by.

``nano-tfx serve`` answers a raw tf.Example request by parsing it and running the tf.Transform
graph in TensorFlow, then the engine (``components.serving.servable``). Two engines that are
within a few percent model-only can swap places there: between two engine calls TensorFlow runs
the transform, so an engine whose worker threads spin-wait between calls (ONNX Runtime) stays
warm, one whose threads go to sleep (OpenVINO) pays a wake-up per request (measured with
``benchmarks/serve_bench.py``: OpenVINO ahead model-only, ONNX Runtime ahead served, every run).
So when the Quantizer gets the raw examples, its finalists are timed through this call path
(``nano_tfx.quantize(call_path=...)``) on a few of them, and the fastest served one is chosen.
"""
from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence

import numpy as np

#: raw examples kept for timing (one per call at batch 1; JPEG-sized records stay small)
TIMING_EXAMPLES = 16


def read_raw_examples(file_pattern: str, limit: int = TIMING_EXAMPLES) -> list[bytes]:
    """The first ``limit`` serialized records of a split (ExampleGen writes GZIP TFRecords)."""
    import tensorflow as tf

    files = sorted(tf.io.gfile.glob(file_pattern))
    if not files:
        raise ValueError(f"raw_examples: no files match {file_pattern!r}")
    compression = "GZIP" if files[0].endswith(".gz") else ""
    out: list[bytes] = []
    for record in tf.data.TFRecordDataset(files, compression_type=compression).take(limit):
        out.append(record.numpy())
    if not out:
        raise ValueError(f"raw_examples: the split at {file_pattern!r} has no records")
    return out


def served_call_path(transform_dir: str, raw_keys: Optional[Sequence[str]], examples: Sequence[bytes]):
    """A ``call_path`` for ``nano_tfx.quantize``: each call takes as many raw examples as the
    timed batch has rows (rotating through ``examples``), parses and transforms them as
    ``nano-tfx serve`` does, and runs the candidate on the result."""
    from components.serving.servable import examples_transform

    if not examples:
        raise ValueError("raw_examples: expected at least one serialized tf.Example to time with")
    transforms: dict = {}  # one tf.function per input layout (every finalist has the same one)
    turn = itertools.count()

    def call_path(model: Any):
        layout = tuple((t.name, str(np.dtype(t.dtype))) for t in model.inputs)
        if layout not in transforms:
            transforms[layout] = examples_transform(transform_dir, model.inputs, raw_keys, argument="raw_examples")
        transform, run = transforms[layout], model.run

        def served(x: Sequence[np.ndarray]) -> Any:
            rows = len(x[0]) if len(x) else 1
            start = next(turn)
            batch = np.array([examples[(start + i) % len(examples)] for i in range(rows)], dtype=object)
            return run(transform(batch))

        return served

    return call_path
