"""Calibration feeding for ``onnxruntime.quantization`` (ORT's reader protocol)."""
from __future__ import annotations

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
    """Pad shorter batches to the longest one's row count by repeating their own rows.

    ORT's histogram calibrators (Entropy, Percentile, Distribution) stack each tensor's outputs
    of all batches with ``np.asarray`` and fail ("inhomogeneous shape") as soon as one batch
    is shorter, e.g. the last one of a dataset whose size is not a multiple of the batch size.
    Repeating rows leaves min/max unchanged and weights fewer than one batch of rows twice in the
    histograms; splitting every batch to the gcd of the sizes is exact but often means one row
    per inference (497 = 7 x 71 rows in batches of 64: 497 runs, 10x slower).
    Batches whose inputs disagree on their first dimension are left alone.
    """
    per_batch = [{len(a) if np.ndim(a) else None for a in b.values()} for b in batches]
    if any(len(r) != 1 or None in r for r in per_batch):
        return batches
    rows = [next(iter(r)) for r in per_batch]
    full = max(rows, default=0)
    return [b if n == full else {k: a[np.arange(full) % n] for k, a in b.items()} for b, n in zip(batches, rows)]


def _largest_divisor_at_most(n: int, cap: int) -> int:
    for d in range(min(cap, n), 0, -1):
        if n % d == 0:
            return d
    return 1
