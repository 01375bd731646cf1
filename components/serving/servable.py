"""A model folder -> a ``Servable``: named numpy tensors in, named numpy tensors out.

No HTTP here (``runtime.py`` speaks the protocol). Which folders are served, and how:

* a TF SavedModel whose ``serving_default`` takes one string tensor ``examples`` (a Trainer FP32
  model, the INC ``Format-Serving/`` layout): serialized raw ``tf.Example`` strings in, the
  signature's outputs out - TensorFlow runs all of it;
* a ``QuantizedModel.save`` folder (OpenVINO IR, ONNX, INC) with ``transform_graph/`` beside it
  (the Quantizer's ``Format-Serving/``): TensorFlow parses the examples and applies the FP32
  tf.Transform graph, the model's own engine (``nano_tfx.load``) runs the rest;
* any other SavedModel / ``QuantizedModel.save`` folder: the model's own named inputs as tensors.

Loading runs only the engines' own loaders (SavedModel, tf.Transform, OpenVINO, ONNX Runtime,
nano_tfx's JSON manifest): nothing is unpickled.
"""
from __future__ import annotations

import json
import functools
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from components.quantizer.serving import SERVING_MANIFEST, TRANSFORM_DIR, transform_graph_dir
from components.quantizer.signatures import EXAMPLES_INPUT, SERVING_SIGNATURE

logger = logging.getLogger("nano_tfx")

MANIFEST = "nano_tfx.json"  # QuantizedModel.save's manifest (nano_tfx.result)


class RequestError(ValueError):
    """The request, not the server, is wrong (the protocol answers 4xx)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype  # np.dtype(object) for strings
    shape: tuple  # None for a free dimension; shape[0] is the batch


@dataclass
class Servable:
    """What a model folder serves: ``predict({name: array}) -> {name: array}``."""

    kind: str  # "examples" (raw tf.Examples) or "tensors" (the model's own inputs)
    layout: str  # e.g. "savedmodel", "inc", "openvino+transform_graph"
    inputs: list[TensorSpec]
    outputs: list[str]
    _run: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [t.name for t in self.inputs]
        unknown = sorted(set(inputs) - set(names))
        missing = [n for n in names if n not in inputs]
        if unknown or missing:
            raise RequestError(f"inputs: expected {names}, got {sorted(inputs)}")
        out = self._run(inputs)
        return {name: np.asarray(out[name]) for name in self.outputs}


def _is_examples_signature(specs: Mapping[str, Any]) -> bool:
    import tensorflow as tf

    return list(specs) == [EXAMPLES_INPUT] and specs[EXAMPLES_INPUT].dtype == tf.string


def _tf_error(err: Exception) -> RequestError:
    """TensorFlow's InvalidArgumentError (unparseable examples, missing features) as one line:
    the line naming the problem, not "Graph execution error:" or the node's stack trace."""
    lines = [ln.strip() for ln in str(getattr(err, "message", err)).splitlines() if ln.strip()]
    useful = [ln for ln in lines if re.search(r"Feature|parse|Name:|Key:|Expected|Could not", ln)]
    line = (useful or lines or [type(err).__name__])[0]
    line = re.sub(r"^.*?}}\s*", "", line)  # drop TF's "{{function_node ...}}" prefix
    return RequestError(f"examples: {line[:300]}")


@functools.lru_cache(maxsize=None)  # once per process
def configure_tensorflow() -> None:
    """Process-wide TensorFlow settings for serving; once, before any model is loaded.

    With oneDNN on (nano_tfx turns it on: INC's INT8 kernels need it), Grappler's remapper fuses
    Conv2D + FusedBatchNorm of a SavedModel (BatchNorm is variables there, never folded) into a
    oneDNN convolution with BatchNorm as *binary* post-ops, and at batch 1 on an AVX2 CPU oneDNN
    runs that through its gemm convolution with reference post-ops: MobileNetV2 took ~3.4 s per
    image instead of ~55 ms (ONEDNN_VERBOSE: 35 convolutions ``x64:gemm:jit`` with
    ``binary_sub+binary_mul+...`` post-ops, >95 % of the time). A server answers mostly batch-1
    requests, so the remapper is off here; INC's INT8 graphs come already fused by INC.
    """
    import tensorflow as tf

    from nano_tfx._env import onednn_enabled

    if onednn_enabled():
        tf.config.optimizer.set_experimental_options({"remapping": False})


def _saved_model(path: str) -> Servable:
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    if SERVING_SIGNATURE not in loaded.signatures:
        raise ValueError(f"MODEL_DIR: SavedModel {path!r} has no {SERVING_SIGNATURE!r} signature "
                         f"(it has {sorted(loaded.signatures)})")
    fn = loaded.signatures[SERVING_SIGNATURE]
    specs = fn.structured_input_signature[1]
    outputs = sorted(fn.structured_outputs)
    inputs = [TensorSpec(n, np.dtype(object) if s.dtype == tf.string else np.dtype(s.dtype.as_numpy_dtype),
                         tuple(s.shape.as_list()) if s.shape.rank is not None else (None,))
              for n, s in sorted(specs.items())]

    def run(arrays: Mapping[str, np.ndarray]) -> dict:
        try:
            out = fn(**{n: tf.constant(a, dtype=specs[n].dtype) for n, a in arrays.items()})
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as err:
            raise _tf_error(err) from err
        return {k: v.numpy() for k, v in out.items()}

    layout = "inc" if os.path.isfile(os.path.join(path, MANIFEST)) else "savedmodel"
    kind = "examples" if _is_examples_signature(specs) else "tensors"
    return Servable(kind, layout, inputs, outputs, run)


