"""``nano-tfx quantize`` / ``report`` / ``--help`` through the real console script.

A small digits CNN (Keras 3, the session fixture of conftest) exported as a SavedModel, with
calibration data as NPZ and as a TFRecord of tf.Examples. Bad paths and bad data must end with a
non-zero exit code and exactly one line on stderr. ``nano-tfx demo`` is tested end to end in
``test_pipeline_digits.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli() -> list:
    exe = shutil.which("nano-tfx", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "pipelines.cli"]


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cli() + list(args), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def assert_one_line_error(proc: subprocess.CompletedProcess, command: str, *fragments: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"nano-tfx {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _example(image: np.ndarray, label: int, image_key: str = "image"):
    import tensorflow as tf

    return tf.train.Example(features=tf.train.Features(feature={
        image_key: tf.train.Feature(float_list=tf.train.FloatList(value=image.reshape(-1))),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    })).SerializeToString()


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Files for the path checks, which run before any model is read: a directory that only
    looks like a SavedModel, a good NPZ, a corrupt one and a CSV."""
    d = tmp_path_factory.mktemp("cli_paths")
    model = d / "model"
    model.mkdir()
    (model / "saved_model.pb").write_bytes(b"")
    out = {"model": str(model), "dir": str(d), "npz": str(d / "calib.npz"), "corrupt_npz": str(d / "corrupt.npz"),
           "csv": str(d / "calib.csv")}
    np.savez(out["npz"], x=np.zeros((4, 8, 8, 1), "float32"))
    with open(out["corrupt_npz"], "wb") as f:
        f.write(b"definitely not a zip archive" * 10)
    with open(out["csv"], "w") as f:
        f.write("a,b\n1,2\n")
    return out


@pytest.fixture(scope="module")
def files(keras3_cnn, digits, tmp_path_factory):
    """SavedModel (input 'image' [None, 8, 8, 1]) + good and bad calibration files."""
    import tensorflow as tf

    d = tmp_path_factory.mktemp("cli")
    model = str(d / "model")
    keras3_cnn.export(model)
    _, (x, y) = digits
    x, y = x[:200], y[:200]
    out = {"model": model, "dir": str(d)}
    out["npz"] = str(d / "calib.npz")
    np.savez(out["npz"], x=x, y=y)
    out["tfrecord"] = str(d / "calib.tfrecord")
    with tf.io.TFRecordWriter(out["tfrecord"]) as w:
        for img, label in zip(x, y):
            w.write(_example(img, label))
    out["bad_shape_npz"] = str(d / "bad_shape.npz")
    np.savez(out["bad_shape_npz"], x=np.zeros((10, 5), "float32"))
    out["wrong_feature_tfrecord"] = str(d / "wrong.tfrecord")
    with tf.io.TFRecordWriter(out["wrong_feature_tfrecord"]) as w:
        w.write(_example(x[0], y[0], image_key="pixels"))
    return out


