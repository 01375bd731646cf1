"""Intel Neural Compressor backend package (importing it registers ``accelerator=None``).

Duties (see ``nano_tfx.backends.base.Backend``): ``convert`` (frozen TF graph), ``quantize``
(INC's dataloader protocol; the ``fit`` call is ``IncBackend.quantize`` in ``backend``),
``diagnose`` (per-layer error of the INT8 TF graph against the FP32 graph), ``coverage`` (INT8
ops counted in the quantized GraphDef).
"""
from nano_tfx.backends.inc.backend import IncBackend, IncCandidate

__all__ = ["IncBackend", "IncCandidate"]
