"""nano-tfx: one-call, accuracy-controlled INT8 post-training quantization for TF/Keras.

    import nano_tfx
    q = nano_tfx.quantize(model, calib_dataset=ds, metric=..., accuracy_criterion={...})
    q.save("q"); q = nano_tfx.load("q")
"""
from nano_tfx import _env  # noqa: F401  (must run before TensorFlow is imported)
from nano_tfx._env import skip_autograph_for_tf_keras
from nano_tfx.api import quantize
from nano_tfx.criterion import AccuracyCriterion
from nano_tfx.data import BatchSource
from nano_tfx.errors import AccuracyCriterionNotMet, QuantizationFailed, SpeedupNotMet
from nano_tfx.report import Report, TrialRecord
from nano_tfx.result import QuantizedModel, load

__all__ = [
    "quantize", "load", "QuantizedModel", "AccuracyCriterionNotMet", "SpeedupNotMet", "QuantizationFailed",
    "AccuracyCriterion",
    "Report", "TrialRecord", "BatchSource", "skip_autograph_for_tf_keras",
]
__version__ = "0.1.0"
