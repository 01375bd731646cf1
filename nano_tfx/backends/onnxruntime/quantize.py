"""Calibration feeding for ``onnxruntime.quantization`` (ORT's reader protocol)."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

#: Calibration batches per collection chunk (ORT keeps every activation of a chunk in RAM
#: before reducing it to ranges/histograms).
_CALIB_CHUNK = 8

# --------------------------------------------------------------------------------------------
# Calibration reader
# --------------------------------------------------------------------------------------------


def _calibration_reader(
    calibration: Iterable[Sequence[np.ndarray]], input_names: Sequence[str], uniform: bool = False
):
    """``calibration`` batches (lists in input order) → an ORT reader with ``set_range``.

    The batches are materialised once (the calibration set is already capped by the engine);
    ORT's strided collection then walks them chunk by chunk. ``uniform``: every batch gets the
    same number of rows (see ``_uniform_batches``), which ORT's histogram calibrators need.
    """
    from onnxruntime.quantization import CalibrationDataReader

    names = list(input_names)

    def feed(batch) -> dict:
        if len(batch) != len(names):
            raise ValueError(
                f"calibration: each batch must hold {len(names)} arrays (inputs {names}), "
                f"got {len(batch)}"
            )
        return {n: np.asarray(a) for n, a in zip(names, batch)}

    class _Reader(CalibrationDataReader):
        def __init__(self):
            batches = [feed(b) for b in calibration]
            self._batches = _uniform_batches(batches) if uniform else batches
            self._pos, self._end = 0, len(self._batches)

        def __len__(self):
            return len(self._batches)

        def set_range(self, start_index: int, end_index: int):
            self._pos, self._end = start_index, min(end_index, len(self._batches))

        def get_next(self):
            if self._pos >= self._end:
                return None
            self._pos += 1
            return self._batches[self._pos - 1]

    return _Reader()


def _uniform_batches(batches: list[dict]) -> list[dict]:
    """Split batches into equal-sized ones (the gcd of their row counts), so that no rows are lost.

    ORT's histogram calibrators (Entropy, Percentile, Distribution) stack each tensor's outputs
    of all batches with ``np.asarray`` and fail ("inhomogeneous shape") as soon as one batch
    is shorter, e.g. the last one of a dataset whose size is not a multiple of the batch size.
    Batches whose inputs disagree on their first dimension are left alone.
    """
    rows = {len(a) if np.ndim(a) else None for b in batches for a in b.values()}
    per_batch = [{len(a) for a in b.values() if np.ndim(a)} for b in batches]
    if None in rows or any(len(r) != 1 for r in per_batch) or len(rows) <= 1:
        return batches
    step = math.gcd(*rows)
    return [{n: a[i:i + step] for n, a in b.items()} for b, (size,) in zip(batches, per_batch)
            for i in range(0, size, step)]


def _largest_divisor_at_most(n: int, cap: int) -> int:
    for d in range(min(cap, n), 0, -1):
        if n % d == 0:
            return d
    return 1
