"""Process-wide settings that must be in place before TensorFlow is imported.

INC's INT8 TensorFlow kernels (QuantizedConv2D…AndRequantize) only run when oneDNN is on, and
TensorFlow fixes that when it is imported. ``nano_tfx`` sets ``TF_ENABLE_ONEDNN_OPTS=1`` when it
is imported first; the project's venv also sets it at interpreter start (``nano_tfx_env.pth``,
written by ``scripts/setup.sh``), so ``import tensorflow`` before ``import nano_tfx`` works too.
"""
import os
import sys

_TF_ALREADY_IMPORTED = "tensorflow" in sys.modules
_ONEDNN_REQUESTED = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


def onednn_enabled() -> bool:
    """Whether the running TensorFlow really has oneDNN kernels on (INC's INT8 needs them)."""
    if _TF_ALREADY_IMPORTED and _ONEDNN_REQUESTED != "1":
        return False  # TensorFlow started without it; setting the variable now is too late
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def skip_autograph_for_tf_keras() -> None:
    """Keep AutoGraph out of tf_keras' own code, as TensorFlow does for ``keras``.

    TF 2.16's AutoGraph rules say ``DoNotConvert('keras')`` but know nothing of the renamed
    ``tf_keras`` package, so the first ``fit``/``predict`` of a tf_keras model transpiles hundreds
    of tf_keras internals (train_step, metrics, optimizers): ~20 s on a quiet 2-core machine, over
    a minute on a busy one, instead of ~2 s. Idempotent; user functions are still converted.
    Called by ``nano_tfx.keras`` and the pipelines' Trainer modules (TFX imports TensorFlow itself).
    """
    try:
        from tensorflow.python.autograph.core import config
    except ImportError:  # pragma: no cover - private module moved
        return
    rules = tuple(config.CONVERSION_RULES)
    if not any(isinstance(r, config.DoNotConvert) and getattr(r, "_prefix", None) == "tf_keras" for r in rules):
        config.CONVERSION_RULES = (config.DoNotConvert("tf_keras"),) + rules
