"""The Trainer contract: which signatures a quantizable TFX model exports.

The part of a TFX model that gets quantized is the model over *transformed* features: the
tf.Transform graph (string parsing, vocabularies, z-scores...) stays in FP32 and is re-attached
in front of the quantized model afterwards. A Trainer ``run_fn`` therefore saves two signatures::

    signatures = quantizable_signatures(model, tf_transform_output, label_key='species')
    tf.saved_model.save(model, fn_args.serving_model_dir, signatures=signatures)

* ``serving_default``: serialized raw ``tf.Example`` strings -> TFT layer -> model, exactly like
  TFX's penguin example (what the Evaluator, TF Serving and the Pusher use);
* ``from_transformed_features``: the dense transformed features, one named input per feature
  the model consumes -> model (what the Quantizer quantizes).

A stock TFX ``run_fn`` saves only ``serving_default`` (+ ``transform_features``): the Quantizer
then derives ``from_transformed_features`` (:func:`derive_from_transformed_features`).

The second one is deliberately *not* called ``transformed_features``: TFMA reserves that name
for a raw-examples -> transformed-features preprocessing signature and the Evaluator calls it
with serialized examples.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

SERVING_SIGNATURE = "serving_default"
FROM_TRANSFORMED_FEATURES = "from_transformed_features"
#: the input name of ``serving_default`` (TFX penguin example / TFMA convention)
EXAMPLES_INPUT = "examples"
#: the output name when the model returns a single tensor
DEFAULT_OUTPUT_KEY = "outputs"

HOW_TO_ADD = (
    "In the Trainer's run_fn save the model with\n"
    "    from components import quantizable_signatures\n"
    "    signatures = quantizable_signatures(model, tf_transform_output, label_key=LABEL_KEY)\n"
    "    tf.saved_model.save(model, fn_args.serving_model_dir, signatures=signatures)\n"
    f"which adds '{FROM_TRANSFORMED_FEATURES}' (transformed features -> model) next to "
    f"'{SERVING_SIGNATURE}' (serialized raw tf.Examples -> transform -> model)."
)


def missing_signature_message(model_path: str, signature_name: str, available: Sequence[str]) -> str:
    return (
        f"signature_name: the Trainer model at {model_path!r} has no signature "
        f"{signature_name!r} (it has {sorted(available)}). The Quantizer quantizes the model over "
        f"transformed features, so the Trainer must export it. {HOW_TO_ADD}"
    )


def _dense_spec(name: str, feature: Any):
    import tensorflow as tf

    if isinstance(feature, tf.io.FixedLenFeature):
        return tf.TensorSpec([None] + list(feature.shape), feature.dtype, name=name)
    raise ValueError(
        f"quantizable_signatures: transformed feature {name!r} is {type(feature).__name__}; the "
        f"'{FROM_TRANSFORMED_FEATURES}' signature needs dense (FixedLenFeature) transformed "
        f"features. Densify it in preprocessing_fn (e.g. tft.sparse_tensor_to_dense_with_shape)."
    )


def _model_feature_keys(model: Any, transformed_spec: Mapping[str, Any]) -> list[str]:
    names = list(getattr(model, "input_names", None) or [])
    if not names:
        try:
            inputs = model.inputs or []
        except (AttributeError, ValueError):
            inputs = []
        names = [getattr(t, "name", "").split(":")[0] for t in inputs]
    names = [n for n in names if n]
    missing = [n for n in names if n not in transformed_spec]
    if not names or missing:
        raise ValueError(
            "quantizable_signatures: cannot tell which transformed features the model consumes "
            f"(model inputs {names or 'unknown'}, transformed features {sorted(transformed_spec)}); "
            "pass feature_keys=[...] (names of transformed features, in the model's input names)"
        )
    return names


def _as_output_dict(outputs: Any) -> dict:
    import tensorflow as tf

    if isinstance(outputs, Mapping):
        return {str(k): v for k, v in outputs.items()}
    flat = tf.nest.flatten(outputs)
    if len(flat) == 1:
        return {DEFAULT_OUTPUT_KEY: flat[0]}
    return {f"{DEFAULT_OUTPUT_KEY}_{i}": t for i, t in enumerate(flat)}


def quantizable_signatures(
    model: Any,
    tf_transform_output: Any,
    label_key: str | Sequence[str] | None,
    feature_keys: Sequence[str] | None = None,
) -> dict:
    """Signatures for ``tf.saved_model.save(model, path, signatures=...)`` in a Trainer run_fn.

    Args:
      model: the Keras model (tf_keras or Keras 3) over transformed features.
      tf_transform_output: a ``tft.TFTransformOutput`` of the Transform component.
      label_key: raw label feature name(s); removed from the raw feature spec of
        ``serving_default`` since they are absent at serving time.
      feature_keys: transformed features the model consumes; default: the model's input names.

    Returns:
      ``{'serving_default': ..., 'from_transformed_features': ...}`` concrete functions, both
      returning the same output dict (``{'outputs': logits}`` for a single-output model).
    """
    import tensorflow as tf

    labels = [label_key] if isinstance(label_key, str) else list(label_key or [])
    transformed_spec = tf_transform_output.transformed_feature_spec()
    keys = list(feature_keys) if feature_keys else _model_feature_keys(model, transformed_spec)
    unknown = [k for k in keys if k not in transformed_spec]
    if unknown:
        raise ValueError(
            f"feature_keys: {unknown} are not transformed features; they are {sorted(transformed_spec)}"
        )
    specs = [_dense_spec(k, transformed_spec[k]) for k in keys]
    raw_spec = dict(tf_transform_output.raw_feature_spec())
    for label in labels:
        raw_spec.pop(label, None)

    # Track the TFT layer so its assets/tables are saved with the model (TFX penguin idiom).
    model.tft_layer = tf_transform_output.transform_features_layer()

    def apply_model(features: Mapping[str, Any]) -> dict:
        inputs = {k: features[k] for k in keys}
        return _as_output_dict(model(inputs, training=False))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def serve_tf_examples_fn(serialized_tf_examples):
        raw_features = tf.io.parse_example(serialized_tf_examples, raw_spec)
        transformed = model.tft_layer(raw_features)
        return apply_model(transformed)

    @tf.function(input_signature=specs)
    def from_transformed_features_fn(*tensors):
        return apply_model(dict(zip(keys, tensors)))

    return {
        SERVING_SIGNATURE: serve_tf_examples_fn.get_concrete_function(),
        FROM_TRANSFORMED_FEATURES: from_transformed_features_fn.get_concrete_function(),
    }


# -- deriving the signature from a stock Trainer model -------------------------------------------
def _keras_call(loaded: Any) -> Any:
    """The restored Keras model's inference call over a dict of tensors (training=False), or None.

    tf_keras models keep their ``__call__`` in a SavedModel (one concrete function per training
    value); Keras 3 models saved with ``tf.saved_model.save`` keep only the signatures."""
    call = getattr(loaded, "__call__", None)
    for fn in getattr(call, "concrete_functions", None) or []:
        args, kwargs = fn.structured_input_signature
        if not args or not _input_names(args[0]):
            continue
        training = kwargs.get("training", args[1] if len(args) > 1 else None)
        if training is False or (training is None and len(args) == 1):
            return fn
    return None


def _input_names(structure: Any) -> list[str]:
    """Feature names of a call's inputs: a dict of tensors, or a list of named TensorSpecs
    (a functional model built from a list of named ``Input``s); [] when neither."""
    import tensorflow as tf

    if isinstance(structure, Mapping):
        return list(structure) if all(isinstance(v, tf.TensorSpec) for v in structure.values()) else []
    if isinstance(structure, (list, tuple)) and structure and all(
            isinstance(v, tf.TensorSpec) and v.name for v in structure):
        return [v.name for v in structure]
    return []


def _derivation_problem(loaded: Any, tf_transform_output: Any) -> tuple[Any, list[str], str]:
    """(call, feature keys, '') when the model's own call can be exposed, else (None, [], why)."""
    import tensorflow as tf

    if SERVING_SIGNATURE not in loaded.signatures:
        return None, [], f"it has no {SERVING_SIGNATURE!r} signature either"
    call = _keras_call(loaded)
    if call is None:
        return None, [], ("it has no restorable Keras call over a dict of transformed features (a Keras 3 "
                          "model saved with tf.saved_model.save keeps only its signatures)")
    keys = sorted(_input_names(call.structured_input_signature[0][0]))
    spec = tf_transform_output.transformed_feature_spec()
    missing = [k for k in keys if k not in spec]
    if missing:
        return None, [], f"the model's inputs {missing} are not transformed features ({sorted(spec)})"
    sparse = [k for k in keys if not isinstance(spec[k], tf.io.FixedLenFeature)]
    if sparse:
        return None, [], f"the model's inputs {sparse} are not dense (FixedLenFeature) transformed features"
    return call, keys, ""