def _raw_keys(path: str, transform: Any) -> list[str]:
    """The raw features a request carries: the Quantizer's record of what the FP32
    ``serving_default`` parses; else every raw feature of the Transform's schema."""
    manifest = os.path.join(path, SERVING_MANIFEST)
    if os.path.isfile(manifest):
        with open(manifest) as f:
            keys = json.load(f).get("raw_feature_keys")
        if keys:
            return list(keys)
    keys = sorted(transform.raw_feature_spec())
    logger.warning("%s: no %s; requests must carry every raw feature of the Transform schema %s "
                   "(label included)", path, SERVING_MANIFEST, keys)
    return keys


def _engine_model(path: str, thread_num: Optional[int]) -> Servable:
    import nano_tfx

    model = nano_tfx.load(path, thread_num=thread_num)
    outputs = [t.name for t in model.outputs]
    transform_dir = os.path.join(path, TRANSFORM_DIR)
    layout = model.backend
    if not os.path.isdir(transform_dir):
        inputs = [TensorSpec(t.name, np.dtype(t.dtype), tuple(t.shape)) for t in model.inputs]

        def run_tensors(arrays: Mapping[str, np.ndarray]) -> dict:
            try:
                batch = model._as_inputs({t.name: arrays[t.name] for t in model.inputs})
            except ValueError as err:
                raise RequestError(str(err).replace("x: ", "inputs: ", 1)) from err
            return dict(zip(outputs, model.run(batch)))

        return Servable("tensors", layout, inputs, outputs, run_tensors)

    transform = _transform_fn(path, transform_graph_dir(path), model.inputs)

    def run_examples(arrays: Mapping[str, np.ndarray]) -> dict:
        features = transform(arrays[EXAMPLES_INPUT])
        return dict(zip(outputs, model.run(features)))

    return Servable("examples", f"{layout}+{TRANSFORM_DIR}",
                    [TensorSpec(EXAMPLES_INPUT, np.dtype(object), (None,))], outputs, run_examples)


def _transform_fn(path: str, transform_dir: str, model_inputs: Sequence[Any]) -> Callable:
    """serialized tf.Examples -> the model's inputs (numpy, model order), in TensorFlow."""
    import tensorflow as tf
    import tensorflow_transform as tft

    tft_output = tft.TFTransformOutput(transform_dir)
    keys = set(_raw_keys(path, tft_output))
    raw_spec = {k: v for k, v in tft_output.raw_feature_spec().items() if k in keys}
    layer = tft_output.transform_features_layer()
    names = [t.name for t in model_inputs]
    dtypes = [tf.as_dtype(np.dtype(t.dtype)) for t in model_inputs]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def parse_and_transform(serialized):
        transformed = layer(tf.io.parse_example(serialized, raw_spec))
        return [tf.cast(transformed[n], d) for n, d in zip(names, dtypes)]

    missing = [n for n in names if n not in tft_output.transformed_feature_spec()]
    if missing:
        raise ValueError(f"MODEL_DIR: the model's inputs {missing} are not features of {transform_dir!r}")

    def run(serialized: np.ndarray) -> list[np.ndarray]:
        try:
            return [t.numpy() for t in parse_and_transform(tf.constant(serialized, tf.string))]
        except tf.errors.InvalidArgumentError as err:
            raise _tf_error(err) from err

    return run


def load_servable(path: str, thread_num: Optional[int] = None) -> Servable:
    """The ``Servable`` of a model folder (see the module doc for the layouts)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise ValueError(f"MODEL_DIR: expected a model directory, got {path!r}")
    configure_tensorflow()
    has_savedmodel = os.path.isfile(os.path.join(path, "saved_model.pb"))
    has_manifest = os.path.isfile(os.path.join(path, MANIFEST))
    if has_savedmodel:
        servable = _saved_model(path)
        # A plain INC QuantizedModel.save folder (transformed features in) with a transform graph
        # beside it still serves raw examples: the engine route below composes them.
        if servable.kind == "examples" or not (has_manifest and os.path.isdir(os.path.join(path, TRANSFORM_DIR))):
            return servable
    if has_manifest:
        return _engine_model(path, thread_num)
    raise ValueError(
        f"MODEL_DIR: {path!r} is neither a SavedModel (saved_model.pb) nor a nano_tfx model folder "
        f"({MANIFEST}); give a Trainer model, a Quantizer Format-Serving/ or a QuantizedModel.save folder"
    )
