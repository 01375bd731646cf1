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
import logging
import os
import re
from dataclasses import dataclass
from time import perf_counter
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


#: Stage names a ``Servable`` times (``Servable.predict(..., timings=...)``), in call order.
STAGE_TRANSFORM = "transform"  # TensorFlow: parse the tf.Examples + the tf.Transform graph (+ .numpy())
STAGE_ENGINE = "engine"  # the model's engine (ONNX Runtime, OpenVINO, INC/TF session) on numpy inputs
STAGE_MODEL = "model"  # a SavedModel signature: TensorFlow runs parse, transform and model in one call


@dataclass
class Servable:
    """What a model folder serves: ``predict({name: array}) -> {name: array}``.

    ``stages`` names what ``predict`` times when given a ``timings`` dict (``perf_counter``,
    milliseconds, two clock reads per stage): ``("transform", "engine")`` for an engine model
    behind ``transform_graph/``, ``("engine",)`` for an engine model on its own inputs,
    ``("model",)`` for a SavedModel (one TensorFlow call, parsing included).
    """

    kind: str  # "examples" (raw tf.Examples) or "tensors" (the model's own inputs)
    layout: str  # e.g. "savedmodel", "inc", "openvino+transform_graph"
    inputs: list[TensorSpec]
    outputs: list[str]
    _run: Callable[[Mapping[str, np.ndarray], dict], Mapping[str, np.ndarray]]
    stages: tuple = (STAGE_MODEL,)

    def predict(self, inputs: Mapping[str, np.ndarray], timings: Optional[dict] = None) -> dict[str, np.ndarray]:
        """Run the model; with ``timings`` (a dict), add each stage's milliseconds to it."""
        names = [t.name for t in self.inputs]
        unknown = sorted(set(inputs) - set(names))
        missing = [n for n in names if n not in inputs]
        if unknown or missing:
            raise RequestError(f"inputs: expected {names}, got {sorted(inputs)}")
        out = self._run(inputs, {} if timings is None else timings)
        return {name: np.asarray(out[name]) for name in self.outputs}


class _Stage:
    """``with _Stage(timings, name):`` adds the block's milliseconds to ``timings[name]``."""

    __slots__ = ("timings", "name", "t0")

    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.t0 = perf_counter()

    def __exit__(self, *exc) -> None:
        self.timings[self.name] = self.timings.get(self.name, 0.0) + (perf_counter() - self.t0) * 1000.0


def _is_examples_signature(specs: Mapping[str, Any]) -> bool:
    import tensorflow as tf

    return list(specs) == [EXAMPLES_INPUT] and specs[EXAMPLES_INPUT].dtype == tf.string


def _tf_error(err: Exception) -> RequestError:
    """TensorFlow's InvalidArgumentError (unparseable examples, missing features) as one line:
    the line naming the problem, not "Graph execution error:" or the node's stack trace."""
    lines = [ln.strip() for ln in str(getattr(err, "message", err)).splitlines() if ln.strip()]
    # Eager errors carry the Python frames of where the graph was traced ("Detected at node ...",
    # 'File "servable.py", line N, in parse_and_transform'): never the problem, skip them.
    lines = [ln for ln in lines if not ln.startswith(('File "', "Detected at node"))] or lines
    useful = [ln for ln in lines if re.search(r"Feature|parse|Name:|Key:|Expected|Could not", ln)]
    line = (useful or lines or [type(err).__name__])[0]
    line = re.sub(r"^.*?}}\s*", "", line)  # drop TF's "{{function_node ...}}" prefix
    return RequestError(f"examples: {line[:300]}")


#: TensorFlow's intra-op and inter-op threads in a serving process (``configure_tensorflow``).
DEFAULT_TF_THREADS = 1
_tf_configured: list = []  # the settings applied, once per process