def _keras_model_fn(call: Any, keys: list[str]) -> Any:
    """fn(*tensors in ``keys`` order) -> the restored Keras call's outputs (training=False)."""
    import tensorflow as tf

    call_args, call_kwargs = call.structured_input_signature
    model_inputs = call_args[0]
    model_specs = dict(zip(_input_names(model_inputs), tf.nest.flatten(model_inputs)))

    def to_model_shape(key: str, tensor: Any) -> Any:
        # TFT features are often [batch] while the Keras Input is (batch, 1): same values.
        want = model_specs[key].shape
        if want.rank is not None and tensor.shape.rank != want.rank and want[1:].is_fully_defined():
            return tf.reshape(tensor, [-1] + want[1:].as_list())
        return tensor

    def model_fn(*tensors):
        features = {k: to_model_shape(k, t) for k, t in zip(keys, tensors)}
        # The structure the call was traced with: a dict, or the list in the model's input order.
        inputs = features if isinstance(model_inputs, Mapping) else [features[n] for n in model_specs]
        return call(inputs, *call_args[1:], **call_kwargs)  # training=False (, mask=None) as traced

    return model_fn


def derive_from_transformed_features(model_path: str, tf_transform_output: Any, out_dir: str) -> str:
    """A SavedModel at ``out_dir`` with the Trainer model's ``serving_default`` (unchanged) and a
    ``from_transformed_features`` signature: the model's own restored Keras call (tf_keras), else
    the model part cut out of ``serving_default``'s graph after the tf.Transform call (Keras 3).

    For a stock TFX ``run_fn`` (e.g. TFX's penguin / Chicago taxi Keras modules), which exports
    only ``serving_default`` (raw tf.Examples) and ``transform_features``. Outputs are named like
    ``serving_default``'s when both have one output (``outputs`` in TFX's examples), else as
    :func:`quantizable_signatures` names them. Raises ``ValueError``
    (:func:`missing_signature_message` + why) when the model's call cannot be recovered.
    """
    import tensorflow as tf

    loaded = tf.saved_model.load(model_path)
    call, keys, why = _derivation_problem(loaded, tf_transform_output)
    model_fn = None
    xf_spec = tf_transform_output.transformed_feature_spec()
    if call is not None:
        model_fn = _keras_model_fn(call, keys)
    elif SERVING_SIGNATURE in loaded.signatures:
        model_fn, keys, why_not = _graph_call(loaded, tf_transform_output)
        why = f"{why}, and {why_not}" if model_fn is None else why
    if call is None and model_fn is None:
        raise ValueError(missing_signature_message(model_path, FROM_TRANSFORMED_FEATURES, list(loaded.signatures))
                         + f"\nIt cannot be derived from the model: {why}.")
    serving = loaded.signatures[SERVING_SIGNATURE]
    serving_outputs = list(serving.structured_outputs) if isinstance(serving.structured_outputs, Mapping) else []
    specs = [tf.TensorSpec([None] + list(xf_spec[k].shape), xf_spec[k].dtype, name=k) for k in keys]

    module = tf.Module()
    module.fp32 = loaded  # variables, tf.Transform assets and tables stay tracked

    @tf.function(input_signature=specs)
    def from_transformed_features_fn(*tensors):
        outputs = model_fn(*tensors)
        flat = tf.nest.flatten(outputs)
        if len(flat) == 1 and len(serving_outputs) == 1:
            return {serving_outputs[0]: flat[0]}
        return _as_output_dict(outputs)

    tf.saved_model.save(module, out_dir, signatures={
        SERVING_SIGNATURE: serving,
        FROM_TRANSFORMED_FEATURES: from_transformed_features_fn.get_concrete_function(),
    })
    return out_dir


