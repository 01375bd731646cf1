"""Calibration feeding for ``onnxruntime.quantization`` (ORT's reader protocol)."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

#: At most this many calibration batches per collection chunk.
_CALIB_CHUNK = 8
#: Activation bytes one collection chunk may hold: ORT keeps every collected tensor of a chunk
#: in RAM (and copies it once more while reducing it to ranges/histograms), so a chunk is cut to
#: the rows whose activations fit, whatever the batch size of the data.
_CALIB_BYTES = 192 * 2 ** 20

# --------------------------------------------------------------------------------------------
# Calibration reader
# --------------------------------------------------------------------------------------------


def _rows(batch: dict) -> int | None:
    """The batch's row count when every input agrees on its first dimension, else None."""
    rows = {len(a) if np.ndim(a) else None for a in batch.values()}
    return next(iter(rows)) if len(rows) == 1 else None


def _calibration_reader(
    calibration: Iterable[Sequence[np.ndarray]], input_names: Sequence[str], uniform: bool = False,
    row_bytes: int = 0,
):
    """``calibration`` batches (lists in input order) → a streaming ORT reader with ``set_range``.

    Nothing is materialised: one counting pass learns how many items there are, then ORT's
    strided collection (``stride`` items per chunk, see ``chunk``) pulls them one by one from a
    live pass over the data. ``row_bytes`` (the model's activation bytes per row, 0 unknown)
    caps the rows of an item and of a chunk at ``_CALIB_BYTES``: a batch of 256 images is cut
    into pieces, so memory holds one chunk of activations whatever the calibration or batch size.
    ``uniform``: every item gets the same number of rows (see ``_uniform_batches``), which ORT's
    histogram calibrators need.
    """
    from onnxruntime.quantization import CalibrationDataReader

    names = list(input_names)
    cap = max(1, _CALIB_BYTES // row_bytes) if row_bytes > 0 else None

    def feed(batch) -> dict:
        if len(batch) != len(names):
            raise ValueError(
                f"calibration: each batch must hold {len(names)} arrays (inputs {names}), "
                f"got {len(batch)}"
            )
        return {n: np.asarray(a) for n, a in zip(names, batch)}

    def pieces():
        for batch in calibration:
            item = feed(batch)
            rows = _rows(item)
            if cap is None or rows is None or rows <= cap:
                yield item
                continue
            for i in range(0, rows, cap):
                yield {k: a[i:i + cap] for k, a in item.items()}

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._sizes = [_rows(item) for item in pieces()]  # the counting pass (row counts only)
            known = [r for r in self._sizes if r is not None]
            self._full = max(known, default=0)
            self._uniform = uniform and len(known) == len(self._sizes)
            self._pos, self._end = 0, len(self._sizes)
            self._live, self._live_pos = None, 0

        def __len__(self):
            return len(self._sizes)

        @property
        def stride(self) -> int:
            """Items per collection chunk: at most ``_CALIB_CHUNK``, and within the byte budget."""
            per = cap // max(self._full, 1) if cap is not None else _CALIB_CHUNK
            return _largest_divisor_at_most(len(self), max(1, min(_CALIB_CHUNK, per)))

        def set_range(self, start_index: int, end_index: int):
            self._pos, self._end = start_index, min(end_index, len(self._sizes))

        def get_next(self):
            if self._pos >= self._end:
                return None
            if self._live is None or self._live_pos != self._pos:  # ORT walks forward: rarely
                self._live, self._live_pos = pieces(), 0
                for _ in range(self._pos):
                    next(self._live)
                    self._live_pos += 1
            item = next(self._live)
            self._live_pos += 1
            self._pos += 1
            n = self._sizes[self._pos - 1]
            if self._uniform and n != self._full:
                item = {k: a[np.arange(self._full) % n] for k, a in item.items()}
            return item

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
