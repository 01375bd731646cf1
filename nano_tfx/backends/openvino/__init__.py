"""OpenVINO backend package (importing it registers ``accelerator='openvino'``).

Duties (see ``nano_tfx.backends.base.Backend``): ``convert`` (FP32 IR with stable names),
``backend`` (search space, NNCF quantization, load), ``diagnose`` (per-layer error through
``Model.add_outputs``), ``core`` (the process-wide ``ov.Core`` and CPU capabilities both use),
``coverage`` (INT8 ops counted on the compiled runtime graph).
"""
from nano_tfx.backends.openvino.backend import (
    MODEL_BIN, MODEL_XML, OpenVINOBackend, OpenVINOCandidate, OpenVINOPrepared, cpu_capabilities,
)

__all__ = ["MODEL_BIN", "MODEL_XML", "OpenVINOBackend", "OpenVINOCandidate", "OpenVINOPrepared", "cpu_capabilities"]