_CALL_OPS = ("PartitionedCall", "StatefulPartitionedCall")


def _graph_call(loaded: Any, tf_transform_output: Any) -> tuple[Any, list[str], str]:
    """The model part of ``serving_default`` cut out of its graph, for models whose Keras call is
    not restorable (Keras 3 saved with ``tf.saved_model.save`` inlines its layers in the serving
    function): the serving function's body is re-imported with the tf.Transform call's outputs
    replaced by inputs, then pruned to them. Returns (fn(*tensors) -> outputs, keys, why-not)."""
    import tensorflow as tf
    from tensorflow.python.framework.function_def_to_graph import function_def_to_graph

    serving = loaded.signatures[SERVING_SIGNATURE]
    calls = [op for op in serving.graph.get_operations() if op.type in _CALL_OPS]
    if len(calls) != 1:
        return None, [], "its serving_default is not one traced function"
    library = {f.signature.name: f for f in serving.graph.as_graph_def().library.function}
    body_def = library[calls[0].get_attr("f").name]
    spec = tf_transform_output.transformed_feature_spec()
    names = sorted(spec)
    if not all(isinstance(spec[k], tf.io.FixedLenFeature) for k in names):
        return None, [], "not all transformed features are dense (FixedLenFeature)"
    want_types = [spec[k].dtype.as_datatype_enum for k in names]
    # The tf.Transform layer's call: its outputs are the transformed features, flattened in
    # sorted-key order (tf.nest), so their count and dtypes match the transformed feature spec.
    tft_nodes = [n.name for n in body_def.node_def if n.op in _CALL_OPS
                 and [a.type for a in library[n.attr["f"].func.name].signature.output_arg] == want_types]
    if len(tft_nodes) != 1:
        return None, [], "no single tf.Transform call with the transformed features' outputs in serving_default"
    body = function_def_to_graph(body_def)
    tft_op = body.get_operation_by_name(tft_nodes[0])
    used = sorted({i for i, t in enumerate(tft_op.outputs) if t.consumers()})
    keys = [names[i] for i in used]
    outer_inputs = list(calls[0].inputs)
    internal_to_external = {id(internal): external for external, internal in serving.graph.captures}
    resources = {body.inputs[i].name: internal_to_external.get(id(outer_inputs[i]))
                 for i in range(1, len(body.inputs))}
    if any(v is None for v in resources.values()) or len(body.inputs) != len(outer_inputs):
        return None, [], "serving_default's captured inputs cannot be matched to the model's variables"
    output_names = [t.name for t in body.outputs]
    features = {tft_op.outputs[i].name: (f"nano_tfx_feature_{i}", tft_op.outputs[i].dtype) for i in used}
    model_def = _model_part(body.as_graph_def(), tft_op.name, features, output_names)
    kept = {n.name for n in model_def.node}
    # Capture only what the model reads: the tf.Transform's own captures (its vocabularies' hash
    # tables, no variables) cannot be frozen into constants.
    resources = {name: handle for name, handle in resources.items() if name.split(":")[0] in kept}
    structure = serving.structured_outputs

    def model_fn(*tensors):
        # Imported into the caller's tf.function: an ordinary traced function (automatic control
        # outputs) that TF's freezing inlines, so INC sees the model's ops, not one opaque call.
        graph = tf.compat.v1.get_default_graph()
        input_map = {f"{features[tft_op.outputs[i].name][0]}:0": t for i, t in zip(used, tensors)}
        input_map.update({name: graph.capture(handle) for name, handle in resources.items()})
        flat = tf.graph_util.import_graph_def(model_def, input_map=input_map, return_elements=output_names,
                                              name="model")
        return tf.nest.pack_sequence_as(structure, flat)

    return model_fn, keys, ""


