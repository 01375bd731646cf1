"""Issue 19 item 4: peak RSS does not grow with the calibration (or evaluation) size.

Each measurement runs in a fresh subprocess (the peak is a process-wide mark): build a small conv
net on 256x256 images, note the resident memory, quantize with calibration data streamed from a
generator function (the caller holds nothing), and report the peak's increment over that start.
Only memory is asserted, never time. 100 vs 800 calibration images: a backend that materialised
the calibration set, or every layer's activations for every sample, would grow by hundreds of MB
(700 more images are 525 MB); a bounded one by a few tens of MB of allocator noise. The backend's
build (calibration + quantization) is measured on its own too: the model conversion before it
peaks higher than a bounded calibration and would hide its growth in the whole call's peak.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


_CHILD = r"""
import json, resource, sys
import nano_tfx
import numpy as np
import keras

backend, calib, evaluate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
keras.utils.set_random_seed(0)
inp = keras.Input((256, 256, 3))  # large inputs, cheap compute: data dominates what could grow
h = keras.layers.Conv2D(16, 4, strides=4, activation="relu")(inp)
h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(h)
h = keras.layers.MaxPooling2D(4)(h)
h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
h = keras.layers.GlobalAveragePooling2D()(h)
out = keras.layers.Dense(10, activation="softmax")(h)
model = keras.Model(inp, out)

def rows(n, seed):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 256, 256, 3)).astype(np.float32)

def data():  # regenerated on every pass: one batch of 16 rows is all the caller holds
    for i in range(0, calib, 16):
        x = rows(min(16, calib - i), i)
        yield (x, np.argmax(model(x).numpy(), -1)) if evaluate else x

def status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 1024

def mark():  # the high-water mark restarts here; returns the resident MB now
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mb("VmRSS")

# The backend's build (calibration + quantization, one trial) measured on its own: the
# conversion before it peaks higher than a bounded calibration and would hide its growth.
from nano_tfx.backends.base import backend_class
cls = backend_class(None if backend == "inc" else backend)
builds = []
original = cls.build
def build(self, *args, **kwargs):
    start = mark()
    try:
        return original(self, *args, **kwargs)
    finally:
        builds.append(status_mb("VmHWM") - start)
cls.build = build

model(rows(2, 0))  # built and traced before the start mark
kwargs = dict(metric="accuracy", max_trials=2) if evaluate else {}
start = mark()
q = nano_tfx.quantize(model, accelerator=None if backend == "inc" else backend, calib_dataset=data,
                      sample_size=calib, **kwargs)
print(json.dumps({"call": max(status_mb("VmHWM") - start, *builds), "build": max(builds),
                  "trials": len(q.report.trials)}))
"""


def _increments_mb(backend: str, calib: int, tmp_path, evaluate: bool = False) -> dict:
    """Peak RSS increments (MB): ``build`` over the largest backend build (calibration and
    quantization), ``call`` over the whole ``quantize`` call (evaluation too)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _CHILD, backend, str(calib), str(int(evaluate))],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                                reason="needs Linux /proc/self/clear_refs to reset the peak RSS")


#: MB of the 700 images 800 has more than 100 (256 x 256 x 3 float32)
EXTRA_MB = 700 * 256 * 256 * 3 * 4 / 2 ** 20


def _bounded(small: float, large: float) -> bool:
    """8x the data, the peak grows by less than a fifth of the extra images' bytes (30 MB at
    least: allocator noise). Holding the calibration set grows it by about all of them."""
    return large - small < max(30.0, 0.2 * EXTRA_MB)


@needs_proc
def test_onnxruntime_calibration_memory_does_not_grow_with_calibration_size(tmp_path):
    small = _increments_mb("onnxruntime", 100, tmp_path)
    large = _increments_mb("onnxruntime", 800, tmp_path)
    # a materialised calibration set fails here
    assert _bounded(small["build"], large["build"]), (small, large)
    assert _bounded(small["call"], large["call"]), (small, large)


