"""Write the quantized model in the layout its model server loads (see ``SERVING.md``).

* ``accelerator=None`` (INC, TF graph): ``Format-Serving/`` is a TF SavedModel whose
  ``serving_default`` takes serialized raw ``tf.Example`` strings (input ``examples``), runs the
  FP32 tf.Transform graph and then the INT8 graph — the same request as the FP32 model, so TF
  Serving and the Pusher treat it like any Trainer model. ``from_transformed_features`` is kept
  too. nano-tfx's own files (``nano_tfx.json``, ``int8_graph.pb``) sit beside it, so
  ``nano_tfx.load`` reads the same directory.
* ``openvino``: ``Format-Serving/model.xml`` + ``model.bin`` (OpenVINO Model Server loads a
  numeric version directory holding one IR; the Pusher's ``<base>/<timestamp>/`` is one).
* ``onnxruntime``: ``Format-Serving/model.onnx`` (OVMS and Triton's ``onnxruntime`` backend load
  ``<model>/<version>/model.onnx``; a Triton ``config.pbtxt`` is written at the artifact root).
  These models take *transformed* features: ``Format-Serving/transform_graph/`` is the Transform
  output to apply first (``tft.TFTransformOutput(path).transform_features_layer()``).
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Optional, Sequence

SERVING_DIR = "Format-Serving"
TRANSFORM_DIR = "transform_graph"
SERVING_DOC = "SERVING.md"
#: what a request carries, for ``nano-tfx serve`` (components/serving): the raw feature keys
SERVING_MANIFEST = "serving.json"


def raw_parse_keys(fp32_model_path: str) -> Optional[list[str]]:
    """The raw feature keys the FP32 ``serving_default`` parses (read from its ParseExample op).

    Quantized serving then parses exactly these: same request as the FP32 model, label excluded.
    """
    from tensorflow.python.framework import tensor_util
    from tensorflow.python.tools import saved_model_utils

    try:
        meta = saved_model_utils.get_meta_graph_def(fp32_model_path, "serve")
    except Exception:  # noqa: BLE001
        return None
    found: list[tuple[str, list[str]]] = []
    for fn in meta.graph_def.library.function:
        nodes = {n.name: n for n in fn.node_def}
        for node in fn.node_def:
            if node.op not in ("ParseExampleV2", "ParseExample"):
                continue
            keys: list[str] = []
            slots = (2, 3, 4) if node.op == "ParseExampleV2" else ()
            inputs = list(node.input)
            for i in slots:
                if i >= len(inputs):
                    continue
                src = nodes.get(inputs[i].split(":")[0])
                if src is None or src.op != "Const":
                    break
                keys += [k.decode() for k in tensor_util.MakeNdarray(src.attr["value"].tensor).ravel()]
            else:
                if node.op == "ParseExample":
                    keys = list(node.attr["dense_keys"].list.s) if "dense_keys" in node.attr else []
                found.append((fn.signature.name, sorted(keys)))
    distinct = {tuple(k) for _, k in found if k}
    if len(distinct) == 1:
        return list(distinct.pop())
    serve = {tuple(k) for name, k in found if k and "serv" in name}
    return list(serve.pop()) if len(serve) == 1 else None


def write_tf_serving_model(
    quantized_dir: str,
    transform_graph_uri: str,
    out_dir: str,
    parse_keys: Optional[Sequence[str]],
    exclude_keys: Sequence[str] = (),
) -> list[str]:
    """Compose raw examples → FP32 TFT layer → INT8 graph into a SavedModel at ``out_dir``.

    ``quantized_dir`` is a ``QuantizedModel.save`` directory of the INC backend (a SavedModel
    whose ``serving_default`` takes the transformed features). Returns the parsed raw keys.
    """
    import tensorflow as tf
    import tensorflow_transform as tft

    from components.quantizer.signatures import EXAMPLES_INPUT, FROM_TRANSFORMED_FEATURES

    tft_output = tft.TFTransformOutput(transform_graph_uri)
    raw_spec = dict(tft_output.raw_feature_spec())
    if parse_keys:
        raw_spec = {k: v for k, v in raw_spec.items() if k in set(parse_keys)}
    for k in exclude_keys:
        raw_spec.pop(k, None)

    quantized = tf.saved_model.load(quantized_dir)
    qfn = quantized.signatures["serving_default"]
    in_specs = qfn.structured_input_signature[1]
    names = sorted(in_specs)
    specs = [tf.TensorSpec(in_specs[n].shape, in_specs[n].dtype, name=n) for n in names]

    module = tf.Module()
    module.quantized = quantized
    module.tft_layer = tft_output.transform_features_layer()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def serve_tf_examples_fn(serialized):
        raw = tf.io.parse_example(serialized, raw_spec)
        transformed = module.tft_layer(raw)
        return qfn(**{n: tf.cast(transformed[n], in_specs[n].dtype) for n in names})

    @tf.function(input_signature=specs)
    def from_transformed_features_fn(*tensors):
        return qfn(**dict(zip(names, tensors)))

    module.serve = serve_tf_examples_fn
    module.from_transformed = from_transformed_features_fn
    tf.saved_model.save(
        module,
        out_dir,
        signatures={
            "serving_default": serve_tf_examples_fn.get_concrete_function(),
            FROM_TRANSFORMED_FEATURES: from_transformed_features_fn.get_concrete_function(),
        },
    )
    # nano-tfx's own files next to the SavedModel: nano_tfx.load(out_dir) works as well.
    for name in os.listdir(quantized_dir):
        src = os.path.join(quantized_dir, name)
        if os.path.isfile(src) and name not in ("saved_model.pb", "fingerprint.pb"):
            shutil.copy2(src, os.path.join(out_dir, name))
    return sorted(raw_spec)


def write_serving_manifest(out_dir: str, parse_keys: Optional[Sequence[str]]) -> None:
    """Record the raw features the FP32 ``serving_default`` parses (label excluded), so a model
    server parses exactly these before applying ``transform_graph/``."""
    import json

    with open(os.path.join(out_dir, SERVING_MANIFEST), "w") as f:
        json.dump({"raw_feature_keys": sorted(parse_keys) if parse_keys else None}, f)


#: A copy of ``transform_graph/transform_fn/saved_model.pb`` under a name TFX's Pusher keeps: its
#: filesystem push copies the model folder with ``deny_regex_patterns=[r'saved_model\.pb']`` and
#: puts back only the *top-level* ``saved_model.pb``, so a nested SavedModel arrives without its
#: graph. The model server restores it from this copy (``transform_graph_dir``).
PUSHER_SAFE_PROTO = "saved_model_proto.bin"


def copy_transform_graph(transform_graph_uri: str, out_dir: str) -> None:
    dst = os.path.join(out_dir, TRANSFORM_DIR)
    shutil.copytree(transform_graph_uri, dst, dirs_exist_ok=True)
    proto = os.path.join(dst, "transform_fn", "saved_model.pb")
    if os.path.isfile(proto):
        shutil.copy2(proto, os.path.join(dst, "transform_fn", PUSHER_SAFE_PROTO))


def transform_graph_dir(model_dir: str) -> str:
    """The usable ``transform_graph/`` of a layout: in place, or - after TFX's Pusher dropped the
    nested ``saved_model.pb`` - a private copy with the graph restored from ``PUSHER_SAFE_PROTO``
    (the pushed folder itself is never written to). Removed at interpreter exit."""
    src = os.path.join(model_dir, TRANSFORM_DIR)
    fn = os.path.join(src, "transform_fn")
    if os.path.isfile(os.path.join(fn, "saved_model.pb")) or not os.path.isfile(os.path.join(fn, PUSHER_SAFE_PROTO)):
        return src
    import atexit
    import tempfile

    work = tempfile.mkdtemp(prefix="nano_tfx_transform_")
    atexit.register(shutil.rmtree, work, True)
    dst = os.path.join(work, TRANSFORM_DIR)
    shutil.copytree(src, dst)
    shutil.copy2(os.path.join(fn, PUSHER_SAFE_PROTO), os.path.join(dst, "transform_fn", "saved_model.pb"))
    return dst


def triton_config(model_name: str, inputs: Sequence[Any], outputs: Sequence[Any]) -> str:
    """A Triton ``config.pbtxt`` for an ONNX model (Triton can also auto-complete it)."""
    def dtype(d: str) -> str:
        return {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "object": "TYPE_STRING"}.get(d, "TYPE_FP32")

    def block(kind: str, tensors: Sequence[Any]) -> str:
        items = []
        for t in tensors:
            dims = ", ".join(str(-1 if d is None else d) for d in t.shape[1:])
            items.append(f'  {{ name: "{t.name}" data_type: {dtype(t.dtype)} dims: [ {dims} ] }}')
        return f"{kind} [\n" + ",\n".join(items) + "\n]"

    return (
        f'name: "{model_name}"\nbackend: "onnxruntime"\nmax_batch_size: 0\n'
        + block("input", inputs) + "\n" + block("output", outputs) + "\n"
    )


def serving_doc(backend: str, parse_keys: Optional[Sequence[str]], inputs: Sequence[Any],
                outputs: Sequence[Any]) -> str:
    ins = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in inputs)
    outs = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in outputs)
    if backend == "inc":
        return (
            "# Quantized model (INT8, TensorFlow graph)\n\n"
            "A TF SavedModel: serve this directory with TF Serving exactly like the FP32 model.\n\n"
            "* `serving_default`: input `examples` = serialized raw tf.Example strings with features "
            f"{list(parse_keys or [])}; runs the FP32 tf.Transform graph, then the INT8 graph.\n"
            f"* `from_transformed_features`: transformed features ({ins}) -> {outs}.\n"
            "* `nano_tfx.load(<this dir>)` loads the INT8 graph alone (transformed features in).\n"
        )
    files = "`model.xml` + `model.bin` (OpenVINO IR)" if backend == "openvino" else "`model.onnx`"
    server = (
        "OpenVINO Model Server: `--model_path <push base directory> --model_name <name>`"
        if backend == "openvino"
        else "OpenVINO Model Server (`--model_path <push base directory>`) or Triton "
        "(`<repository>/<name>/<version>/model.onnx`; `config.pbtxt` at the quantized_model "
        "artifact root, or let Triton auto-complete it)"
    )
    return (
        f"# Quantized model ({backend})\n\n"
        f"{files} in this directory; the Pusher's `<base_directory>/<version>/` is the numeric "
        f"version directory {server} expects.\n\n"
        f"Inputs are the *transformed* features: {ins}; outputs: {outs}.\n\n"
        f"`{TRANSFORM_DIR}/` is the Transform output. TFX's filesystem Pusher drops nested "
        f"`saved_model.pb` files: in a pushed copy, restore `{TRANSFORM_DIR}/transform_fn/saved_model.pb` "
        f"from `{PUSHER_SAFE_PROTO}` beside it (`nano-tfx serve` does this itself). Apply it to raw "
        "features first, e.g.\n\n"
        "```python\n"
        "import tensorflow_transform as tft\n"
        f"layer = tft.TFTransformOutput('{TRANSFORM_DIR}').transform_features_layer()\n"
        "transformed = layer(raw_features)  # dict of raw feature tensors\n"
        "```\n\n"
        "`nano_tfx.load(<this dir>)` runs the model in Python (transformed features in).\n\n"
        "Or serve raw tf.Examples (the FP32 model's request) on the V2 Open Inference Protocol:\n"
        "`nano-tfx serve <this dir> --name NAME --port 8080`.\n"
    )
