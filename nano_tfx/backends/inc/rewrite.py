"""Einsum / 3-D BatchMatMulV2 -> 2-D MatMul in the frozen TF graph INC quantizes.

INC 3.7 on stock TensorFlow quantizes ``MatMul`` (2-D, constant weight), ``Conv2D``,
``DepthwiseConv2dNative``, ``ConcatV2`` and pooling - never ``Einsum`` nor ``BatchMatMulV2``.
Keras lowers its transformer layers to exactly those two:

* tf_keras ``MultiHeadAttention`` / ``EinsumDense``: ``Einsum`` for the Q/K/V/output projections
  (``abc,cde->abde``, ``abcd,cde->abe``) and the two attention products.
* Keras 3 ``EinsumDense`` (the MHA projections) and ``Dense`` on a 3-D input:
  ``BatchMatMulV2(x[..., K], W[K, N])``; Keras 3 MHA's attention products: ``Einsum``.

``rewrite_graph_def`` rewrites, with FP32 results unchanged:

* an Einsum with one constant operand (a kernel), no batch label: Transpose (if needed) ->
  Reshape to ``[-1, K]`` -> ``MatMul`` with the kernel folded to ``[K, N]`` -> Reshape back ->
  Transpose (if needed). A following bias (``BiasAdd``/``AddV2`` of a constant over the N dims)
  moves in front of the Reshape back, as a ``BiasAdd`` INC fuses into its quantized MatMul;
* a ``BatchMatMulV2`` whose right operand is a constant matrix (and left operand of rank >= 3):
  the same Reshape/MatMul/Reshape (+ bias) form;
* an Einsum of two activations (attention): Transpose -> ``BatchMatMulV2`` (adj_x/adj_y) ->
  Transpose. Still not an INC-quantizable op (INC has no activation x activation INT8 MatMul on
  stock TF), but a standard op oneDNN runs directly instead of the generic Einsum kernel.

The 2-D ``MatMul`` keeps the original node's name (fallback names stay stable); new nodes are
named ``<original>/nano_<role>``. Unsupported equations and nodes the signature outputs are left
as they are. ``rewrite_saved_model`` writes the rewritten graph as a SavedModel (what INC's
``fit`` takes, see ``backend.py``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from nano_tfx.backends.einsum import EinsumPlan, label_sizes, operand_layout, parse_einsum
from nano_tfx.backends.inc.convert import save_graph_def_lean

_LOG = logging.getLogger("nano_tfx.backends.inc")

#: ops whose output is constant when all their inputs are (kernel reshapes/casts of Keras)
_FOLDABLE = frozenset({"Const", "Identity", "Reshape", "Transpose", "Cast", "ExpandDims", "Squeeze", "Pack",
                       "ConcatV2", "StridedSlice", "Mul", "AddV2", "Sub", "RealDiv", "Neg"})


@dataclass
class RewriteStats:
    einsum_to_matmul: int = 0  # Einsum with a constant operand -> 2-D MatMul
    einsum_to_batch_matmul: int = 0  # Einsum of two activations -> BatchMatMulV2
    batch_matmul_to_matmul: int = 0  # BatchMatMulV2 with a constant matrix -> 2-D MatMul
    biases_moved: int = 0  # bias adds now directly behind the MatMul
    skipped: list = field(default_factory=list)  # (node, reason)

    @property
    def changed(self) -> int:
        return self.einsum_to_matmul + self.einsum_to_batch_matmul + self.batch_matmul_to_matmul


_EXT = "\x00ext:"  # marks an input of a new node that refers to the original graph


def _ext(ref: str) -> str:
    return _EXT + ref


def _src(name: str) -> str:
    """Node name of an input reference (``^ctrl``, ``node:1``)."""
    return name.lstrip("^").split(":")[0]


class _Builder:
    def __init__(self, graph_def):
        import tensorflow as tf

        self.tf = tf
        self.gd = graph_def
        self.by_name = {n.name: n for n in graph_def.node}
        self.graph = tf.Graph()
        with self.graph.as_default():
            tf.compat.v1.import_graph_def(graph_def, name="")
        self._sess = None
        self._const: dict[str, bool] = {}
        self.new_nodes: list = []
        self.removed: set[str] = set()
        self.renames: dict[str, str] = {}  # old "node" / "node:0" -> new tensor
        self.consumers: dict[str, list] = {}
        for n in graph_def.node:
            for i in n.input:
                self.consumers.setdefault(_src(i), []).append(n)

    # ---- graph facts -------------------------------------------------------------------------
    def shape(self, ref: str) -> list[int | None] | None:
        t = self.graph.get_tensor_by_name(ref if ":" in ref else f"{ref}:0")
        if t.shape.rank is None:
            return None
        return [d if d is None else int(d) for d in t.shape.as_list()]

    def dtype(self, ref: str):
        return self.graph.get_tensor_by_name(ref if ":" in ref else f"{ref}:0").dtype

    def is_constant(self, name: str, depth: int = 0) -> bool:
        name = _src(name)
        if name not in self._const:
            node = self.by_name.get(name)
            ok = node is not None and node.op in _FOLDABLE and depth < 16
            if ok and node.op != "Const":
                inputs = [i for i in node.input if not i.startswith("^")]
                ok = bool(inputs) and all(self.is_constant(i, depth + 1) for i in inputs)
            self._const[name] = ok
        return self._const[name]

    def value(self, ref: str) -> np.ndarray:
        if self._sess is None:
            self._sess = self.tf.compat.v1.Session(graph=self.graph)
        return self._sess.run(self.graph.get_tensor_by_name(ref if ":" in ref else f"{ref}:0"))

    def close(self):
        if self._sess is not None:
            self._sess.close()

    # ---- node factories ----------------------------------------------------------------------
    def _node(self, name: str, op: str, inputs: Sequence[str], **attrs):
        node = self.tf.compat.v1.NodeDef(name=name, op=op, input=list(inputs))
        for key, val in attrs.items():
            node.attr[key].CopyFrom(val)
        self.new_nodes.append(node)
        return name

    def _attr_type(self, dtype):
        return self.tf.compat.v1.AttrValue(type=dtype.as_datatype_enum)

    def const(self, name: str, value: np.ndarray) -> str:
        tf = self.tf
        value = np.asarray(value)
        return self._node(name, "Const", [], dtype=self._attr_type(tf.as_dtype(value.dtype)),
                          value=tf.compat.v1.AttrValue(tensor=tf.make_tensor_proto(value)))

    def transpose(self, name: str, x: str, perm: Sequence[int], dtype) -> str:
        p = self.const(f"{name}/perm", np.array(perm, dtype=np.int32))
        return self._node(name, "Transpose", [x, p], T=self._attr_type(dtype), Tperm=self._attr_type(self.tf.int32))

    def reshape(self, name: str, x: str, shape, dtype) -> str:
        """``shape``: a list of ints (one -1 at most) or a tensor name (int32 vector)."""
        s = shape if isinstance(shape, str) else self.const(f"{name}/shape", np.array(shape, dtype=np.int32))
        return self._node(name, "Reshape", [x, s], T=self._attr_type(dtype), Tshape=self._attr_type(self.tf.int32))

    def matmul(self, name: str, a: str, b: str, dtype, transpose_b: bool = False) -> str:
        tf = self.tf
        return self._node(name, "MatMul", [a, b], T=self._attr_type(dtype),
                          transpose_a=tf.compat.v1.AttrValue(b=False), transpose_b=tf.compat.v1.AttrValue(b=transpose_b))

    def batch_matmul(self, name: str, a: str, b: str, dtype, adj_x: bool, adj_y: bool) -> str:
        tf = self.tf
        return self._node(name, "BatchMatMulV2", [a, b], T=self._attr_type(dtype),
                          adj_x=tf.compat.v1.AttrValue(b=adj_x), adj_y=tf.compat.v1.AttrValue(b=adj_y))

    def bias_add(self, name: str, x: str, bias: str, dtype) -> str:
        tf = self.tf
        return self._node(name, "BiasAdd", [x, bias], T=self._attr_type(dtype),
                          data_format=tf.compat.v1.AttrValue(s=b"NHWC"))

    def output_shape(self, name: str, x: str, lead_positions: Sequence[int], lead: Sequence[int | None],
                     tail: Sequence[int], dtype):
        """Shape ``[x.shape[p] for p in lead_positions] + tail`` as a Reshape target: a constant
        list when at most one dim is unknown, else computed from ``Shape(x)`` at run time."""
        if sum(d is None for d in lead) <= 1:
            return [-1 if d is None else d for d in lead] + list(tail)
        tf = self.tf
        shape = self._node(f"{name}/in_shape", "Shape", [x], T=self._attr_type(dtype),
                           out_type=self._attr_type(tf.int32))
        idx = self.const(f"{name}/lead_idx", np.array(lead_positions, dtype=np.int32))
        axis0 = self.const(f"{name}/axis0", np.array(0, dtype=np.int32))
        lead_t = self._node(f"{name}/lead", "GatherV2", [shape, idx, axis0], Tparams=self._attr_type(tf.int32),
                            Tindices=self._attr_type(tf.int32), Taxis=self._attr_type(tf.int32),
                            batch_dims=tf.compat.v1.AttrValue(i=0))
        tail_t = self.const(f"{name}/tail", np.array(list(tail), dtype=np.int32))
        axis = self.const(f"{name}/concat_axis", np.array(0, dtype=np.int32))
        return self._node(f"{name}/target", "ConcatV2", [lead_t, tail_t, axis], T=self._attr_type(tf.int32),
                          Tidx=self._attr_type(tf.int32), N=tf.compat.v1.AttrValue(i=2))

    # ---- bias -------------------------------------------------------------------------------
    def bias_after(self, node, n_shape: Sequence[int], keep: set[str]):
        """``(add node, flat bias)`` when ``node``'s only consumer adds a constant over its
        trailing ``n_shape`` dims (a layer's bias), else None."""
        users = self.consumers.get(node.name, [])
        if len(users) != 1 or users[0].op not in ("BiasAdd", "AddV2", "Add") or users[0].name in keep:
            return None
        add = users[0]
        inputs = [i for i in add.input if not i.startswith("^")]
        if len(inputs) != 2 or len(add.input) != 2:
            return None
        other = [i for i in inputs if _src(i) != node.name]
        if len(other) != 1 or not self.is_constant(other[0]) or (add.op == "BiasAdd" and _src(inputs[0]) != node.name):
            return None
        bias = self.value(other[0])
        size = int(np.prod(n_shape))
        trailing = list(bias.shape)
        while trailing and trailing[0] == 1 and len(trailing) > len(n_shape):
            trailing = trailing[1:]
        if trailing != list(n_shape) or bias.size != size:
            return None
        return add, bias.reshape(size)


def _bias_or_none(b: _Builder, node, n_shape, keep, stats):
    if not n_shape or any(d is None for d in n_shape):
        return None
    found = b.bias_after(node, n_shape, keep)
    if found is not None:
        stats.biases_moved += 1
    return found


def _rewrite_const_einsum(b: _Builder, node, plan: EinsumPlan, act: str, kernel: str, keep, stats) -> bool:
    """``act`` (plan.left) x constant ``kernel`` (plan.right), no batch labels -> 2-D MatMul."""
    name, dtype = node.name, b.dtype(act)
    a_shape = b.shape(act)
    w = b.value(kernel)
    if a_shape is None or len(a_shape) != len(plan.left):
        return False
    sizes = dict(zip(plan.left, a_shape))
    sizes.update({c: int(d) for c, d in zip(plan.right, w.shape)})
    m, k, n = plan.m, plan.k, plan.n
    if any(sizes[c] is None for c in k):
        return False
    perm, _ = operand_layout(plan.left, [], m, k, allow_transposed=False)
    x = _ext(act)
    if perm is not None:
        x = b.transpose(f"{name}/nano_in_transpose", x, perm, dtype)
    k_size = int(np.prod([sizes[c] for c in k]))
    n_size = int(np.prod([sizes[c] for c in n]))
    x2 = b.reshape(f"{name}/nano_in_reshape", x, [-1, k_size], dtype)
    wperm, _ = operand_layout(plan.right, [], k, n, allow_transposed=False)
    w = np.transpose(w, wperm) if wperm is not None else w
    weight = b.const(f"{name}/nano_kernel", np.ascontiguousarray(w.reshape(k_size, n_size)))
    out_perm = plan.out_perm()
    bias = _bias_or_none(b, node, [sizes[c] for c in n], keep, stats) if out_perm is None else None
    mm_name = name
    y = b.matmul(mm_name, x2, weight, dtype)
    last = node
    if bias is not None:
        add, flat = bias
        y = b.bias_add(f"{add.name}/nano_bias_add", y, b.const(f"{add.name}/nano_bias", flat.astype(w.dtype)), dtype)
        last = add
    target = b.output_shape(f"{name}/nano_out_reshape", x, list(range(len(m))), [sizes[c] for c in m],
                            [sizes[c] for c in n], dtype)
    y = b.reshape(f"{name}/nano_out_reshape", y, target, dtype)
    if out_perm is not None:
        y = b.transpose(f"{name}/nano_out_transpose", y, out_perm, dtype)
    _replace(b, node, last, y)
    stats.einsum_to_matmul += 1
    return True


def _rewrite_act_einsum(b: _Builder, node, plan: EinsumPlan, left: str, right: str) -> bool:
    """Two activations -> Transpose + BatchMatMulV2 (+ Reshape when groups merge) + Transpose."""
    name, dtype = node.name, b.dtype(left)
    sa, sb = b.shape(left), b.shape(right)
    if sa is None or sb is None:
        return False
    sizes = label_sizes(plan, sa, sb)
    batch, m, k, n = plan.batch, plan.m, plan.k, plan.n
    batch_dims = [sizes[c] for c in batch]

    def operand(x, labels, first, second, tag):
        perm, flipped = operand_layout(labels, batch, first, second)
        if perm is not None:
            x = b.transpose(f"{name}/nano_{tag}_transpose", x, perm, dtype)
        lead, trail = (second, first) if flipped else (first, second)
        if len(lead) != 1 or len(trail) != 1:
            dims = batch_dims + [int(np.prod([sizes[c] for c in g])) if all(sizes[c] is not None for c in g) else None
                                 for g in (lead, trail)]
            if sum(d is None for d in dims) > 1:
                return None
            x = b.reshape(f"{name}/nano_{tag}_reshape", x, [-1 if d is None else d for d in dims], dtype)
        return x, flipped

    ra = operand(_ext(left), plan.left, m, k, "a")
    rb = operand(_ext(right), plan.right, k, n, "b")
    if ra is None or rb is None:
        return False
    y = b.batch_matmul(name, ra[0], rb[0], dtype, ra[1], rb[1])
    res = list(batch) + list(m) + list(n)
    if len(m) != 1 or len(n) != 1:
        dims = [sizes[c] for c in res]
        if sum(d is None for d in dims) > 1:
            return False
        y = b.reshape(f"{name}/nano_out_reshape", y, [-1 if d is None else d for d in dims], dtype)
    perm = [res.index(c) for c in plan.out]
    if perm != list(range(len(perm))):
        y = b.transpose(f"{name}/nano_out_transpose", y, perm, dtype)
    _replace(b, node, node, y)
    return True


def _rewrite_batch_matmul(b: _Builder, node, keep, stats) -> bool:
    """``BatchMatMulV2(x[..., K], W[K, N])`` (W constant) -> Reshape/MatMul(/BiasAdd)/Reshape."""
    if node.attr["adj_x"].b:
        return False
    x, w_ref = [i for i in node.input if not i.startswith("^")][:2]
    if not b.is_constant(w_ref):
        return False
    xs, ws = b.shape(x), b.shape(w_ref)
    if xs is None or ws is None or len(ws) != 2 or len(xs) < 3 or xs[-1] is None:
        return False
    name, dtype = node.name, b.dtype(x)
    adj_y = bool(node.attr["adj_y"].b)
    w = b.value(w_ref)
    n_size = int(w.shape[0] if adj_y else w.shape[1])
    x2 = b.reshape(f"{name}/nano_in_reshape", _ext(x), [-1, int(xs[-1])], dtype)
    weight = b.const(f"{name}/nano_kernel", np.ascontiguousarray(w))
    y = b.matmul(name, x2, weight, dtype, transpose_b=adj_y)
    last = node
    bias = _bias_or_none(b, node, [n_size], keep, stats)
    if bias is not None:
        add, flat = bias
        y = b.bias_add(f"{add.name}/nano_bias_add", y, b.const(f"{add.name}/nano_bias", flat.astype(w.dtype)), dtype)
        last = add
    target = b.output_shape(f"{name}/nano_out_reshape", _ext(x), list(range(len(xs) - 1)), xs[:-1], [n_size], dtype)
    y = b.reshape(f"{name}/nano_out_reshape", y, target, dtype)
    _replace(b, node, last, y)
    stats.batch_matmul_to_matmul += 1
    return True


def _replace(b: _Builder, node, last, new_output: str) -> None:
    """Drop ``node`` (and ``last``, the bias add folded in); their readers read ``new_output``."""
    b.removed.add(node.name)
    b.removed.add(last.name)
    if new_output != last.name:  # else the new op took the name: its readers are already right
        b.renames[last.name] = new_output
        b.renames[f"{last.name}:0"] = new_output


def rewrite_graph_def(graph_def, keep: Sequence[str] = ()) -> tuple:
    """``(new GraphDef, RewriteStats)``: Einsum / 3-D BatchMatMulV2 rewritten (see module doc).
    ``keep``: node names that must survive (the signature's outputs)."""
    import tensorflow as tf

    keep_set = {_src(k) for k in keep}
    b = _Builder(graph_def)
    stats = RewriteStats()
    try:
        for node in graph_def.node:
            if node.name in keep_set or node.name in b.removed:
                continue
            # a rewrite that gives up half-way must leave no node behind (the MatMul would
            # otherwise clash with the original's name)
            mark, biases = len(b.new_nodes), stats.biases_moved
            try:
                if node.op == "Einsum":
                    inputs = [i for i in node.input if not i.startswith("^")]
                    plan = parse_einsum(node.attr["equation"].s.decode())
                    if plan is None or len(inputs) != 2:
                        stats.skipped.append((node.name, f"equation {node.attr['equation'].s.decode()!r}"))
                        continue
                    left, right = (inputs[1], inputs[0]) if plan.swap else (inputs[0], inputs[1])
                    lc, rc = b.is_constant(left), b.is_constant(right)
                    done = False
                    if lc != rc and not plan.batch:
                        act, kernel = (left, right) if rc else (right, left)
                        const_plan = plan if rc else EinsumPlan(plan.right, plan.left, plan.out, not plan.swap)
                        done = _rewrite_const_einsum(b, node, const_plan, act, kernel, keep_set, stats)
                    elif not lc and not rc:
                        done = _rewrite_act_einsum(b, node, plan, left, right)
                        stats.einsum_to_batch_matmul += int(done)
                    if not done:
                        stats.skipped.append((node.name, "shapes or operands not supported"))
                elif node.op == "BatchMatMulV2":
                    done = _rewrite_batch_matmul(b, node, keep_set, stats)
                else:
                    continue
            except Exception as exc:  # an optimization never fails the preparation
                _LOG.info("inc: %s %r not rewritten (%s)", node.op, node.name, exc)
                stats.skipped.append((node.name, str(exc)))
                done = False
            if not done:
                del b.new_nodes[mark:]
                stats.biases_moved = biases
        if not stats.changed:
            return graph_def, stats
        out = tf.compat.v1.GraphDef()
        out.versions.CopyFrom(graph_def.versions)
        out.library.CopyFrom(graph_def.library)

        def resolve(ref: str) -> str:
            if ref.startswith("^"):
                return "^" + _src(b.renames.get(ref[1:], ref[1:]))
            return b.renames.get(ref, ref)

        for node in graph_def.node:
            if node.name in b.removed:
                continue
            new = out.node.add()
            new.CopyFrom(node)
            for idx, ref in enumerate(new.input):
                new.input[idx] = resolve(ref)
        for node in b.new_nodes:
            new = out.node.add()
            new.CopyFrom(node)
            for idx, ref in enumerate(new.input):
                if ref.startswith(_EXT):  # an original tensor, maybe replaced by a rewrite
                    new.input[idx] = resolve(ref[len(_EXT):])
        _LOG.info("inc: rewrote %d Einsum->MatMul, %d Einsum->BatchMatMulV2, %d BatchMatMulV2->MatMul "
                  "(%d biases fused)", stats.einsum_to_matmul, stats.einsum_to_batch_matmul,
                  stats.batch_matmul_to_matmul, stats.biases_moved)
        return out, stats
    finally:
        b.close()


def rewrite_saved_model(source, out_dir: str):
    """``(SavedModelSource or None, RewriteStats)``: the signature of ``source`` frozen, rewritten
    and saved as a SavedModel (``serving_default``, same input/output names) under ``out_dir``;
    None when the graph holds nothing to rewrite (use ``source`` as it is)."""
    from nano_tfx.backends.inc.convert import _frozen_graph
    from nano_tfx.interchange import describe_saved_model

    graph_def, input_nodes, output_nodes = _frozen_graph(source)
    new, stats = rewrite_graph_def(graph_def, keep=list(input_nodes) + list(output_nodes))
    if not stats.changed:
        return None, stats
    del graph_def  # the frozen original: one copy of the weights fewer while the rewrite is saved
    save_graph_def_lean(new, [f"{n}:0" for n in input_nodes], [f"{n}:0" for n in output_nodes],
                        source.inputs, source.output_names, out_dir)
    return describe_saved_model(out_dir, "serving_default", source.input_names), stats
