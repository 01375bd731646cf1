"""Process-wide OpenVINO state shared by ``backend`` and ``diagnose``: one ``ov.Core`` and the
CPU plugin's capabilities. It sits below both so neither has to import the other."""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _core():
    import openvino as ov  # lazy: importing the package must not load the runtime

    return ov.Core()


@lru_cache(maxsize=1)
def cpu_capabilities() -> frozenset[str]:
    """``OPTIMIZATION_CAPABILITIES`` of the CPU plugin, e.g. {'FP32', 'INT8', 'BF16', 'FP16'}."""
    try:
        return frozenset(str(c) for c in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # pragma: no cover - plugin missing/broken: only what every CPU does
        return frozenset({"FP32", "INT8"})