def test_help_and_version():
    proc = run("--help", timeout=120)
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("demo", "quantize", "report"))
    proc = run("quantize", "--help", timeout=120)
    assert proc.returncode == 0 and "--calib" in proc.stdout and "--accelerator" in proc.stdout
    proc = run("--version", timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("nano-tfx ")


def test_quantize_npz_with_accuracy_control_then_report(files, digits):
    out = os.path.join(files["dir"], "q_npz")
    proc = run("quantize", files["model"], "--calib", files["npz"], "--metric", "accuracy",
               "--relative", "0.02", "--max-trials", "3", "--output", out)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert proc.stderr.strip() == ""  # library logs go to OUTPUT.log
    assert "trial 1/3 [inc/int8" in proc.stdout and "Quantized model: " + out in proc.stdout
    assert os.path.isfile(os.path.join(out, "nano_tfx.json")) and os.path.isfile(out + ".log")

    import nano_tfx

    q = nano_tfx.load(out)
    _, (x, y) = digits
    acc = float(np.mean(np.asarray(q.predict(x[:200])).argmax(-1) == y[:200]))
    assert acc >= 0.8

    rep = run("report", out, timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert "| # | backend | precision |" in rep.stdout and "met=True" in rep.stdout
    assert "ms vs FP32" in rep.stdout and "| speedup |" in rep.stdout
    as_json = run("report", os.path.join(out, "report.json"), "--format", "json", timeout=120)
    data = json.loads(as_json.stdout)
    assert data["backend"] == "inc" and data["fp32_latency_ms"] > 0 and data["speedup"] > 0


def in_process(capfd, *args: str):
    """``nano-tfx ARGS`` in this process (TensorFlow is already loaded here): (code, out, err)."""
    from pipelines.cli import main

    capfd.readouterr()
    code = main(list(args))
    out, err = capfd.readouterr()
    return code, out, err


def test_quantize_tfrecord_on_onnxruntime(files, capfd):
    out = os.path.join(files["dir"], "q_tfrecord")
    code, stdout, stderr = in_process(capfd, "quantize", files["model"], "--calib", files["tfrecord"],
                                      "--accelerator", "onnxruntime", "--output", out, "--min-speedup", "0.5")
    assert code == 0, stderr + stdout
    assert "[onnxruntime/int8" in stdout and "Quantized model: " + out in stdout
    with open(os.path.join(out, "nano_tfx.json")) as f:
        assert json.load(f)["backend"] == "onnxruntime"
    report = nano_tfx_report(out)
    assert report.min_speedup == 0.5 and report.speedup >= 0.5 and "min_speedup=0.5 met" in stdout
    # An unreachable speed bar: exit 3 (not met), the report is kept beside the output.
    code, stdout, stderr = in_process(capfd, "quantize", files["model"], "--calib", files["tfrecord"],
                                      "--accelerator", "onnxruntime", "--output", out + "_slow",
                                      "--min-speedup", "1e9")
    assert code == 3 and "min_speedup=1e+09 not met" in stderr, stderr
    assert os.path.isfile(out + "_slow.report.json")
    code, _, stderr = in_process(capfd, "quantize", files["model"], "--calib", files["tfrecord"],
                                 "--output", out + "_nan", "--min-speedup", "nan")
    assert code == 2 and "min_speedup: expected" in stderr


def nano_tfx_report(out: str):
    import nano_tfx

    return nano_tfx.load(out).report


def test_bad_paths_fail_fast_with_one_line(paths):
    """Checked before TensorFlow is even imported."""
    files = paths
    cases = [
        (["quantize", "/no/such/model", "--calib", files["npz"], "-o", "x"], "SAVED_MODEL: '/no/such/model' does not exist"),
        (["quantize", files["dir"], "--calib", files["npz"], "-o", "x"], "is not a SavedModel directory"),
        (["quantize", files["model"], "--calib", "/no/such.npz", "-o", "x"], "--calib: '/no/such.npz' does not exist"),
        (["quantize", files["model"], "--calib", files["corrupt_npz"], "-o", "x"], "is not an NPZ archive"),
        (["quantize", files["model"], "--calib", files["csv"], "-o", "x"], "expected an .npz file or a TFRecord"),
        (["quantize", files["model"], "--calib", files["npz"], "-o", files["model"] + "/sub"], "--output: must not be"),
        (["quantize", files["model"], "--calib", files["npz"], "-o", "x", "--accelerator", "tpu"], "invalid choice: 'tpu'"),
        (["quantize", files["model"], "-o", "x"], "--calib"),
        (["report", "/no/such/report.json"], "PATH: '/no/such/report.json' does not exist"),
        (["report", files["csv"]], "is not a nano-tfx report"),
    ]
    for args, fragment in cases:
        proc = run(*args, timeout=120)
        assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
        assert_one_line_error(proc, args[0], fragment)


@pytest.mark.parametrize("key, fragment", [
    ("bad_shape_npz", "--calib: array for input 'image' has shape (10, 5); the model expects (None, 8, 8, 1)"),
    ("wrong_feature_tfrecord", "tf.Examples have features ['label', 'pixels'], the model's inputs are ['image']"),
])
def test_bad_data_exits_non_zero_with_one_line(files, capfd, key, fragment):
    """Found once the model's inputs are known (in process: the exit code is ``main``'s return)."""
    out = os.path.join(files["dir"], f"q_{key}")
    code, _, stderr = in_process(capfd, "quantize", files["model"], "--calib", files[key], "--output", out)
    proc = subprocess.CompletedProcess([], code, "", stderr)
    assert code == 2
    assert_one_line_error(proc, "quantize", fragment)
    assert not os.path.exists(out)
