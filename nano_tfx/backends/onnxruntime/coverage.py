"""INT8 coverage of an ONNX model as ``onnxruntime.quantization`` wrote it (see ``nano_tfx.coverage``).

A compute op runs in INT8 when it is an integer op (QOperator: QLinearMatMul/QLinearConv/QGemm,
dynamic: MatMulInteger/ConvInteger, or a fused contrib op such as DynamicQuantizeMatMul or
QAttention), or, in QDQ form, when its activation and weight inputs both come from
DequantizeLinear nodes: that is the pattern ORT's QDQ fusions turn into integer kernels at
session creation. A MatMul left with one float input stays a float MatMul there.
"""
from __future__ import annotations

from typing import Iterable

from nano_tfx.coverage import Int8Ops, tally

#: integer (or integer-fused) op types: INT8 whatever feeds them
INTEGER_OPS = frozenset({
    "QLinearMatMul", "QLinearConv", "QLinearConvTranspose", "QGemm", "MatMulInteger", "ConvInteger",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "QOrderedMatMul", "QOrderedAttention",
})


def _int8(node, dq_outputs: set[str]) -> bool:
    if node.op_type in INTEGER_OPS:
        return True
    data = [i for i in node.input[:2] if i]  # activation (A / X) and weight (B / W)
    return len(data) == 2 and all(i in dq_outputs for i in data)


def count(nodes: Iterable) -> Int8Ops:
    """``{kind: [int8, total]}`` over ONNX ``NodeProto``s (the main graph's)."""
    nodes = list(nodes)
    dq_outputs = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    return tally((n.op_type, _int8(n, dq_outputs)) for n in nodes)


def count_file(path: str) -> Int8Ops:
    """The coverage of the ONNX file at ``path`` (weights stored outside it are not read)."""
    import onnx

    return count(onnx.load(path, load_external_data=False).graph.node)
