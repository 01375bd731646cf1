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
