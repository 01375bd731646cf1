"""What INC's ``fit`` needs around a trial: its dataloader protocol and its stderr capture."""
from __future__ import annotations

from typing import Sequence

from nano_tfx.backends.base import CalibrationData


class _Loader:
    """INC's calibration dataloader protocol: ``batch_size`` + iterable of ``(inputs, label)``."""

    def __init__(self, data: CalibrationData, names: Sequence[str]):
        self.data, self.names = data, list(names)
        first = next(iter(data))
        self.batch_size = int(len(first[0]))
        self.samples = sum(len(b[0]) for b in data)

    def __iter__(self):
        for xs in self.data:
            yield (xs[0] if len(xs) == 1 else dict(zip(self.names, xs))), 0


def _capture_calibration_on_fd2() -> None:
    """INC reads calibration ranges that TF's Print ops write to file descriptor 2, by
    redirecting the fd of whatever ``sys.stderr`` was when INC was imported. Under pytest,
    Jupyter or a Beam worker that object is not fd 2 and calibration silently reads nothing
    ("list index out of range"). Point it at the real stderr."""
    import sys

    from neural_compressor.utils import utility

    if sys.__stderr__ is not None:
        utility.CaptureOutputToFile.__init__.__defaults__ = (sys.__stderr__,)
