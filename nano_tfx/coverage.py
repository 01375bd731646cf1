"""INT8 coverage: how many compute-heavy ops of each kind a model runs in INT8.

Every backend counts its own quantized graph (it alone knows what "runs in INT8" means there:
Q/DQ around an ONNX MatMul, an I8/U8 runtime precision in OpenVINO's compiled graph, a
``_Quantized*`` TF kernel) and hands back ``{"MatMul": [int8, total], "Conv": [int8, total]}``.
This module is the one place that names the kinds, so the three engines' op types
(Gemm, FullyConnected, BatchMatMulV2, GroupConvolution, DepthwiseConv2dNative, ...) read alike in
every report, and the one place that words the result for people.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

#: ``{kind: [ops running in INT8, ops of that kind in all]}``; None where a backend can't tell
Int8Ops = dict[str, list[int]]

#: the kinds every count shows, even at [0, 0] (a CNN without MatMul still says so)
ALWAYS = ("MatMul", "Conv")

# First match wins: a fused attention op (ORT Attention/QAttention, OpenVINO SDPA) is its own
# kind, before the MatMul pattern could take QAttention's projection for a plain MatMul.
_KINDS: tuple[tuple[str, re.Pattern], ...] = (
    ("Attention", re.compile(r"Attention$|^MHA$")),
    # MatMul, BatchMatMul(V2/V3), Gemm/QGemm/FusedGemm, Einsum, FullyConnected, QLinearMatMul,
    # MatMulInteger, DynamicQuantizeMatMul, TF's _FusedMatMul / _Quantized*MatMul* kernels
    ("MatMul", re.compile(r"MatMul|Gemm|Einsum|FullyConnected")),
    # Conv/ConvTranspose/ConvInteger/QLinearConv (ONNX), Convolution/GroupConvolution/
    # Deconvolution (OpenVINO), Conv2D/Conv3D/DepthwiseConv2dNative and their fused/quantized
    # TF kernels; not OpenVINO's Convert/ConvertLike (a dtype cast)
    ("Conv", re.compile(r"Conv(?!ert)|[Dd]econvolution")),
)


def op_kind(op_type: str) -> str | None:
    """The compute kind of an engine's op type ("MatMul", "Conv", "Attention"), None for the rest."""
    for kind, pattern in _KINDS:
        if pattern.search(op_type):
            return kind
    return None


def tally(ops: Iterable[tuple[str, bool]]) -> Int8Ops:
    """``(op type, runs in INT8)`` pairs of a graph's ops → ``{kind: [int8, total]}``."""
    counts: Int8Ops = {kind: [0, 0] for kind in ALWAYS}
    for op_type, int8 in ops:
        kind = op_kind(op_type)
        if kind is None:
            continue
        entry = counts.setdefault(kind, [0, 0])
        entry[0] += bool(int8)
        entry[1] += 1
    return counts


def totals(int8_ops: Mapping[str, Iterable[int]]) -> tuple[int, int]:
    """(INT8 ops, compute ops) over every kind."""
    pairs = [tuple(v) for v in int8_ops.values()]
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def short_text(int8_ops: Mapping[str, Iterable[int]] | None) -> str:
    """"1/2 MatMul, 2/2 Conv" (a table cell); "" when unknown."""
    if int8_ops is None:
        return ""
    parts = [f"{v[0]}/{v[1]} {k}" for k, v in ((k, list(v)) for k, v in int8_ops.items()) if v[1]]
    return ", ".join(parts) or "none"


def coverage_text(int8_ops: Mapping[str, Iterable[int]] | None, precision: str | None = None) -> str | None:
    """The coverage in words, e.g. "INT8: 46 of 48 MatMul ops". A result with no op in INT8 says
    so plainly: "INT8: 0 of 3 MatMul ops (the model runs in FP32)".

    ``precision``: the result's precision; a BF16/FP16 result runs in that, an INT8 one without
    INT8 ops in FP32; None (unknown, e.g. ``auto`` without a chosen trial) words it neutrally.
    """
    if int8_ops is None:
        return None
    counts = {k: list(v) for k, v in int8_ops.items()}
    parts = [f"{v[0]} of {v[1]} {k}" for k, v in counts.items() if v[1]]
    if not parts:
        return f"INT8: no {' or '.join(counts or ALWAYS)} ops in the model"
    text = f"INT8: {', '.join(parts)} ops"
    if totals(counts)[0] == 0:
        precision = (precision or "").lower()
        runs = "FP32" if precision in ("int8", "fp32") else precision.upper()
        text += f" (the model runs in {runs})" if runs else " (no op runs in INT8)"
    return text
