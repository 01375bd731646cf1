"""Per-layer quantization error, the same numbers for every backend.

A backend's ``diagnose`` taps, for each quantized layer, the tensor entering the layer and the
layer's output, in the FP32 model and in the quantized model. The input is taken in front of the
layer's own input quantizer where falling the layer back removes that quantizer (OpenVINO, ONNX
Runtime): its error, e.g. a range that clips an outlier channel, is then the layer's. INC attaches
an activation's quantization to its producer, so there it is tapped as the layer receives it.
Each backend taps with the engine's own tooling (ONNX Runtime ``qdq_loss_debug``, OpenVINO
``Model.add_outputs``, TF graph tensors for INC). This module turns those pairs into one row per
layer and ranks them.

Why rank by ``added_mse`` and not by ``sqnr_db``: the output error of a layer includes everything
upstream, so every layer behind a bad one looks as bad. ``added_mse`` (relative MSE of the output
minus relative MSE of the input as tapped) is the error the layer itself adds: a layer whose
input holds a 1000x outlier channel adds a relative error near 1 there (the quantization step,
set by the outlier, wipes the other channels, or a range estimate clips the outlier); the layers
behind it add little more.
It is linear rather than in dB so that a layer behind an already noisy one (input SQNR 6 dB,
say on CPUs whose INT8 kernels saturate) is not credited with a large dB drop for a small error.

A layer right behind the culprit can still *amplify* the error it receives (its relative output
error grows even in FP32), which ``added_mse`` alone would credit to it. The ranking key,
``own_error`` = ``added_mse`` x (``added_mse`` / ``mse``), weights the added error by the share of
the layer's output error that starts there: near 1 for a source, small for an amplifier.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from nano_tfx.backends.base import CalibrationData

#: Caps SQNR of exact tensors (noise 0) so that drops stay finite and comparable.
MAX_SQNR_DB = 120.0
#: Elements kept per layer for the outlier percentile (a percentile needs the values).
_SAMPLE = 200_000
#: Bytes of tapped activations (both models, every layer) held at once: a batch is tapped in
#: slices of as many rows as fit, so a large batch (or image model) never holds every layer's
#: activations for all its rows. The sums are exact whatever the slicing.
_TAP_BYTES = 128 * 2 ** 20

Tap = Callable[[Sequence[np.ndarray]], Mapping[str, tuple[np.ndarray | None, np.ndarray]]]


def sqnr_db(signal_power: float, noise_power: float) -> float:
    if noise_power <= 0:
        return MAX_SQNR_DB
    if signal_power <= 0:
        return -MAX_SQNR_DB
    return float(min(MAX_SQNR_DB, max(-MAX_SQNR_DB, 10.0 * math.log10(signal_power / noise_power))))


class _Acc:
    """Running sums for one layer (no activations kept beyond a sample for the percentile)."""

    def __init__(self) -> None:
        self.sig = self.noise = self.in_sig = self.in_noise = 0.0
        self.count = 0
        self.lo, self.hi = math.inf, -math.inf
        self.sample: list[np.ndarray] = []
        self.kept = 0
        self.channel_max: np.ndarray | None = None  # per last-axis channel max |x| of the FP32 input

    def add(self, ref_in, q_in, ref_out, q_out) -> None:
        ref_out = np.asarray(ref_out, np.float64).ravel()
        q_out = np.asarray(q_out, np.float64).ravel()
        if ref_out.shape != q_out.shape:
            return
        good = np.isfinite(ref_out) & np.isfinite(q_out)  # user data may hold NaN/inf
        self.sig += float(np.sum(ref_out[good] ** 2))
        self.noise += float(np.sum((q_out[good] - ref_out[good]) ** 2))
        self.count += int(good.sum())
        if ref_in is None or q_in is None:
            return
        self._channels(ref_in)
        ref_in = np.asarray(ref_in, np.float64).ravel()
        q_in = np.asarray(q_in, np.float64).ravel()
        if ref_in.shape != q_in.shape:
            return
        ok = np.isfinite(ref_in) & np.isfinite(q_in)
        self.in_sig += float(np.sum(ref_in[ok] ** 2))
        self.in_noise += float(np.sum((q_in[ok] - ref_in[ok]) ** 2))
        if ok.any():
            self.lo, self.hi = min(self.lo, float(ref_in[ok].min())), max(self.hi, float(ref_in[ok].max()))
        if self.kept < _SAMPLE:
            part = np.abs(ref_in[ok][: _SAMPLE - self.kept]).astype(np.float32)
            self.sample.append(part)
            self.kept += part.size

    def _channels(self, ref_in) -> None:
        a = np.asarray(ref_in)
        if a.ndim < 2 or a.shape[-1] < 8 or a.dtype.kind != "f":
            return
        top = np.nan_to_num(np.abs(a.reshape(-1, a.shape[-1])).max(axis=0), nan=0.0, posinf=0.0)
        if self.channel_max is None:
            self.channel_max = top
        elif self.channel_max.shape == top.shape:
            self.channel_max = np.maximum(self.channel_max, top)

    def row(self, name: str, op: str | None) -> dict:
        out_db = sqnr_db(self.sig, self.noise)
        # relative MSE: noise power / signal power (capped at 1e6 for a zero signal)
        mse = float(self.noise / self.sig) if self.sig > 0 else (0.0 if self.noise == 0 else 1e6)
        in_mse = float(self.in_noise / self.in_sig) if self.in_sig > 0 else 0.0
        in_db = sqnr_db(self.in_sig, self.in_noise) if self.in_sig or self.in_noise else None
        outlier = spread = None
        if self.sample:
            mags = np.concatenate(self.sample)
            p999 = float(np.percentile(mags, 99.9)) if mags.size else 0.0
            outlier = round(float(mags.max()) / p999, 2) if p999 > 0 else None
            # A whole outlier *channel* is more than 0.1% of the values (p99.9 sits inside it):
            # the max over the typical (median non-zero) magnitude shows it.
            nonzero = mags[mags > 0]
            med = float(np.median(nonzero)) if nonzero.size else 0.0
            spread = round(float(mags.max()) / med, 1) if med > 0 else None
        added = mse - in_mse
        channel = None
        if self.channel_max is not None:
            med = float(np.median(self.channel_max))
            channel = round(float(self.channel_max.max()) / med, 1) if med > 0 else None
        return {
            "name": name,
            "op": op,
            "sqnr_db": round(out_db, 2),
            # relative MSE: noise power / signal power of the layer output
            "mse": mse,
            "added_mse": round(added, 6),
            # the added error weighted by the share of the output error that starts here
            "own_error": round(max(added, 0.0) ** 2 / mse, 6) if mse > 0 else 0.0,
            "input_sqnr_db": None if in_db is None else round(in_db, 2),
            "drop_db": round((in_db if in_db is not None else MAX_SQNR_DB) - out_db, 2),
            "fp32_min": None if self.lo == math.inf else self.lo,
            "fp32_max": None if self.hi == -math.inf else self.hi,
            "outlier_ratio": outlier,  # max |x| / 99.9th percentile |x| of the FP32 input
            "range_ratio": spread,  # max |x| / median non-zero |x| of the FP32 input
            # largest / median per-channel max |x| of the FP32 input (channels: its last axis):
            # activation outlier channels, what SmoothQuant moves into the weights
            "channel_ratio": channel,
        }


def compare(
    layers: Sequence[tuple[str, str | None]],
    fp32: Tap,
    quantized: Tap,
    batches: Iterable[Sequence[np.ndarray]],
    groups: Mapping[str, Sequence[str]] | None = None,
) -> list[dict]:
    """Run both taps on every batch; one row per layer (``layers``: (name, op type)), ranked.

    ``groups``: per layer, the fallback names that remove its error when the backend attaches
    an activation's quantization to its producer (INC); default: the layer alone."""
    accs = {name: _Acc() for name, _ in layers}
    seen = False

    def tap(part) -> float:
        """Tap both models on ``part``, add to the sums; the taps' bytes per row."""
        ref, got = fp32(part), quantized(part)
        for name, acc in accs.items():
            if name in ref and name in got:
                acc.add(ref[name][0], got[name][0], ref[name][1], got[name][1])
        return (_nbytes(ref) + _nbytes(got)) / max(_num_rows(part) or 1, 1)

    rows = None  # rows per tap: as many as _TAP_BYTES holds, from the first row's taps
    for batch in batches:
        seen = True
        if rows is None:
            n = _num_rows(batch)
            sliceable = n is not None and n > 1
            rows = max(1, int(_TAP_BYTES // max(tap([x[:1] for x in batch] if sliceable else list(batch)), 1.0)))
            if not sliceable:
                continue
            batch = [x[1:] for x in batch]
        for part in _slices(batch, rows):
            tap(part)
    if not seen:
        raise ValueError("data: the diagnosis data yielded no batches")
    rows = [accs[n].row(n, op) for n, op in layers if accs[n].count]
    for row in rows:
        row["fallback"] = list((groups or {}).get(row["name"], [row["name"]]))
    return rank(rows)


def _num_rows(batch: Sequence[np.ndarray]) -> int | None:
    """The batch's rows when its inputs agree on the first dimension, else None (not sliced)."""
    rows = {len(x) if np.ndim(x) else None for x in batch}
    return next(iter(rows)) if len(rows) == 1 else None


def _slices(batch: Sequence[np.ndarray], rows: int) -> Iterable[list[np.ndarray]]:
    """``batch`` in slices of at most ``rows`` rows (views; unsliceable batches whole)."""
    n = _num_rows(batch)
    if n is None or n <= rows:
        yield list(batch)
        return
    for i in range(0, n, rows):
        yield [x[i:i + rows] for x in batch]


def _nbytes(taps: Mapping[str, tuple]) -> int:
    """Bytes of the distinct arrays in one tap result."""
    seen: dict[int, int] = {}
    for pair in taps.values():
        for a in pair:
            if a is not None:
                seen[id(a)] = int(getattr(a, "nbytes", 0))
    return sum(seen.values())


def rank(rows: Iterable[dict]) -> list[dict]:
    """Worst first: the most error that starts inside the layer, then the most SQNR lost there."""
    return sorted(rows, key=lambda r: (-(r.get("own_error", r.get("added_mse")) or 0.0),
                                       -(r.get("added_mse") or 0.0), -(r.get("drop_db") or 0.0)))


def rank_by_harm(rows: Iterable[dict], min_gain: float = 0.0) -> list[dict]:
    """Worst first by what the tuner measured (NNCF's criterion), by error where it measured nothing:

    1. ``rescued``: the layer's fallback step turned a collapsed or failed trial into one that
       scores (no gain can be measured against no metric, and none weighs more);
    2. the layer's share of its step's gain (``metric_gain / step_layers``: one step's gain is
       not each of its layers') above ``min_gain``: the step's gain, largest first;
    3. a positive share at or below it: evaluation noise, so the gain does not order these, the
       order of ``rows`` does (the tuner's: the order its strategy picked the layers, from the
       diagnosis fresh at each step);
    4. layers without a measurement, in error order (``rank``);
    5. layers whose fallback did not raise the metric, in error order.

    Equal standing keeps the order of ``rows``. ``min_gain``: the tuner passes twice the drop the
    criterion allows."""
    floor = max(float(min_gain), 0.0)
    tiers: tuple[list[dict], ...] = ([], [], [], [], [])
    for row in rows:
        tiers[_harm_tier(row, floor)].append(row)
    return tiers[0] + sorted(tiers[1], key=lambda r: -r["metric_gain"]) + tiers[2] + rank(tiers[3]) + rank(tiers[4])


def _harm_tier(row: Mapping, floor: float) -> int:
    """0 rescued, 1 share above the noise floor, 2 positive share, 3 not measured, 4 no gain."""
    if row.get("rescued"):
        return 0
    share = _gain_share(row)
    if share is None:
        return 3
    return 1 if share > floor else 2 if share > 0 else 4


def _gain_share(row: Mapping) -> float | None:
    """The layer's share of its fallback step's metric gain (None: not measured)."""
    gain = row.get("metric_gain")
    return None if gain is None else float(gain) / max(int(row.get("step_layers") or 1), 1)


class Batches(CalibrationData):
    """A materialised list of input batches as ``CalibrationData`` (re-iterable)."""

    def __init__(self, batches: Sequence[Sequence[np.ndarray]]):
        self._batches = [list(b) for b in batches]
        self.batch_size = len(self._batches[0][0]) if self._batches and self._batches[0] else 1
        self.num_samples = sum(len(b[0]) for b in self._batches if b)

    def __iter__(self):
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


class FirstSamples(CalibrationData):
    """The first ``max_samples`` rows of ``data`` (a re-iterable of input batches), read lazily on
    every pass: nothing is materialised (the diagnosis of a large-input model would otherwise
    hold all its samples on top of the taps)."""

    def __init__(self, data: Iterable[Sequence[np.ndarray]], max_samples: int):
        self.data, self.max_samples = data, int(max_samples)
        self.batch_size = getattr(data, "batch_size", None) or 1
        self.num_samples = self.max_samples

    def __iter__(self):
        left = self.max_samples
        for batch in self.data:
            if left <= 0:
                return
            xs = [np.asarray(x)[:left] for x in batch]
            left -= len(xs[0]) if xs and xs[0].ndim else 1
            yield xs


def take_samples(data: Iterable[Sequence[np.ndarray]], max_samples: int) -> list[list[np.ndarray]]:
    """At most ``max_samples`` rows of ``data`` (batches of input lists), materialised once."""
    out: list[list[np.ndarray]] = []
    left = int(max_samples)
    for batch in data:
        if left <= 0:
            break
        xs = [np.asarray(x) for x in batch]
        xs = [x[:left] for x in xs]
        out.append(xs)
        left -= len(xs[0]) if xs and xs[0].ndim else 1
    return out


def format_table(layers: Sequence[Mapping], top: int | None = None) -> str:
    """A markdown table of ``layers`` (worst first), for the CLI and logs."""
    cols = ("#", "layer", "op", "SQNR dB", "drop dB", "rel. MSE", "added", "own", "metric gain", "FP32 min", "FP32 max",
            "max/p99.9", "max/median")
    rows = []
    for i, r in enumerate(layers[:top] if top else layers):
        def f(v, spec="{:.3g}"):
            return "" if v is None else spec.format(v)

        rows.append([str(i), str(r.get("name")), str(r.get("op") or ""), f(r.get("sqnr_db"), "{:.1f}"),
                     f(r.get("drop_db"), "{:.1f}"), f(r.get("mse")), f(r.get("added_mse")), f(r.get("own_error")),
                     "rescued" if r.get("rescued") else f(r.get("metric_gain"), "{:+.4g}"),
                     f(r.get("fp32_min")), f(r.get("fp32_max")),
                     f(r.get("outlier_ratio"), "{:.1f}"), f(r.get("range_ratio"), "{:.0f}")])
    head = "| " + " | ".join(cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    return "\n".join([head, sep, *("| " + " | ".join(r) + " |" for r in rows)])
