"""The signature as a frozen TF GraphDef, and tensor-name bookkeeping between it and INC."""
from __future__ import annotations

import os
from typing import Sequence

from nano_tfx.interchange import SavedModelSource

#: TF ops INC quantizes through their weights: the fallback granularity.
_COMPUTE_OPS = ("Conv2D", "DepthwiseConv2dNative", "MatMul", "Conv3D", "BatchMatMulV2")


def _frozen_graph(source: SavedModelSource):
    """The signature as a constant GraphDef + its input placeholders and outputs, ordered
    like ``source.inputs`` / ``source.outputs``."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    _, fn = source.load_signature()
    # Folds the variables read inside function bodies too (LSTM/GRU while loops, tf.cond: control
    # flow is lowered to Enter/Exit frames in the top-level graph).
    frozen = convert_variables_to_constants_v2(fn)
    left = [t.name.split(":")[0] for t in frozen.inputs if t.dtype == tf.resource]
    if left:
        # Not variables (a lookup table, an iterator...): no constant can stand for them, and the
        # frozen graph INC quantizes would fail every run ("You must feed a value for placeholder
        # tensor 'unknown_1' with dtype resource").
        raise RuntimeError(
            f"inc: signature {source.signature_key!r} of {source.path!r} reads {len(left)} captured resource(s) "
            f"that are not variables ({', '.join(left)}; e.g. a tf.Transform vocabulary's hash table), so it "
            "cannot be frozen into the constant graph INC quantizes; quantize the model over transformed "
            "features (lookups outside), or use accelerator='onnxruntime'")
    graph_def = frozen.graph.as_graph_def()
    # Flat inputs follow the signature's sorted keyword names; outputs its sorted output keys.
    arg_names = sorted(fn.structured_input_signature[1])
    placeholders = [t.name.split(":")[0] for t in frozen.inputs if t.dtype != tf.resource]
    by_arg = dict(zip(arg_names, placeholders))
    outs = dict(zip(sorted(fn.structured_outputs), [t.name.split(":")[0] for t in frozen.outputs]))
    return graph_def, [by_arg[n] for n in source.input_names], [outs[n] for n in source.output_names]


_CALL_OPS = ("PartitionedCall", "StatefulPartitionedCall")


def hidden_compute_ops(graph_def) -> int:
    """Compute ops inside functions the frozen graph still *calls*: TF's freezing (INC's too) did
    not inline them, so INC sees and quantizes none of them. While/If bodies don't count:
    freezing lowers them into the graph."""
    library = {f.signature.name: f for f in graph_def.library.function}
    called, todo = set(), [n.attr["f"].func.name for n in graph_def.node if n.op in _CALL_OPS]
    while todo:
        name = todo.pop()
        if name in called or name not in library:
            continue
        called.add(name)
        todo.extend(n.attr["f"].func.name for n in library[name].node_def if n.op in _CALL_OPS)
    return sum(n.op in _COMPUTE_OPS for name in called for n in library[name].node_def)


def loop_compute_nodes(graph_def, nodes: Sequence[str]) -> list[str]:
    """The ``nodes`` that run inside a (lowered) while loop: reachable from an ``Enter`` without
    leaving the loop through an ``Exit`` (an LSTM/GRU cell's MatMuls).

    INC quantizes none of them usefully: tf_keras' loop weights stay FP32, and on a Keras 3 LSTM
    (kernel read through a ``Cast`` inside the loop frame) its MatMul pass drops a weight node
    another still reads (``KeyError: '.../while/body/.../lstm_cell/Cast/ReadVariableOp'``) and
    the whole trial fails. They stay FP32; the layers around the loop are quantized.
    """
    consumers: dict[str, list] = {}
    for n in graph_def.node:
        for i in n.input:
            consumers.setdefault(i.split(":")[0].lstrip("^"), []).append(n)
    seen: set[str] = set()
    todo = [n for n in graph_def.node if n.op == "Enter"]
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        if node.op != "Exit":
            todo.extend(c for c in consumers.get(node.name, []) if c.name not in seen)
    return [n for n in nodes if n in seen]


def _tensor_names(nodes: Sequence[str], sorted_keys: Sequence[str], wanted: Sequence[str]) -> list[str]:
    """INC's frozen graph lists inputs/outputs in the signature's sorted key order; reorder
    them to ours."""
    tensors = [n if ":" in n else f"{n}:0" for n in nodes]
    by_key = dict(zip(sorted_keys, tensors))
    return [by_key[k] for k in wanted]


def inc_node_names(graph_def, nodes) -> dict[str, str]:
    """The name INC's optimized graph gives each compute node of the frozen graph.

    TF's grappler (run by INC before quantizing) pushes a constant ``Mul`` right behind a
    ``Conv2D``/``Conv3D`` - a Keras BatchNormalization's scale - into the filter and keeps the
    *Mul's* name for the fused conv (``<bn>/batchnorm/mul_1``): INC's ``op_name_dict`` only
    knows that name, so a fallback by the conv's own name would be a silent no-op.
    """
    by_name = {n.name: n for n in graph_def.node}
    consumers: dict[str, list] = {}
    for n in graph_def.node:
        for i in n.input:
            consumers.setdefault(i.split(":")[0].lstrip("^"), []).append(n)
    constant: dict[str, bool] = {}

    def is_constant(name: str, depth: int = 0) -> bool:
        """A subgraph of constants only (grappler folds it: the BN scale gamma * rsqrt(var))."""
        if name not in constant:
            node = by_name.get(name)
            inputs = [i.split(":")[0] for i in node.input if not i.startswith("^")] if node is not None else []
            constant[name] = node is not None and (node.op == "Const" or (
                bool(inputs) and depth < 8 and all(is_constant(i, depth + 1) for i in inputs)))
        return constant[name]

    out = {}
    for name in nodes:
        node, users = by_name[name], consumers.get(name, [])
        if node.op in ("Conv2D", "Conv3D") and len(users) == 1 and users[0].op == "Mul":
            other = [i.split(":")[0] for i in users[0].input if i.split(":")[0] != name]
            if len(other) == 1 and is_constant(other[0]):
                out[name] = users[0].name
                continue
        out[name] = name
    return out


def save_graph_def_lean(graph_def, feeds: Sequence[str], fetches: Sequence[str], inputs,
                        output_names: Sequence[str], directory: str) -> None:
    """``save_graph_def`` for big graphs: the same ``serving_default`` (inputs by name, outputs
    ``{output_names[i]: fetches[i]}``) written by TF1's SavedModel builder from one imported
    graph. The TF2 path (``wrap_function`` + ``prune`` + a traced ``tf.function`` +
    ``tf.saved_model.save``) copies every constant of a frozen graph several times: for a
    BERT-base-shaped encoder (~440 MB of weights) it peaked above 14 GB and was OOM-killed at
    23 GB in ``prepare``; this path holds about three copies (the GraphDef, the imported graph,
    the serialized file)."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():  # TF1 graph building (build_tensor_info refuses eager mode)
        tf.compat.v1.import_graph_def(graph_def, name="")
        info = tf.compat.v1.saved_model.utils.build_tensor_info
        signature = tf.compat.v1.saved_model.signature_def_utils.build_signature_def(
            inputs={t.name: info(graph.get_tensor_by_name(f)) for t, f in zip(inputs, feeds)},
            outputs={n: info(graph.get_tensor_by_name(f)) for n, f in zip(output_names, fetches)},
            method_name=tf.compat.v1.saved_model.signature_constants.PREDICT_METHOD_NAME)
    if os.path.isdir(directory) and not os.listdir(directory):
        os.rmdir(directory)  # the builder wants to create it
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        builder = tf.compat.v1.saved_model.Builder(directory)
        builder.add_meta_graph_and_variables(sess, [tf.saved_model.SERVING],
                                             signature_def_map={"serving_default": signature},
                                             strip_default_attrs=True)
        builder.save()


def save_graph_def(graph_def, feeds: Sequence[str], fetches: Sequence[str], inputs, output_names: Sequence[str],
                   directory: str) -> None:
    """A frozen GraphDef as a TF2 SavedModel whose ``serving_default`` takes ``inputs``
    (TensorInfo: name, shape, dtype) and returns ``{output_names[i]: fetches[i]}``."""
    import tensorflow as tf

    def _import():
        tf.compat.v1.import_graph_def(graph_def, name="")

    wrapped = tf.compat.v1.wrap_function(_import, [])
    pruned = wrapped.prune([wrapped.graph.get_tensor_by_name(n) for n in feeds],
                           [wrapped.graph.get_tensor_by_name(n) for n in fetches])
    specs = [tf.TensorSpec(t.shape, tf.as_dtype(t.dtype), name=t.name) for t in inputs]
    names = list(output_names)
    module = tf.Module()
    module.graph_fn = pruned

    @tf.function(input_signature=specs)
    def serve(*args):
        outs = module.graph_fn(*args)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        return {n: o for n, o in zip(names, outs)}

    module.serve = serve
    os.makedirs(directory, exist_ok=True)
    tf.saved_model.save(module, directory, signatures={"serving_default": serve.get_concrete_function()})
