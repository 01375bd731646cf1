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


def _calibration_reader(calibration: Iterable[Sequence[np.ndarray]], input_names: Sequence[str]):
    """``calibration`` batches (lists in input order) → an ORT reader with ``set_range``.

    The batches are materialised once (the calibration set is already capped by the engine);
    ORT's strided collection then walks them chunk by chunk.
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
            self._batches = [feed(b) for b in calibration]
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


def _largest_divisor_at_most(n: int, cap: int) -> int:
    for d in range(min(cap, n), 0, -1):
        if n % d == 0:
            return d
    return 1
