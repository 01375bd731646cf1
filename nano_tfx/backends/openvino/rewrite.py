"""Graph rewrites of the ``ov.Model`` NNCF quantizes: ``Einsum`` -> Transpose/Reshape/MatMul, and
a scalar scale after an activation x activation MatMul moved onto its input (``hoist_product_scale``).

OpenVINO's TensorFlow frontend keeps a TF ``Einsum`` as an ``Einsum`` op, which NNCF 2.14 has no
metatype for: it is never quantized (the CPU plugin lowers it to a MatMul only at compile time,
after NNCF placed its quantizers). Keras emits Einsums for ``MultiHeadAttention`` (tf_keras: the
Q/K/V/output projections and both attention products; Keras 3: the two attention products) and
for ``EinsumDense``. Each two-operand Einsum without repeated, ellipsis or summed-away indices is
rewritten here into the equivalent MatMul form (FP32 results unchanged): operands transposed to
``[batch..., M..., K...]`` / ``[batch..., K..., N...]`` (or the transposed layout MatMul reads
with ``transpose_a``/``transpose_b`` when that spares a Transpose), groups merged by Reshape, one
MatMul, Reshape back, Transpose to the output order. A constant operand (a layer's kernel) is
transformed in NumPy, so the MatMul reads a plain ``Constant`` weight (what NNCF quantizes per
channel). The MatMul takes the Einsum's friendly name (fallback names stay stable); the last op
of the chain carries the Einsum's output tensor names. Anything else is left as it was (logged).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from nano_tfx.backends.einsum import label_sizes, operand_layout, parse_einsum

_LOG = logging.getLogger("nano_tfx.backends.openvino")


# --------------------------------------------------------------------------------------------
# OpenVINO rewrite
# --------------------------------------------------------------------------------------------
def _static_dims(output) -> list[int | None] | None:
    ps = output.get_partial_shape()
    if ps.rank.is_dynamic:
        return None
    return [d.get_length() if d.is_static else None for d in ps]


def _reshape_target(in_labels: list[str], groups: list[list[str]], sizes: dict[str, int | None]) -> list[int] | None:
    """Reshape pattern (``special_zero``) from a tensor with per-position labels ``in_labels`` to
    one dim per group in ``groups``; None when it cannot be expressed (two unknown dims)."""
    target: list[int] = []
    unknown = 0
    for pos, group in enumerate(groups):
        if len(group) == 1 and pos < len(in_labels) and in_labels[pos] == group[0]:
            target.append(0)  # same dim at the same position: copied
            continue
        vals = [sizes.get(c) for c in group]
        if any(v is None for v in vals):
            target.append(-1)
            unknown += 1
        else:
            target.append(int(np.prod(vals)) if vals else 1)
    return None if unknown > 1 else target


def _is_constant(output) -> bool:
    return output.get_node().get_type_name() == "Constant"


def _merged(group: Sequence[str], tag: str) -> list[str]:
    """Per-position label of a merged group (the label itself when the group is one dim)."""
    return list(group) if len(group) == 1 else [tag]


def _rewrite_one(node, ops) -> bool:
    equation = node.get_attributes().get("equation", "")
    plan = parse_einsum(equation)
    name = node.get_friendly_name()
    if plan is None:
        _LOG.info("openvino: Einsum %r (%s) is not a two-operand contraction; left as is", name, equation)
        return False
    values = list(node.input_values())
    if len(values) != 2:
        return False
    a_val, b_val = (values[1], values[0]) if plan.swap else (values[0], values[1])
    a_dims, b_dims = _static_dims(a_val), _static_dims(b_val)
    if a_dims is None or b_dims is None or len(a_dims) != len(plan.left) or len(b_dims) != len(plan.right):
        _LOG.info("openvino: Einsum %r has operands of dynamic rank; left as is", name)
        return False
    sizes = label_sizes(plan, a_dims, b_dims)
    batch, m, k, n = plan.batch, plan.m, plan.k, plan.n
    int64 = np.int64

    def operand(val, labels: str, first: list[str], second: list[str], tag: str, keep_first: bool = False):
        """``val`` as ``[batch, first, second]`` (or ``[batch, second, first]`` + True when that
        spares a Transpose), groups merged; ``keep_first``: the ``first`` dims stay unmerged."""
        if _is_constant(val):
            data = val.get_node().get_data()
            perm, _ = operand_layout(labels, batch, first, second, allow_transposed=False)
            if perm is not None:
                data = np.transpose(data, perm)
            shape = [sizes[c] for c in batch] + [int(np.prod([sizes[c] for c in g], dtype=np.int64)) for g in (first, second)]
            return ops.constant(np.ascontiguousarray(data.reshape(shape))).output(0), False
        perm, transposed = operand_layout(labels, batch, first, second, allow_transposed=not keep_first)
        out, order = val, list(labels)
        if perm is not None:
            out = ops.transpose(out, ops.constant(np.array(perm, dtype=int64))).output(0)
            out.get_node().set_friendly_name(f"{name}/{tag}_transpose")
            order = [labels[i] for i in perm]
        lead, trail = (second, first) if transposed else (first, second)
        groups = [[c] for c in batch]
        groups += [[c] for c in lead] if keep_first else [lead]
        groups += [trail]
        if [g[0] if len(g) == 1 else None for g in groups] != order:
            target = _reshape_target(order, groups, sizes)
            if target is None:
                return None
            out = ops.reshape(out, ops.constant(np.array(target, dtype=int64)), True).output(0)
            out.get_node().set_friendly_name(f"{name}/{tag}_reshape")
        return out, transposed

    if not batch and _is_constant(b_val) and not _is_constant(a_val):
        # A layer's kernel: [M..., K] x [K, N] (MatMul broadcasts over the M dims, which
        # therefore stay as they are - no dynamic batch dim has to be merged)
        a_res = operand(a_val, plan.left, m, k, "a", keep_first=True)
        mm_labels = list(m) + _merged(n, "<N>")
    else:
        a_res = operand(a_val, plan.left, m, k, "a")
        mm_labels = list(batch) + _merged(m, "<M>") + _merged(n, "<N>")
    b_res = operand(b_val, plan.right, k, n, "b")
    if a_res is None or b_res is None:
        _LOG.info("openvino: Einsum %r: shapes too dynamic to reshape; left as is", name)
        return False
    (a_out, a_t), (b_out, b_t) = a_res, b_res
    mm = ops.matmul(a_out, b_out, a_t, b_t)
    mm.set_friendly_name(name)
    result = mm.output(0)
    res_labels = list(batch) + list(m) + list(n)
    if mm_labels != res_labels:  # split the merged groups again
        target = _reshape_target(mm_labels, [[c] for c in res_labels], sizes)
        if target is None:
            _LOG.info("openvino: Einsum %r: output shape too dynamic to reshape; left as is", name)
            return False
        result = ops.reshape(result, ops.constant(np.array(target, dtype=int64)), True).output(0)
        result.get_node().set_friendly_name(f"{name}/out_reshape")
    perm = [res_labels.index(c) for c in plan.out]
    if perm != list(range(len(perm))):
        result = ops.transpose(result, ops.constant(np.array(perm, dtype=int64))).output(0)
        result.get_node().set_friendly_name(f"{name}/out_transpose")
    _take_over(node.output(0), result)
    return True


def rewrite_einsum(model) -> int:
    """Rewrite every convertible ``Einsum`` of ``model`` (an ``ov.Model``, in place) into
    Transpose/Reshape/MatMul; returns how many were rewritten."""
    return _each(model, "Einsum", _rewrite_one, "rewrote %d Einsum op(s) into MatMul form")


def _each(model, type_name: str, rewrite, done_message: str) -> int:
    """``rewrite(node, ops)`` on every ``type_name`` op of ``model``; how many it changed. A
    rewrite that raises leaves its op as it was: never fail a conversion over an optimization."""
    import openvino.runtime.opset13 as ops

    done = 0
    for node in list(model.get_ordered_ops()):
        if node.get_type_name() != type_name:
            continue
        try:
            if rewrite(node, ops):
                done += 1
        except Exception as exc:  # noqa: BLE001
            _LOG.info("openvino: %s %r left as it was (%s)", type_name, node.get_friendly_name(), exc)
    if done:
        model.validate_nodes_and_infer_types()
        _LOG.info("openvino: " + done_message, done)
    return done


# --------------------------------------------------------------------------------------------
# scalar scale after an activation x activation MatMul
# --------------------------------------------------------------------------------------------
def _scalar_constant(output) -> float | None:
    node = output.get_node()
    if node.get_type_name() != "Constant":
        return None
    data = np.asarray(node.get_data())
    return float(data.reshape(-1)[0]) if data.size == 1 and data.dtype.kind == "f" else None


def _hoist_one(mm, ops) -> bool:
    a, b = mm.input_values()
    if _is_constant(a) or _is_constant(b):
        return False  # a layer's kernel: NNCF already quantizes weights x activation
    consumers = list(mm.output(0).get_target_inputs())
    if len(consumers) != 1:
        return False
    mul = consumers[0].get_node()
    if mul.get_type_name() != "Multiply":
        return False
    other = [v for v in mul.input_values() if v.get_node() is not mm]
    scale = _scalar_constant(other[0]) if len(other) == 1 else None
    if scale is None:
        return False
    attrs = mm.get_attributes()
    factor = ops.constant(np.array(scale, dtype=np.float32))
    scaled = ops.multiply(a, factor)
    scaled.set_friendly_name(f"{mm.get_friendly_name()}/scaled_a")
    new = ops.matmul(scaled, b, attrs.get("transpose_a", False), attrs.get("transpose_b", False))
    new.set_friendly_name(mm.get_friendly_name())
    _take_over(mul.output(0), new.output(0))
    return True


def _take_over(old, new) -> None:
    """``new`` replaces ``old`` for every consumer and takes its tensor names."""
    names = set(old.get_names())
    for target_input in list(old.get_target_inputs()):
        target_input.replace_source_output(new)
    if names:
        old.get_tensor().set_names(set())
        new.get_tensor().set_names(names)


def hoist_product_scale(model) -> int:
    """``MatMul(a, b) * s`` -> ``MatMul(a * s, b)`` for a scalar constant ``s`` and two activation
    operands (in place); returns how many were moved.

    Why: Keras 3's attention reaches OpenVINO as ``Q·Kᵀ`` followed by the ``1/√d`` Multiply
    (tf_keras scales the query first). NNCF places no quantizer between the two, and the CPU
    plugin fuses the Multiply into the product, which then runs as an FP32 MatMul kernel whatever
    quantizers sit on Q and K. With the scale on the first operand the product's inputs are
    quantized as for tf_keras and the kernel runs in INT8. Same FP32 function (scaling commutes
    with the product); only float round-off differs.
    """
    return _each(model, "MatMul", _hoist_one, "moved %d scalar scale(s) in front of activation x activation MatMuls")
