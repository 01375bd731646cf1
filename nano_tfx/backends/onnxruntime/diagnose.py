"""Per-layer diagnosis with ONNX Runtime's own debugging tool, ``qdq_loss_debug``.

``modify_model_output_intermediate_tensors`` exposes the inputs and outputs of every weighted
node (Conv/MatMul/Gemm...) as graph outputs, in the pre-processed FP32 model and in the QDQ
model. ORT's QDQ quantizer keeps node names, so a node's output is matched by name. Its input is
tapped in front of the ``QuantizeLinear``/``DequantizeLinear`` pair on it where that tensor is the
FP32 model's: falling the layer back (with its producer, see ``_producer_groups``) removes that
pair, so its error is the layer's (an input quantizer that clips an outlier channel would
otherwise look like upstream error). Where ORT folded a Relu into the pair, the tensor in front of
it is pre-activation and the tap re-applies the Relu; after any other folded activation (Clip) the
input is tapped behind the pair.
Exposing those tensors keeps ORT from fusing them into QLinear kernels, so the quantized side
computes the same integers in float (what ``qdq_loss_debug`` itself measures).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Sequence

import numpy as np

from nano_tfx import diagnosis
from nano_tfx.backends.base import TrialConfig
from nano_tfx.backends.onnxruntime.space import STATIC_WEIGHTED_OPS


Io = dict[str, tuple[str, str, "str | None", "str | None"]]


def _layer_io(path: str, nodes: Sequence[str], fp32: Io | None = None) -> Io:
    """Per node: (input tensor, output tensor, op type making the input, activation folded away
    that the tap re-applies).

    In the QDQ model (``fp32``: the FP32 model's answer) the input is taken in front of its Q/DQ
    pair. ORT folds a Relu into the pair and gives the producer's pre-activation output the
    Relu's name (the producing op tells them apart): the tap then applies the Relu itself. Any
    other mismatch (a folded Clip) is tapped behind the pair."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    made_by = {out: node for node in graph.node for out in node.output}

    def maker(tensor: str) -> str | None:
        return made_by[tensor].op_type if tensor in made_by else None

    wanted = set(nodes)
    io = {}
    for n in graph.node:
        if n.name not in wanted:
            continue
        x, folded = n.input[0], None
        if fp32 is not None and n.name in fp32:
            up, (want, _, want_kind, _) = _upstream(x, made_by), fp32[n.name]
            if up == want and maker(up) == want_kind:
                x = up
            elif up == want and want_kind == "Relu":  # the Relu went into the pair
                x, folded = up, "Relu"
        io[n.name] = (x, n.output[0], maker(x), folded)
    return io


def _tap(path: str, input_names: Sequence[str], io: Io, so) -> diagnosis.Tap:
    import onnxruntime as ort
    from onnxruntime.quantization.qdq_loss_debug import _TENSOR_SAVE_POSTFIX

    sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
    available = {o.name for o in sess.get_outputs()}
    want = sorted({t + _TENSOR_SAVE_POSTFIX for pair in io.values() for t in pair[:2]} & available)

    def tap(batch):
        got = dict(zip(want, sess.run(want, dict(zip(input_names, batch)))))
        out = {}
        for name, (x, y, _, folded) in io.items():
            y = got.get(y + _TENSOR_SAVE_POSTFIX)
            if y is not None:
                x = got.get(x + _TENSOR_SAVE_POSTFIX)
                out[name] = (np.maximum(x, 0) if folded == "Relu" and x is not None else x, y)
        return out

    return tap


def _upstream(tensor: str, made_by: dict) -> str:
    """``tensor`` in front of the QuantizeLinear/DequantizeLinear pair on it (itself if none)."""
    dq = made_by.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return tensor
    q = made_by.get(dq.input[0])
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else tensor


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


def _input_channels(model_path: str, names: Sequence[str]) -> dict[str, int]:
    """Per MatMul/Gemm with a constant 2-D weight, its input channels (the weight's K)."""
    import onnx

    graph = onnx.load(model_path, load_external_data=False).graph
    dims = {i.name: list(i.dims) for i in graph.initializer}
    wanted, out = set(names), {}
    for n in graph.node:
        if n.name in wanted and n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and len(dims.get(n.input[1], ())) == 2:
            k = dims[n.input[1]]
            transposed = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
            out[n.name] = int(k[1] if transposed else k[0])
    return out


def _with_channels(tap: diagnosis.Tap, channels: dict[str, int]) -> diagnosis.Tap:
    """The tap with each linear layer's input (saved flat by ORT's debug outputs) given back its
    channel axis, for the diagnosis' per-channel ``channel_ratio``."""
    def shaped(batch):
        out = tap(batch)
        for name, (x, y) in out.items():
            k = channels.get(name)
            if x is not None and k and np.size(x) % k == 0:
                out[name] = (np.reshape(x, (-1, k)), y)
        return out

    return shaped


def diagnose(backend, prepared, candidate, batches: Sequence[Sequence[np.ndarray]]) -> list[dict]:
    from onnxruntime.quantization.qdq_loss_debug import modify_model_output_intermediate_tensors

    config = candidate.config or TrialConfig()
    if candidate.precision != "int8":
        raise NotImplementedError("onnxruntime: per-layer diagnosis covers INT8 models")
    model_path = candidate.model_path
    if config.knob("approach", "static") == "dynamic":
        # MatMulInteger has no Q/DQ pair to tap: diagnose the same layers in static QDQ form (same
        # weights and fallback; activation ranges calibrated instead of per call). The ranking and
        # the FP32 input statistics (outlier channels) are what the strategy reads.
        from nano_tfx.backends.onnxruntime.space import KNOBS

        static_knobs = {k: v for k, v in config.knobs if k in KNOBS["static"]}
        config = TrialConfig.make({**static_knobs, "approach": "static", "format": "QDQ"}, config.fallback)
        qdq = type(backend)(dataclasses.replace(backend.options, method=None))
        candidate = qdq.quantize(prepared, "int8", config, batches)
        model_path = candidate.model_path
    if config.knob("format", "QDQ") != "QDQ":
        # QOperator renames the quantized nodes: measure the same config in QDQ form instead.
        # (method='qlinear' pins QOperator for the returned model, not for this measurement)
        requant = TrialConfig.make({**dict(config.knobs), "format": "QDQ"}, config.fallback)
        qdq = type(backend)(dataclasses.replace(backend.options, method=None))
        candidate = qdq.quantize(prepared, "int8", requant, batches)
        model_path = candidate.model_path
    layers = [(n, op) for n, op in prepared.nodes if op in STATIC_WEIGHTED_OPS and n]
    quantized = _quantized_nodes(model_path)
    layers = [(n, op) for n, op in layers if n in quantized]  # fallback nodes have no row
    names = [n for n, _ in layers]
    tmp = tempfile.mkdtemp(prefix="diagnose_", dir=prepared.workdir)
    try:
        fp32_aug, q_aug = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        ops = list(STATIC_WEIGHTED_OPS) + ["QuantizeLinear"]  # + the tensors entering Q/DQ pairs
        modify_model_output_intermediate_tensors(prepared.model_path, fp32_aug, op_types_for_saving=ops)
        modify_model_output_intermediate_tensors(model_path, q_aug, op_types_for_saving=ops)
        so = backend.session_options()
        fp32_io = _layer_io(fp32_aug, names)
        fp32 = _with_channels(_tap(fp32_aug, prepared.input_names, fp32_io, so),
                              _input_channels(prepared.model_path, names))
        quant_io = _layer_io(q_aug, names, fp32_io)
        quant = _tap(q_aug, prepared.input_names, quant_io, so)
        groups = _producer_groups(prepared.model_path, names)
        return diagnosis.compare(layers, fp32, quant, batches, groups)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
