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


_AFFINE = ("BiasAdd", "Add", "AddV2", "Mul")
_DEQUANTIZE = ("Requantize", "RequantizePerChannel", "Dequantize")


def _consumers(op) -> list:
    seen: dict[str, object] = {}
    for out in op.outputs:
        for c in out.consumers():
            seen.setdefault(c.name, c)
    return list(seen.values())


def _dynamic(graph) -> set[str]:
    """Ops fed (transitively) by a Placeholder: inputs from anything else are constants."""
    todo = [op for op in graph.get_operations() if op.type == "Placeholder"]
    seen = {op.name for op in todo}
    while todo:
        for c in _consumers(todo.pop()):
            if c.name not in seen:
                seen.add(c.name)
                todo.append(c)
    return seen


def _elementwise_chain(op, dynamic: set[str], passthrough=()) -> list:
    """``op`` and the single-consumer chain of affine ops/activations (one data input each)
    behind it - what INC folds or fuses into a compute op - through ``passthrough`` op types."""
    chain = [op]
    for _ in range(6):
        users = _consumers(chain[-1])
        if len(users) != 1:
            break
        nxt = users[0]
        if nxt.type not in passthrough and nxt.type not in _AFFINE + tuple(_ACTIVATIONS):
            break
        if len({t.op.name for t in nxt.inputs if t.op.name in dynamic}) != 1:
            break  # e.g. a residual Add: its other input carries another layer's error
        chain.append(nxt)
    return chain


def _fused_end(chain: list, fused_type: str, folded_mul: bool) -> str:
    """The FP32 op whose output the fused quantized op produces (``chain``: the compute op and
    its elementwise successors; ``folded_mul``: grappler folded the first Mul, a BN scale)."""
    end = chain[0]
    for i, op in enumerate(chain[1:]):
        if op.type in _ACTIVATIONS:
            # INC's "...AndRelu..." kernels also take Relu6 (the requantize range clips at 6)
            if f"And{op.type}" in fused_type or ("AndRelu" in fused_type and op.type == "Relu6"):
                end = op
            break
        if (op.type == "Mul" and i == 0 and folded_mul) or (op.type != "Mul" and "Bias" in fused_type):
            end = op
        else:
            break
    return end.name


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
        prepared._fp32_graph = getattr(prepared, "fp32_graph", None) or _frozen_graph(prepared.source)
    graph_def, input_nodes, _ = prepared._fp32_graph
    fp32_graph = tf.Graph()
    with fp32_graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    q_graph = candidate._sess.graph
    q_ops = {op.name: op for op in q_graph.get_operations()}
    fp32_dynamic, q_dynamic = _dynamic(fp32_graph), _dynamic(q_graph)
    fp32_names = getattr(prepared, "fp32_nodes", None) or {}
    layers, fp32_fetch, q_fetch = [], {}, {}
    for name in prepared.compute_nodes:  # INC's names (what op_name_dict fallback accepts)
        fused = [op for n, op in q_ops.items() if n.startswith(name + "_eightbit") and "Quantized" in op.type
                 and "Quantize" != op.type and op.type != "QuantizeV2"]
        if not fused:
            continue  # kept in FP32 (fallback) or not quantized by INC
        op = fused[0]
        rng = _range_inputs(op)
        if rng is None:
            continue
        fp_node = fp32_graph.get_operation_by_name(fp32_names.get(name, name))
        fp_chain = _elementwise_chain(fp_node, fp32_dynamic)
        # Where INC's kernel hands a float tensor back (Dequantize, then the FP32 BN offset /
        # activation it did not fuse), compare at the last op both graphs share by name: the
        # Dequantize of a depthwise conv is named after the conv although the BN scale is
        # folded into its weights. Else dequantize the fused op's own (q)uint8 output.
        q_chain = {o.name: o for o in _elementwise_chain(op, q_dynamic, _DEQUANTIZE)[1:]
                   if o.type not in ("Requantize", "RequantizePerChannel")}
        common = [o.name for o in fp_chain if o.name in q_chain]
        if common:
            fp_end, out = common[-1], (q_chain[common[-1]].outputs[0],)
        elif op.outputs[0].dtype in (tf.quint8, tf.qint8) and len(op.outputs) >= 3:
            fp_end, out = _fused_end(fp_chain, op.type, name != fp_node.name), tuple(op.outputs[:3])
        elif op.outputs[0].dtype.is_floating:
            fp_end, out = _fused_end(fp_chain, op.type, name != fp_node.name), (op.outputs[0],)
        else:  # a qint32 accumulator with per-channel ranges we would have to re-derive
            continue
        fp32_fetch[name] = (fp_node.inputs[0], fp32_graph.get_operation_by_name(fp_end).outputs[0])
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
        up = _producer(fp32_graph, fp32_names.get(name, name), compute)
        groups[name] = [name] + ([up] if up else [])
    try:
        return diagnosis.compare(layers, fp32, quant, batches, groups)
    finally:
        fp32_sess.close()
