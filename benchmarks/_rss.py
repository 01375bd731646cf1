"""Peak resident memory of one block of work in this process (Linux; best effort elsewhere).

``PeakRSS`` resets the kernel's high-water mark (``VmHWM``, by writing ``5`` to
``/proc/self/clear_refs``) when the block starts and reads it when it ends: the block's own peak,
even after earlier blocks of the same process peaked higher. Where that file can't be written, a
thread samples ``VmRSS`` every 5 ms instead (a spike shorter than that can be missed), and where
there is no ``/proc`` at all, ``ru_maxrss`` (the process' lifetime peak) is all there is.
Children (subprocesses the block started) are counted by ``ru_maxrss`` of ``RUSAGE_CHILDREN``.
"""
from __future__ import annotations

import resource
import sys
import threading

_STATUS = "/proc/self/status"


def _status_kb(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def lifetime_peak_mb() -> float:
    """``ru_maxrss`` of this process and of its finished children, the larger (MB)."""
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return max(own, kids) / 2 ** 20


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """``with PeakRSS() as p: work()`` → ``p.peak_mb`` (the block's peak resident MB),
    ``p.start_mb`` (resident MB when it started), ``p.delta_mb`` (peak - start), ``p.how``."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.start_mb = self.peak_mb = self.delta_mb = None
        self.how = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0.0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = rss_mb() or 0.0
            self._sampled = max(self._sampled, now)

    def __enter__(self) -> "PeakRSS":
        self.start_mb = rss_mb()
        if _reset_hwm():
            self.how = "VmHWM"
        elif self.start_mb is not None:
            self.how = "sampled"
            self._sampled = self.start_mb
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self.how = "ru_maxrss"
        return self

    def __exit__(self, *exc) -> None:
        if self.how == "VmHWM":
            self.peak_mb = (_status_kb("VmHWM") or 0) / 1024
        elif self.how == "sampled":
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._sampled, rss_mb() or 0.0)
        else:
            self.peak_mb = lifetime_peak_mb()
        scale = 1 if sys.platform == "darwin" else 1024
        kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale / 2 ** 20
        self.peak_mb = max(self.peak_mb, kids)  # a subprocess the block waited for
        if self.start_mb is not None:
            self.delta_mb = self.peak_mb - self.start_mb