@needs_proc
@pytest.mark.extended  # one subprocess pair per backend: minutes
@pytest.mark.parametrize("backend", ["inc", "openvino"])
def test_calibration_memory_does_not_grow_on_every_backend(backend, tmp_path):
    small = _increments_mb(backend, 100, tmp_path)
    large = _increments_mb(backend, 800, tmp_path)
    assert _bounded(small["build"], large["build"]), (backend, small, large)
    assert _bounded(small["call"], large["call"]), (backend, small, large)


@needs_proc
@pytest.mark.extended  # tuning with evaluation in subprocesses: minutes
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_evaluation_memory_does_not_grow_with_evaluation_size(backend, tmp_path):
    small = _increments_mb(backend, 100, tmp_path, evaluate=True)
    large = _increments_mb(backend, 800, tmp_path, evaluate=True)
    assert _bounded(small["call"], large["call"]), (backend, small, large)


def test_onnxruntime_reader_streams_pieces_within_the_byte_budget(monkeypatch):
    """Batches larger than the budget are cut into pieces; every row comes out once, in order,
    through ORT's strided set_range walk; histogram calibrators get equal-sized pieces."""
    import numpy as np

    from nano_tfx.backends.onnxruntime import quantize as q

    monkeypatch.setattr(q, "_CALIB_BYTES", 8 * 1000)  # 8 rows of 1000 bytes per chunk
    x = np.arange(70 * 3, dtype=np.float32).reshape(70, 3)
    batches = [[x[i:i + 32]] for i in range(0, 70, 32)]  # 32, 32, 6 rows
    passes = []

    class Counted(list):
        def __iter__(self):
            passes.append(1)
            return super().__iter__()

    reader = q._calibration_reader(Counted(batches), ["x"], row_bytes=1000)
    assert len(reader) == 4 + 4 + 1 and reader.stride == 1  # 8-row pieces; one piece per chunk
    got = []
    for start in range(0, len(reader), reader.stride):
        reader.set_range(start, start + reader.stride)
        while (item := reader.get_next()) is not None:
            assert len(item["x"]) <= 8
            got.append(item["x"])
    np.testing.assert_array_equal(np.concatenate(got), x)
    assert len(passes) == 2  # one counting pass, one streamed pass: nothing re-read, nothing held

    uniform = q._calibration_reader(batches, ["x"], uniform=True, row_bytes=1000)
    sizes = []
    uniform.set_range(0, len(uniform))
    while (item := uniform.get_next()) is not None:
        sizes.append(len(item["x"]))
    assert set(sizes) == {8}


def test_diagnosis_taps_in_slices_with_the_same_numbers(monkeypatch):
    """Slicing a batch for the taps changes no number of the per-layer rows."""
    import numpy as np

    from nano_tfx import diagnosis

    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 6)).astype(np.float32)
    seen_rows = []

    def fp32(batch):
        seen_rows.append(len(batch[0]))
        h = batch[0] @ w
        return {"dense": (batch[0], h)}

    def quantized(batch):
        xq = np.round(batch[0] * 8) / 8
        return {"dense": (xq, xq @ w)}

    batches = [[rng.normal(size=(40, 6)).astype(np.float32)] for _ in range(3)]
    whole = diagnosis.compare([("dense", "MatMul")], fp32, quantized, batches)
    assert max(seen_rows) == 40
    seen_rows.clear()
    monkeypatch.setattr(diagnosis, "_TAP_BYTES", 4 * 6 * 4 * 5)  # 5 rows of both taps' arrays
    sliced = diagnosis.compare([("dense", "MatMul")], fp32, quantized, batches)
    assert max(seen_rows) <= 5 and sum(seen_rows) == 120
    for key in ("sqnr_db", "mse", "added_mse", "input_sqnr_db", "fp32_min", "fp32_max"):
        assert sliced[0][key] == pytest.approx(whole[0][key], rel=1e-9), key
