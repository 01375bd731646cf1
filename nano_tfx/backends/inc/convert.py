"""The signature as a frozen TF GraphDef, and tensor-name bookkeeping between it and INC."""
from __future__ import annotations

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
    frozen = convert_variables_to_constants_v2(fn)
    graph_def = frozen.graph.as_graph_def()
    # Flat inputs follow the signature's sorted keyword names; outputs its sorted output keys.
    arg_names = sorted(fn.structured_input_signature[1])
    placeholders = [t.name.split(":")[0] for t in frozen.inputs if t.dtype != tf.resource]
    by_arg = dict(zip(arg_names, placeholders))
    outs = dict(zip(sorted(fn.structured_outputs), [t.name.split(":")[0] for t in frozen.outputs]))
    return graph_def, [by_arg[n] for n in source.input_names], [outs[n] for n in source.output_names]


def _tensor_names(nodes: Sequence[str], sorted_keys: Sequence[str], wanted: Sequence[str]) -> list[str]:
    """INC's frozen graph lists inputs/outputs in the signature's sorted key order; reorder
    them to ours."""
    tensors = [n if ":" in n else f"{n}:0" for n in nodes]
    by_key = dict(zip(sorted_keys, tensors))
    return [by_key[k] for k in wanted]
