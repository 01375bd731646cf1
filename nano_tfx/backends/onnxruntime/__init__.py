"""ONNX Runtime backend package (importing it registers ``accelerator='onnxruntime'``).

Duties (see ``nano_tfx.backends.base.Backend``): ``convert`` (tf2onnx + pre-processing),
``space`` (knobs, fallback order), ``quantize`` (calibration feeding; the quantize call itself
is ``OnnxRuntimeBackend.quantize`` in ``backend``), ``diagnose`` (per-layer error), ``coverage``
(INT8 ops counted in the quantized ONNX graph).
"""
from nano_tfx.backends.onnxruntime.backend import MODEL_FILE, OnnxRuntimeBackend, OrtCandidate
from nano_tfx.backends.onnxruntime.convert import OrtPrepared
from nano_tfx.backends.onnxruntime.space import (
    DYNAMIC_WEIGHTED_OPS, FP16_WEIGHTED_OPS, KNOBS, STATIC_WEIGHTED_OPS, cpu_has_vnni,
)

__all__ = [
    "MODEL_FILE", "OnnxRuntimeBackend", "OrtCandidate", "OrtPrepared", "cpu_has_vnni",
    "STATIC_WEIGHTED_OPS", "DYNAMIC_WEIGHTED_OPS", "FP16_WEIGHTED_OPS", "KNOBS",
]
