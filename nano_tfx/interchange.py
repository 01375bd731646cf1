"""Any Keras model (Keras 3 or tf_keras) or a SavedModel directory → one interchange form.

Every backend consumes a ``SavedModelSource``: a SavedModel path, the signature to quantize and
the ordered input/output tensor descriptions. Keras objects are exported once, here, so the
backends never need to know which Keras built the model.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int | None, ...]  # first dim is the batch dim (None when free)
    dtype: str  # numpy dtype name, e.g. "float32"

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "TensorInfo":
        return TensorInfo(data["name"], tuple(data["shape"]), data["dtype"])


@dataclass(frozen=True)
class SavedModelSource:
    """A SavedModel + the signature every backend quantizes. Pure data: safe to pickle."""

    path: str
    signature_key: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    keras_flavor: str | None = None  # "keras3" | "tf_keras" | None (a SavedModel given by path)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "signature_key": self.signature_key,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "keras_flavor": self.keras_flavor,
        }

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "SavedModelSource":
        return SavedModelSource(
            data["path"],
            data["signature_key"],
            tuple(TensorInfo.from_dict(t) for t in data["inputs"]),
            tuple(TensorInfo.from_dict(t) for t in data["outputs"]),
            data.get("keras_flavor"),
        )

    def load_signature(self):
        """The TF concrete function (FP32 reference and INC's input)."""
        import tensorflow as tf

        loaded = tf.saved_model.load(self.path)
        if self.signature_key not in loaded.signatures:
            raise ValueError(
                f"signature_name: SavedModel {self.path!r} has no signature {self.signature_key!r}; "
                f"it has {sorted(loaded.signatures)}"
            )
        return loaded, loaded.signatures[self.signature_key]


def keras_flavor(model: Any) -> str | None:
    """'keras3', 'tf_keras' or None, from the object's class hierarchy (never import order)."""
    for cls in type(model).__mro__:
        mod = cls.__module__ or ""
        if mod.startswith("tf_keras") or mod.startswith("keras.src.engine") or mod.startswith(
            "tensorflow.python.keras"
        ):
            return "tf_keras"
        if mod.startswith("keras"):
            return "keras3"
    return None


def is_saved_model_dir(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(
        os.path.join(os.fspath(path), "saved_model.pb")
    )


def _safe_name(name: str, index: int, prefix: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", name or "")
    name = re.sub(r"_+", "_", name).strip("_")
    if not name or not name[0].isalpha():
        name = f"{prefix}_{index}"
    return name


def _spec_list(input_spec: Any) -> list:
    """Normalise a user ``input_spec`` (TensorSpec, shape tuple, or a list/dict of them)."""
    import tensorflow as tf

    def one(spec, i):
        if isinstance(spec, tf.TensorSpec):
            return spec
        if isinstance(spec, (tuple, list)) and all(d is None or isinstance(d, int) for d in spec):
            return tf.TensorSpec(shape=tuple(spec), dtype=tf.float32, name=f"input_{i}")
        raise ValueError(
            f"input_spec: expected tf.TensorSpec, a shape tuple, or a list of them, got {spec!r}"
        )

    if isinstance(input_spec, Mapping):
        return [
            tf.TensorSpec(s.shape, s.dtype, name=k) if isinstance(s, tf.TensorSpec) else one(s, i)
            for i, (k, s) in enumerate(input_spec.items())
        ]
    if isinstance(input_spec, tf.TensorSpec) or (
        isinstance(input_spec, (tuple, list))
        and input_spec
        and all(d is None or isinstance(d, int) for d in input_spec)
    ):
        return [one(input_spec, 0)]
    if isinstance(input_spec, (tuple, list)) and input_spec:
        return [one(s, i) for i, s in enumerate(input_spec)]
    raise ValueError(
        f"input_spec: expected tf.TensorSpec, a shape tuple, or a list of them, got {input_spec!r}"
    )


def keras_input_specs(model: Any, input_spec: Any = None) -> list:
    """TensorSpecs of a Keras model's inputs, batch dim free, from the model or ``input_spec``."""
    import tensorflow as tf

    if input_spec is not None:
        specs = _spec_list(input_spec)
    else:
        inputs = None
        try:
            inputs = model.inputs
        except (AttributeError, ValueError):
            inputs = None
        if inputs:
            specs = [
                tf.TensorSpec(
                    shape=(None,) + tuple(t.shape[1:]),
                    dtype=tf.as_dtype(getattr(t.dtype, "name", t.dtype)),
                    name=getattr(t, "name", None) or f"input_{i}",
                )
                for i, t in enumerate(inputs)
            ]
        else:
            saved_spec = None
            try:  # tf_keras remembers what a subclassed model was first called with
                saved_spec = model.save_spec()
            except Exception:
                saved_spec = None
            if saved_spec:
                args = saved_spec[0] if isinstance(saved_spec, tuple) else saved_spec
                flat = tf.nest.flatten(args)
                specs = [
                    tf.TensorSpec((None,) + tuple(s.shape[1:]), s.dtype, name=f"input_{i}")
                    for i, s in enumerate(flat)
                ]
            else:
                raise ValueError(
                    "input_spec: this model has no known inputs (subclassed, or Sequential without "
                    "an Input); pass input_spec=tf.TensorSpec((None, ...), tf.float32)"
                )
    named = []
    seen: set[str] = set()
    for i, s in enumerate(specs):
        name = _safe_name(s.name or "", i, "input")
        while name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        named.append(tf.TensorSpec(s.shape, s.dtype, name=name))
    return named


def _output_names(model: Any, n: int) -> list[str]:
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != n:
        names = [f"output_{i}" for i in range(n)]
    out, seen = [], set()
    for i, name in enumerate(names):
        name = _safe_name(name, i, "output")
        while name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        out.append(name)
    return out


def export_keras(model: Any, path: str, input_spec: Any = None) -> SavedModelSource:
    """Export a Keras 3 or tf_keras model as a SavedModel with one ``serving_default``."""
    import tensorflow as tf

    flavor = keras_flavor(model)
    specs = keras_input_specs(model, input_spec)
    single = len(specs) == 1

    def call(*args):
        x = args[0] if single else list(args)
        return model(x, training=False)

    # Trace once to learn the output structure, then name outputs.
    probe = tf.function(call).get_concrete_function(*specs)
    flat_outputs = tf.nest.flatten(probe.structured_outputs)
    if isinstance(probe.structured_outputs, Mapping):
        # tf.nest.flatten orders a dict by sorted key: name the flat tensors the same way.
        out_names = [_safe_name(k, i, "output") for i, k in enumerate(sorted(probe.structured_outputs))]
    else:
        out_names = _output_names(model, len(flat_outputs))

    @tf.function(input_signature=specs)
    def serve(*args):
        outs = tf.nest.flatten(call(*args))
        return {name: tf.identity(o, name=name) for name, o in zip(out_names, outs)}

    module = tf.Module()
    module.model = model  # tracks the variables, whatever Keras made them
    module.serve = serve
    tf.saved_model.save(module, path, signatures={"serving_default": serve.get_concrete_function()})
    outputs = tuple(
        TensorInfo(n, tuple(o.shape.as_list()), np.dtype(o.dtype.as_numpy_dtype).name)
        for n, o in zip(out_names, flat_outputs)
    )
    inputs = tuple(
        TensorInfo(s.name, tuple(s.shape.as_list()), np.dtype(s.dtype.as_numpy_dtype).name) for s in specs
    )
    return SavedModelSource(os.path.abspath(path), "serving_default", inputs, outputs, flavor)


def describe_saved_model(
    path: str, signature_key: str = "serving_default", input_names: Sequence[str] | None = None
) -> SavedModelSource:
    """Read a SavedModel directory's signature into a ``SavedModelSource``."""
    import tensorflow as tf

    if not is_saved_model_dir(path):
        raise ValueError(f"model: {path!r} is not a SavedModel directory (no saved_model.pb)")
    try:
        loaded = tf.saved_model.load(os.fspath(path))
    except Exception as err:  # noqa: BLE001 - TF's message names no argument ("tags=", "0 MetaGraphs")
        line = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise ValueError(
            f"model: {path!r} is not a readable SavedModel (saved_model.pb or variables/ damaged?): {line}"
        ) from err
    if signature_key not in loaded.signatures:
        raise ValueError(
            f"signature_name: SavedModel {path!r} has no signature {signature_key!r}; "
            f"it has {sorted(loaded.signatures)}"
        )
    fn = loaded.signatures[signature_key]
    in_specs = fn.structured_input_signature[1]
    names = list(input_names) if input_names else sorted(in_specs)
    unknown = [n for n in names if n not in in_specs]
    if unknown:
        raise ValueError(f"inputs: {unknown} are not inputs of signature {signature_key!r}: {sorted(in_specs)}")
    inputs = tuple(
        TensorInfo(n, tuple(in_specs[n].shape.as_list()), np.dtype(in_specs[n].dtype.as_numpy_dtype).name)
        if in_specs[n].dtype != tf.string
        else TensorInfo(n, tuple(in_specs[n].shape.as_list()), "object")
        for n in names
    )
    outs = fn.structured_outputs
    outputs = tuple(
        TensorInfo(k, tuple(v.shape.as_list()), np.dtype(v.dtype.as_numpy_dtype).name)
        for k, v in sorted(outs.items())
    )
    return SavedModelSource(os.path.abspath(os.fspath(path)), signature_key, inputs, outputs, None)


def to_saved_model(
    model: Any,
    workdir: str,
    input_spec: Any = None,
    signature_key: str = "serving_default",
    input_names: Sequence[str] | None = None,
) -> SavedModelSource:
    """The interchange entry point: a Keras model object or a SavedModel path → source."""
    if isinstance(model, (str, os.PathLike)):
        return describe_saved_model(os.fspath(model), signature_key, input_names)
    if keras_flavor(model) is None:
        raise ValueError(
            f"model: expected a Keras model (Keras 3 or tf_keras) or a SavedModel directory, "
            f"got {type(model).__name__}"
        )
    return export_keras(model, os.path.join(workdir, "fp32_saved_model"), input_spec)


def export_signature_as_default(model_path: str, signature_name: str, out_dir: str) -> str:
    """A SavedModel whose only signature, ``serving_default``, is ``signature_name`` of
    ``model_path`` (the transformed-features model alone, no tf.Transform graph).

    Every backend then sees exactly the part to quantize, whatever SavedModel route it takes
    (INC's ``fit(saved_model_dir)`` e.g. always uses ``serving_default``).
    """
    import tensorflow as tf

    loaded = tf.saved_model.load(model_path)
    fn = loaded.signatures[signature_name]
    kwargs = fn.structured_input_signature[1]
    names = sorted(kwargs)
    specs = [tf.TensorSpec(kwargs[n].shape, kwargs[n].dtype, name=n) for n in names]

    module = tf.Module()
    module.fp32 = loaded

    @tf.function(input_signature=specs)
    def serve(*tensors):
        return fn(**dict(zip(names, tensors)))

    module.serve = serve
    tf.saved_model.save(module, out_dir, signatures={"serving_default": serve.get_concrete_function()})
    return out_dir