def _model_part(graph_def: Any, tft_name: str, features: Mapping[str, tuple], outputs: Sequence[str]) -> Any:
    """The nodes of ``graph_def`` that compute ``outputs`` from the tf.Transform call's outputs,
    each of which (``features``: tensor name -> (placeholder name, dtype)) becomes a placeholder.

    The tf.Transform call, the example parsing and everything only they read are dropped -
    including the automatic control edges by which a tf.function body runs every stateful op
    (the tf.Transform call) before its outputs: left in, they would keep the call and its
    vocabulary's hash table in the model, which freezing cannot fold (INC then fails every run
    with "You must feed a value for placeholder tensor 'unknown_1' with dtype resource").
    """
    import tensorflow as tf

    out = type(graph_def)()
    out.CopyFrom(graph_def)
    renames = {name: holder for name, (holder, _) in features.items()}
    renames.update({name[:-2]: holder for name, (holder, _) in features.items() if name.endswith(":0")})
    for node in out.node:
        inputs = [renames.get(i, i) for i in node.input if i != f"^{tft_name}"]
        del node.input[:]
        node.input.extend(inputs)
    for holder, dtype in features.values():
        node = out.node.add(name=holder, op="Placeholder")
        node.attr["dtype"].type = dtype.as_datatype_enum
    return tf.compat.v1.graph_util.extract_sub_graph(out, sorted({o.split(":")[0] for o in outputs}))
