"""``Model`` and ``Sequential``: drop-in Keras subclasses whose ``quantize()`` is nano-tfx's."""
from __future__ import annotations

import importlib
import os
import types
from typing import Any

from nano_tfx.api import quantize as _quantize
from nano_tfx.interchange import keras_flavor
from nano_tfx.result import QuantizedModel


def _legacy_requested() -> bool:
    return os.environ.get("TF_USE_LEGACY_KERAS", "").strip().lower() in ("1", "true", "yes")


KERAS_FLAVOR = "tf_keras" if _legacy_requested() else "keras3"
_keras = importlib.import_module("tf_keras" if KERAS_FLAVOR == "tf_keras" else "keras")

# Keras 3's own ``Model.quantize(mode)`` (weight-only) modes; they stay reachable.
_KERAS_MODES = ("int8", "float8", "int4")
_NANO_ONLY = {"accelerator", "calib_dataset", "metric", "eval_func", "accuracy_criterion", "approach",
              "tuning_strategy", "timeout", "max_trials", "batch", "x", "y", "input_spec", "sample_size",
              "thread_num", "inputs", "outputs", "method", "onnxruntime_session_options", "openvino_config",
              "precision", "conf", "logging"}


def _nano_quantize(self, *args: Any, **kwargs: Any) -> Any:
    """BigDL-Nano's ``quantize``: see ``nano_tfx.quantize`` for every argument.

    Keras 3's own weight-only quantization stays available: ``model.quantize(mode="int8")``,
    ``model.quantize("float8")``, or ``model.quantize("int8")`` with no other argument.
    """
    keras_own = getattr(self, "_keras_quantize", None)
    if keras_own is not None:
        mode = kwargs.pop("mode", None)
        lone_mode = (len(args) == 1 and not (set(kwargs) & _NANO_ONLY) and isinstance(args[0], str)
                     and args[0] in _KERAS_MODES)
        if mode is not None or lone_mode and (args[0] != "int8" or not kwargs):
            # Keras' wrapper calls the class-level ``quantize`` (ours): flag that Keras' own
            # implementation is wanted there.
            object.__setattr__(self, "_in_keras_quantize", True)
            try:
                return keras_own(mode if mode is not None else args[0], *args[1 if mode is None else 0:], **kwargs)
            finally:
                object.__setattr__(self, "_in_keras_quantize", False)
    return _quantize(self, *args, **kwargs)


class _NanoQuantizeMixin:
    """Keras 3 replaces ``obj.quantize`` on every instance in ``Layer.__new__`` with a wrapper
    that demands ``mode``; a class-level override is never reached. Re-bind per instance,
    keeping Keras' wrapper for its own modes."""

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = super().__new__(cls, *args, **kwargs)
        if not isinstance(obj, cls):  # Keras may hand back another class (functional shortcut)
            return obj
        keras_wrapper = obj.__dict__.get("quantize")
        object.__setattr__(obj, "_keras_quantize", keras_wrapper)
        object.__setattr__(obj, "quantize", types.MethodType(_nano_quantize, obj))
        return obj

    def quantize(self, *args: Any, **kwargs: Any) -> QuantizedModel:
        if getattr(self, "_in_keras_quantize", False):  # reached through Keras 3's wrapper
            return super().quantize(*args, **kwargs)
        return _nano_quantize(self, *args, **kwargs)  # tf_keras: the class method is the entry


def _functional_args(args: tuple, kwargs: dict) -> bool:
    return (len(args) == 2 or (len(args) == 1 and "outputs" in kwargs)
            or ("inputs" in kwargs and "outputs" in kwargs))


def _tensor_flavor(tensor: Any) -> str | None:
    """'tf_keras' / 'keras3' for a symbolic Keras tensor, None for anything else."""
    return keras_flavor(tensor) if type(tensor).__name__ == "KerasTensor" else None


def _check_flavor(inputs: Any) -> None:
    """``inputs`` built by the other Keras fail deep inside Keras ("must be KerasTensors"); say
    why instead. Typical cause: ``tf.keras`` resolved after tensorflow_transform set
    ``TF_USE_LEGACY_KERAS=1``, while this module had been imported without it (or the reverse)."""
    flat = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (list, tuple)) else [inputs]
    other = next((f for f in map(_tensor_flavor, flat) if f is not None and f != KERAS_FLAVOR), None)
    if other is None:
        return
    names = {"keras3": "Keras 3 (`keras`)", "tf_keras": "tf_keras (`tf_keras`, legacy `tf.keras`)"}
    raise ValueError(
        f"inputs: expected {names[KERAS_FLAVOR]} tensors, got {names[other]} tensors. nano_tfx.keras "
        f"subclasses {names[KERAS_FLAVOR]} because TF_USE_LEGACY_KERAS was "
        f"{'set' if KERAS_FLAVOR == 'tf_keras' else 'unset'} when it was imported; it is now "
        f"{os.environ.get('TF_USE_LEGACY_KERAS')!r} (importing tensorflow_transform sets it to '1', which "
        "changes what `tf.keras` means). Set TF_USE_LEGACY_KERAS before importing nano_tfx.keras, or build "
        "the model with the same Keras.")


class Model(_NanoQuantizeMixin, _keras.Model):
    """``keras.Model`` (or ``tf_keras.Model``) with ``quantize()`` returning a ``QuantizedModel``."""

    def __new__(cls, *args: Any, **kwargs: Any):
        # ``Model(inputs=..., outputs=...)``: Keras would splice ``Functional`` into the bases of
        # *this* class for good (``inject_functional_model_class``), breaking every later
        # subclassed ``Model``. Hand out a functional subclass instead.
        if cls is Model and _functional_args(args, kwargs):
            _check_flavor(args[0] if args else kwargs.get("inputs"))
            return super().__new__(FunctionalModel, *args, **kwargs)
        return super().__new__(cls, *args, **kwargs)


_Functional = (importlib.import_module("tf_keras.src.engine.functional") if KERAS_FLAVOR == "tf_keras"
               else importlib.import_module("keras.src.models.functional")).Functional


class FunctionalModel(Model, _Functional):
    """What ``Model(inputs, outputs)`` builds: a nano ``Model`` that is Keras' ``Functional``."""


class Sequential(_NanoQuantizeMixin, _keras.Sequential):
    """``keras.Sequential`` (or ``tf_keras.Sequential``) with ``quantize()``."""
