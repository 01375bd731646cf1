"""Per-layer diagnosis with ONNX Runtime's own debugging tool, ``qdq_loss_debug``.

``modify_model_output_intermediate_tensors`` exposes the inputs and outputs of every weighted
node (Conv/MatMul/Gemm...) as graph outputs, in the pre-processed FP32 model and in the QDQ
model. ORT's QDQ quantizer keeps node names, so a node's output is matched by name; its input in
the QDQ model is the ``DequantizeLinear`` output, i.e. what the quantized layer really sees.
Exposing those tensors keeps ORT from fusing them into QLinear kernels, so the quantized side
computes the same integers in float (what ``qdq_loss_debug`` itself measures).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Sequence

import numpy as np

from nano_tfx import diagnosis
from nano_tfx.backends.base import TrialConfig
from nano_tfx.backends.onnxruntime.space import STATIC_WEIGHTED_OPS


def _tap(path: str, input_names: Sequence[str], nodes: Sequence[str], so) -> diagnosis.Tap:
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.qdq_loss_debug import _TENSOR_SAVE_POSTFIX

    graph = onnx.load(path, load_external_data=False).graph
    io = {n.name: (n.input[0], n.output[0]) for n in graph.node if n.name in set(nodes)}
    sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
    available = {o.name for o in sess.get_outputs()}
    want = sorted({t + _TENSOR_SAVE_POSTFIX for pair in io.values() for t in pair} & available)

    def tap(batch):
        got = dict(zip(want, sess.run(want, dict(zip(input_names, batch)))))
        out = {}
        for name, (x, y) in io.items():
            y = got.get(y + _TENSOR_SAVE_POSTFIX)
            if y is not None:
                out[name] = (got.get(x + _TENSOR_SAVE_POSTFIX), y)
        return out

    return tap


def _quantized_nodes(model_path: str) -> set[str]:
    """Nodes whose weights come out of a ``DequantizeLinear`` (the quantized ones)."""
    import onnx

    graph = onnx.load(model_path, load_external_data=False).graph
    dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in graph.node if len(n.input) > 1 and n.input[1] in dq_outputs}


def _producer_groups(model_path: str, names: Sequence[str]) -> dict[str, list[str]]:
    """Per weighted node, itself plus the nearest weighted node upstream of its data input: ORT
    keeps the Q/DQ pair on a tensor whose producer is quantized, so excluding the consumer alone
    leaves its input quantized (measured: a 1000x outlier input stays destroyed)."""
    import onnx

    graph = onnx.load(model_path, load_external_data=False).graph
    made_by = {out: node for node in graph.node for out in node.output}
    wanted = set(names)
    groups = {}
    for node in graph.node:
        if node.name not in wanted:
            continue
        group, tensor = [node.name], node.input[0]
        for _ in range(12):
            up = made_by.get(tensor)
            if up is None:
                break
            if up.name in wanted:
                group.append(up.name)
                break
            tensor = up.input[0] if up.input else ""
        groups[node.name] = group
    return groups


def diagnose(backend, prepared, candidate, batches: Sequence[Sequence[np.ndarray]]) -> list[dict]:
    from onnxruntime.quantization.qdq_loss_debug import modify_model_output_intermediate_tensors

    config = candidate.config or TrialConfig()
    if candidate.precision != "int8" or config.knob("approach", "static") != "static":
        raise NotImplementedError("onnxruntime: per-layer diagnosis covers static INT8 (QDQ) models")
    model_path = candidate.model_path
    if config.knob("format", "QDQ") != "QDQ":
        # QOperator renames the quantized nodes: measure the same config in QDQ form instead.
        requant = TrialConfig.make({**dict(config.knobs), "format": "QDQ"}, config.fallback)
        candidate = backend.quantize(prepared, "int8", requant, list(batches))
        model_path = candidate.model_path
    layers = [(n, op) for n, op in prepared.nodes if op in STATIC_WEIGHTED_OPS and n]
    quantized = _quantized_nodes(model_path)
    layers = [(n, op) for n, op in layers if n in quantized]  # fallback nodes have no row
    names = [n for n, _ in layers]
    tmp = tempfile.mkdtemp(prefix="diagnose_", dir=prepared.workdir)
    try:
        fp32_aug, q_aug = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        ops = list(STATIC_WEIGHTED_OPS)
        modify_model_output_intermediate_tensors(prepared.model_path, fp32_aug, op_types_for_saving=ops)
        modify_model_output_intermediate_tensors(model_path, q_aug, op_types_for_saving=ops)
        so = backend.session_options()
        fp32 = _tap(fp32_aug, prepared.input_names, names, so)
        quant = _tap(q_aug, prepared.input_names, names, so)
        groups = _producer_groups(prepared.model_path, names)
        return diagnosis.compare(layers, fp32, quant, batches, groups)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
