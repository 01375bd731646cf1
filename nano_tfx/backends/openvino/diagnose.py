"""Per-layer diagnosis through OpenVINO's own graph API: ``Model.add_outputs``.

Every weighted op (Convolution/MatMul/...) keeps its friendly name through NNCF, so the same name
finds the op in the FP32 IR and in the quantized model. Its activation input and its output
become extra model outputs of a clone of each model; both clones run on the same batches.

The input is tapped *in front of* the op's own activation ``FakeQuantize``: NNCF's ignored scope
drops that quantizer together with the weights', so its error belongs to the op's row (what
moving the op to FP32 removes). Tapped behind it, an input quantizer that clips a 1000x outlier
channel shows up as input error and the op looks like it adds none (seen on a model whose range
estimate clipped that channel: the culprit ranked last).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from nano_tfx import diagnosis
from nano_tfx.backends.openvino.core import _core


def _activation_input(op):
    """The data input of a weighted op: the one not fed by a constant (weights) subgraph."""
    for i, value in enumerate(op.input_values()):
        node = value.get_node()
        # weights: Constant, or a decompression chain Constant -> Convert -> Subtract/Multiply
        seen, frontier, const = 0, [node], False
        while frontier and seen < 6:
            n = frontier.pop()
            seen += 1
            if n.get_type_name() == "Constant":
                const = True
                break
            if n.get_type_name() in ("Convert", "Multiply", "Subtract", "Reshape", "Transpose", "FakeQuantize"):
                frontier += [v.get_node() for v in n.input_values()]
        if not const or i == 0 and op.get_type_name() != "MatMul":
            return value
    return op.input_value(0)


def _upstream(value):
    """``value`` in front of the activation quantizer NNCF put on it (the value itself if none)."""
    node = value.get_node()
    return node.input_value(0) if node.get_type_name() == "FakeQuantize" else value


def _is_quantized(op) -> bool:
    """NNCF left a FakeQuantize or int8/uint8 weights in front of the op (else: kept in FP32)."""
    frontier, seen = [v.get_node() for v in op.input_values()], 0
    while frontier and seen < 12:
        node = frontier.pop()
        seen += 1
        kind = node.get_type_name()
        if kind == "FakeQuantize":
            return True
        if kind == "Constant" and node.get_element_type().get_type_name() in ("i8", "u8", "i4", "u4"):
            return True
        if kind in ("Convert", "Multiply", "Subtract", "Reshape", "Transpose"):
            frontier += [v.get_node() for v in node.input_values()]
    return False


def _tap(backend, model, names: Sequence[str], input_names: Sequence[str]) -> diagnosis.Tap:
    model = model.clone()
    by_name = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    found = [n for n in names if n in by_name]
    # One tensor may be both a layer's output and the next layer's input, and add_outputs
    # merges duplicates: give every distinct tensor one name of ours and fetch by that name.
    tags: dict[tuple[str, int], str] = {}
    pairs, unique = [], []
    for n in found:
        op = by_name[n]
        pair = []
        for out in (_upstream(_activation_input(op)), op.output(0)):
            key = (out.get_node().get_friendly_name(), out.get_index())
            if key not in tags:
                tags[key] = f"nano_tfx_diag_{len(tags)}"
                out.get_tensor().add_names({tags[key]})
                unique.append(out)
            pair.append(tags[key])
        pairs.append(pair)
    model.add_outputs(unique)
    compiled = _core().compile_model(model, "CPU", backend.compile_config("fp32"))
    request = compiled.create_infer_request()
    in_ports = list(compiled.inputs)
    order = [next(p for p in in_ports if n in p.get_names() or f"{n}:0" in p.get_names()) for n in input_names]
    dtypes = [p.get_element_type().to_dtype() for p in order]

    def tap(batch):
        res = request.infer({p: np.ascontiguousarray(x, dtype=t) for p, x, t in zip(order, batch, dtypes)})
        got = {tag: res[compiled.output(tag)] for tag in tags.values()}
        return {n: (got[x], got[y]) for n, (x, y) in zip(found, pairs)}

    return tap


def diagnose(backend, prepared, candidate, batches: Sequence[Sequence[np.ndarray]]) -> list[dict]:
    if candidate.precision != "int8":
        raise NotImplementedError("openvino: per-layer diagnosis covers INT8 models")
    kinds = {op.get_friendly_name(): op.get_type_name() for op in prepared.model().get_ordered_ops()}
    layers = [(n, kinds.get(n)) for n in prepared.quantizable]
    names = [n for n, _ in layers]
    src = prepared.source
    quantized = {op.get_friendly_name() for op in candidate.model.get_ordered_ops() if _is_quantized(op)}
    layers = [(n, kind) for n, kind in layers if n in quantized]
    names = [n for n, _ in layers]
    fp32 = _tap(backend, prepared.model(), names, src.input_names)
    quant = _tap(backend, candidate.model, names, src.input_names)
    return diagnosis.compare(layers, fp32, quant, batches)
