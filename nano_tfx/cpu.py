"""What this CPU can compute fast, read from its flags (Linux ``/proc/cpuinfo``, what ``lscpu``
shows), decided once per process.

``NANO_TFX_BF16=0|1`` forces the BF16 answer: ``0`` makes ``precision='auto'`` skip its BF16
rungs on a BF16 CPU (a user who wants FP32-exact fallback layers; the tests of the other branch),
``1`` makes it try them on a CPU without native BF16 (where the engines then compute in FP32 or
refuse: the rung is measured or recorded as failed, never assumed).
"""
from __future__ import annotations

import os
from functools import lru_cache

#: the flags that give native BF16 dot products (AVX-512 BF16, AMX) and INT8 ones (VNNI, AMX)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The CPU's flags; None when unknown (not Linux, no /proc)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_has_vnni() -> bool | None:
    """Whether the x86 CPU has VNNI/AMX int8 dot products; None when unknown. Without them U8S8
    int8 kernels sum pairs into saturating int16 (VPMADDUBSW): the backends then default to 7-bit
    weights and let the tuner try 8-bit ones."""
    flags = cpu_flags()
    return None if flags is None else bool(flags & set(VNNI_FLAGS))


def bf16_support() -> tuple[bool, str]:
    """(whether BF16 rungs run here, why), ``NANO_TFX_BF16`` first (see the module doc)."""
    forced = os.environ.get("NANO_TFX_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1", f"NANO_TFX_BF16={forced}"
    flags = cpu_flags()
    have = sorted(set(BF16_FLAGS) & (flags or frozenset()))
    if have:
        return True, f"the CPU has {' + '.join(have)}"
    if flags is None:
        return False, "the CPU's flags are unknown (no /proc/cpuinfo)"
    return False, "the CPU has no native BF16 (no avx512_bf16 or amx_bf16 flag)"
