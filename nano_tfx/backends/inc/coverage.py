"""INT8 coverage of the TF GraphDef INC returns (see ``nano_tfx.coverage``).

INC replaces what it quantizes by TF's quantized kernels, all named ``*Quantized*``
(``_QuantizedMatMul``, ``_FusedQuantizedConv2D``, ``_QuantizedDepthwiseConv2D``,
``QuantizedMatMulWithBiasAndRelu...``); what it leaves in FP32 keeps a float op (``MatMul``,
``_FusedMatMul``, ``Conv2D``, ``_FusedConv2D``, ``DepthwiseConv2dNative``, ``BatchMatMulV2``,
``Einsum``). The graph's function library is searched too: ops can hide in functions.
"""
from __future__ import annotations

from typing import Iterable

from nano_tfx.coverage import Int8Ops, tally


def _ops(graph_def) -> Iterable[str]:
    for node in graph_def.node:
        yield node.op
    for fn in graph_def.library.function:
        for node in fn.node_def:
            yield node.op


def count(graph_def) -> Int8Ops:
    """``{kind: [int8, total]}`` over every node of ``graph_def`` and its functions."""
    return tally((op, "Quantized" in op) for op in _ops(graph_def))
