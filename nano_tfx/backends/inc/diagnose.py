"""Per-layer diagnosis of INC's INT8 TF graph against the frozen FP32 graph, by node name.

INC names a fused quantized layer after the FP32 compute node it replaces
(``<node>_eightbit_requantize``, ``<node>_eightbit_quantized_...``) - ``<node>`` is also what
``op_name_dict`` fallback accepts. Both graphs run in TF sessions: on the FP32 side we fetch the
node's input and the end of the chain INC fused into it (BiasAdd, Relu...); on the INT8 side the
fused op's input and output with their ``min``/``max`` range tensors, dequantized the way TF's
``Dequantize`` reads them (quint8: ``min + q * (max - min) / 255``; qint8 SCALED:
``q * max(|min|, |max|) / 127``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from nano_tfx import diagnosis

_ACTIVATIONS = {"Relu": "Relu", "Relu6": "Relu6", "LeakyRelu": "LeakyRelu", "Elu": "Elu", "Sigmoid": "Sigmoid"}


def _dequantize(q: np.ndarray, lo, hi) -> np.ndarray:
    lo, hi = float(np.min(lo)), float(np.max(hi))
    if q.dtype.name in ("quint8", "uint8") or str(q.dtype) == "quint8":
        return lo + q.astype(np.float64) * (hi - lo) / 255.0
    if q.dtype.kind in "iu" or "qint" in str(q.dtype):
        return q.astype(np.float64) * max(abs(lo), abs(hi)) / 127.0
    return q.astype(np.float64)


def _fused_end(graph, node: str, fused_type: str) -> str:
    """The FP32 op whose output the fused quantized op produces."""
    by_input: dict[str, list] = {}
    for op in graph.get_operations():
        for t in op.inputs:
            by_input.setdefault(t.op.name, []).append(op)
    end = node
    wanted = ["BiasAdd", "AddV2", "Add"] if "Bias" in fused_type else []
    wanted += [v for k, v in _ACTIVATIONS.items() if f"And{k}" in fused_type]
    for _ in range(3):
        nxt = [c for c in by_input.get(end, []) if c.type in wanted]
        if len(by_input.get(end, [])) != 1 or not nxt:
            break
        wanted = [w for w in wanted if w not in ("BiasAdd", "AddV2", "Add")] if nxt[0].type in ("BiasAdd", "AddV2", "Add") else []
        end = nxt[0].name
    return end


def _producer(graph, node: str, compute: set[str]) -> str | None:
    """The nearest compute node upstream of ``node``'s data input (through Relu, BiasAdd...)."""
    frontier, seen = [graph.get_operation_by_name(node).inputs[0].op], 0
    while frontier and seen < 12:
        op = frontier.pop(0)
        seen += 1
        if op.name in compute:
            return op.name
        if op.type not in ("Placeholder", "Const"):
            frontier += [t.op for t in op.inputs[:1]]
    return None


def _range_inputs(op) -> tuple[int, int] | None:
    names = [a.name for a in op.op_def.input_arg]
    for lo, hi in (("min_a", "max_a"), ("min_input", "max_input"), ("min_x", "max_x")):
        if lo in names and hi in names:
            return names.index(lo), names.index(hi)
    return None


def diagnose(backend, prepared, candidate, batches: Sequence[Sequence[np.ndarray]]) -> list[dict]:
    import tensorflow as tf

    from nano_tfx.backends.inc.convert import _frozen_graph

    if getattr(prepared, "_fp32_graph", None) is None:
        prepared._fp32_graph = _frozen_graph(prepared.source)
    graph_def, input_nodes, _ = prepared._fp32_graph
    fp32_graph = tf.Graph()
    with fp32_graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    q_graph = candidate._sess.graph
    q_ops = {op.name: op for op in q_graph.get_operations()}
    layers, fp32_fetch, q_fetch = [], {}, {}
    for name in prepared.compute_nodes:
        fused = [op for n, op in q_ops.items() if n.startswith(name + "_eightbit") and "Quantized" in op.type
                 and "Quantize" != op.type and op.type != "QuantizeV2"]
        if not fused:
            continue  # kept in FP32 (fallback) or not quantized by INC
        op = fused[0]
        rng = _range_inputs(op)
        if rng is None:
            continue
        fp_node = fp32_graph.get_operation_by_name(name)
        fp32_fetch[name] = (fp_node.inputs[0], fp32_graph.get_operation_by_name(_fused_end(fp32_graph, name, op.type)).outputs[0])
        out = (op.outputs[0],) + ((op.outputs[1], op.outputs[2]) if len(op.outputs) >= 3 else ())
        q_fetch[name] = ((op.inputs[0], op.inputs[rng[0]], op.inputs[rng[1]]), out)
        layers.append((name, fp_node.type))

    fp32_sess = tf.compat.v1.Session(graph=fp32_graph)
    fp32_feeds = [fp32_graph.get_tensor_by_name(f"{n}:0") for n in input_nodes]
    q_feeds = candidate._feeds

    def fp32(batch):
        got = fp32_sess.run(fp32_fetch, dict(zip(fp32_feeds, batch)))
        return {n: (np.asarray(x, np.float64), np.asarray(y, np.float64)) for n, (x, y) in got.items()}

    def quant(batch):
        got = candidate._sess.run(q_fetch, dict(zip(q_feeds, batch)))
        out = {}
        for n, (x, y) in got.items():
            xin = _dequantize(np.asarray(x[0]), x[1], x[2])
            yout = _dequantize(np.asarray(y[0]), y[1], y[2]) if len(y) == 3 else np.asarray(y[0], np.float64)
            out[n] = (xin, yout)
        return out

    # INC quantizes an activation in its *producer's* fused op (``..._eightbit_requantize``): a
    # layer's input error goes away only when the producer is kept in FP32 too.
    compute = set(prepared.compute_nodes)
    groups = {}
    for name, _ in layers:
        up = _producer(fp32_graph, name, compute)
        groups[name] = [name] + ([up] if up else [])
    try:
        return diagnosis.compare(layers, fp32, quant, batches, groups)
    finally:
        fp32_sess.close()
