"""Keras models with BigDL-Nano's ``quantize()``: ``from nano_tfx.keras import Model, Sequential``.

Which Keras is subclassed follows ``TF_USE_LEGACY_KERAS`` exactly as TensorFlow's ``tf.keras``
does (tf_keras when it is "1"/"true", Keras 3 otherwise), read from the variable itself at
import — never from which package happened to be imported first.
"""
from nano_tfx import _env  # noqa: F401
from nano_tfx.keras.model import KERAS_FLAVOR, Model, Sequential

_env.skip_autograph_for_tf_keras()  # tf_keras models: no multi-second AutoGraph pass over tf_keras itself

__all__ = ["Model", "Sequential", "KERAS_FLAVOR"]
