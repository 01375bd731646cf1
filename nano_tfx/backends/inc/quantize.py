"""What INC's ``fit`` needs around a trial: its dataloader protocol, its stderr capture and a
fence around the temporary files it leaks."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

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


@contextlib.contextmanager
def contained_temp_files(directory: str) -> Iterator[None]:
    """Keep INC's temporary files in ``directory`` and remove them after.

    INC's graph converter calls ``tempfile.mkstemp(suffix=".log")`` per calibration and drops the
    descriptor (one leaked fd and one ``tmp*.log`` in the system temp dir per trial). Point
    ``tempfile`` at our own folder while INC runs, then close the descriptors left open on files
    in it and delete it.
    """
    import shutil
    import tempfile

    os.makedirs(directory, exist_ok=True)
    directory = os.path.realpath(directory)
    saved = tempfile.tempdir
    tempfile.tempdir = directory
    try:
        yield
    finally:
        tempfile.tempdir = saved
        fd_dir = "/proc/self/fd"
        # Every descriptor still open on a file in our folder is one INC dropped (the folder is
        # ours alone), whatever its number (numbers are reused, so no before/after diff).
        for fd in os.listdir(fd_dir) if os.path.isdir(fd_dir) else ():
            try:
                if os.readlink(os.path.join(fd_dir, fd)).startswith(directory + os.sep):
                    os.close(int(fd))
            except OSError:
                pass
        shutil.rmtree(directory, ignore_errors=True)