def configure_tensorflow(tf_threads: Optional[int] = None) -> None:
    """Process-wide TensorFlow settings for serving; once, before any model is loaded (later
    calls do nothing). ``tf_threads``: TensorFlow's intra-op and inter-op threads; None leaves
    them alone (``load_servable`` in someone else's process); ``nano-tfx serve`` passes
    ``ServeOptions.tf_threads`` or ``DEFAULT_TF_THREADS`` (1).

    Threads. In a served engine model TensorFlow runs only the request's parsing and the
    tf.Transform graph (one JPEG decode + resize per image: small, sequential ops); the engine
    (ONNX Runtime, OpenVINO) runs the model on its own threads, by default one per core, exactly
    as ``nano_tfx.quantize`` timed it when it chose the engine (``accelerator='auto'``). With
    TensorFlow's defaults (one intra-op and one inter-op thread per core) its Eigen pools spin
    after each op and wake threads the engine wants on the next call: measured on a 2-core EPYC,
    served MobileNetV2 (JPEG tf.Examples, concurrency 1), the transform took ~1.3 ms with the
    defaults and ~1.0 ms with one thread each, the engine call did not get slower, and the FP32
    SavedModel (TensorFlow is its engine) was no slower at batch 1 either (15-22 ms both ways,
    noisy). So TensorFlow gets one thread of each kind and the engine keeps the cores; raise
    ``tf_threads`` (``ServeOptions.tf_threads``) for a server that mostly runs big FP32 batches in
    TensorFlow. If TensorFlow was already initialised in this process (a notebook, a test) its
    thread pools cannot change any more: they are kept, with a log line.

    Remapper. With oneDNN on (nano_tfx turns it on: INC's INT8 kernels need it), Grappler's
    remapper fuses Conv2D + FusedBatchNorm of a SavedModel (BatchNorm is variables there, never
    folded) into a oneDNN convolution with BatchNorm as *binary* post-ops, and at batch 1 on an
    AVX2 CPU oneDNN runs that through its gemm convolution with reference post-ops: MobileNetV2
    took ~3.4 s per image instead of ~55 ms (ONEDNN_VERBOSE: 35 convolutions ``x64:gemm:jit``
    with ``binary_sub+binary_mul+...`` post-ops, >95 % of the time). A server answers mostly
    batch-1 requests, so the remapper is off here; INC's INT8 graphs come already fused by INC.
    """
    if _tf_configured:
        return
    import tensorflow as tf

    from nano_tfx._env import onednn_enabled

    if tf_threads is not None and int(tf_threads) < 1:
        raise ValueError(f"tf_threads: expected >= 1, got {tf_threads!r}")
    if onednn_enabled():
        tf.config.optimizer.set_experimental_options({"remapping": False})
    if tf_threads is not None:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(tf_threads))
            tf.config.threading.set_inter_op_parallelism_threads(int(tf_threads))
        except RuntimeError:  # "cannot be modified after initialization"
            logger.info("TensorFlow already initialised in this process: its thread pools are kept "
                        "(serving wants %d intra-op / %d inter-op)", tf_threads, tf_threads)
    _tf_configured.append(tf_threads)


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

    def run(arrays: Mapping[str, np.ndarray], timings: dict) -> dict:
        with _Stage(timings, STAGE_MODEL):
            try:
                out = fn(**{n: tf.constant(a, dtype=specs[n].dtype) for n, a in arrays.items()})
            except (tf.errors.InvalidArgumentError, ValueError, TypeError) as err:
                raise _tf_error(err) from err
            return {k: v.numpy() for k, v in out.items()}

    layout = "inc" if os.path.isfile(os.path.join(path, MANIFEST)) else "savedmodel"
    kind = "examples" if _is_examples_signature(specs) else "tensors"
    return Servable(kind, layout, inputs, outputs, run, (STAGE_MODEL,))


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

        def run_tensors(arrays: Mapping[str, np.ndarray], timings: dict) -> dict:
            try:
                batch = model._as_inputs({t.name: arrays[t.name] for t in model.inputs})
            except ValueError as err:
                raise RequestError(str(err).replace("x: ", "inputs: ", 1)) from err
            with _Stage(timings, STAGE_ENGINE):
                return dict(zip(outputs, model.run(batch)))

        return Servable("tensors", layout, inputs, outputs, run_tensors, (STAGE_ENGINE,))

    transform = _transform_fn(path, transform_graph_dir(path), model.inputs)

    def run_examples(arrays: Mapping[str, np.ndarray], timings: dict) -> dict:
        with _Stage(timings, STAGE_TRANSFORM):
            features = transform(arrays[EXAMPLES_INPUT])
        with _Stage(timings, STAGE_ENGINE):
            return dict(zip(outputs, model.run(features)))

    return Servable("examples", f"{layout}+{TRANSFORM_DIR}", [TensorSpec(EXAMPLES_INPUT, np.dtype(object), (None,))],
                    outputs, run_examples, (STAGE_TRANSFORM, STAGE_ENGINE))


def _transform_fn(path: str, transform_dir: str, model_inputs: Sequence[Any]) -> Callable:
    """serialized tf.Examples -> the model's inputs (numpy, model order), in TensorFlow."""
    import tensorflow_transform as tft

    return examples_transform(transform_dir, model_inputs, _raw_keys(path, tft.TFTransformOutput(transform_dir)),
                              argument="MODEL_DIR")


def examples_transform(transform_dir: str, model_inputs: Sequence[Any], raw_keys: Optional[Sequence[str]] = None,
                       argument: str = "transform_graph") -> Callable[[np.ndarray], list[np.ndarray]]:
    """serialized tf.Examples -> the model's inputs (numpy, model order): parse ``raw_keys`` (None:
    every raw feature of the Transform schema) and run the tf.Transform graph, in TensorFlow. The
    served request's path in front of the engine (also what ``accelerator='auto'`` times the
    Quantizer's finalists through: ``components.quantizer.served_timing``)."""
    import tensorflow as tf
    import tensorflow_transform as tft

    tft_output = tft.TFTransformOutput(transform_dir)
    keys = set(raw_keys) if raw_keys is not None else None
    raw_spec = {k: v for k, v in tft_output.raw_feature_spec().items() if keys is None or k in keys}
    layer = tft_output.transform_features_layer()
    names = [t.name for t in model_inputs]
    dtypes = [tf.as_dtype(np.dtype(t.dtype)) for t in model_inputs]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def parse_and_transform(serialized):
        transformed = layer(tf.io.parse_example(serialized, raw_spec))
        return [tf.cast(transformed[n], d) for n, d in zip(names, dtypes)]

    missing = [n for n in names if n not in tft_output.transformed_feature_spec()]
    if missing:
        raise ValueError(f"{argument}: the model's inputs {missing} are not features of {transform_dir!r}")

    def run(serialized: np.ndarray) -> list[np.ndarray]:
        try:
            return [t.numpy() for t in parse_and_transform(tf.constant(serialized, tf.string))]
        except tf.errors.InvalidArgumentError as err:
            raise _tf_error(err) from err

    return run


def load_servable(path: str, thread_num: Optional[int] = None) -> Servable:
    """The ``Servable`` of a model folder (see the module doc for the layouts).

    ``thread_num``: the engine's threads (ONNX Runtime, OpenVINO, INC's session); None keeps the
    engines' defaults, the settings ``nano_tfx.quantize`` timed the engines with. TensorFlow's
    own threads are left alone here (``nano-tfx serve`` sets them first: ``configure_tensorflow``)."""
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
