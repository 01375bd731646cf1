"""End to end: ``nano-tfx demo`` runs the digits pipeline locally and pushes an INT8 model.

CsvExampleGen → StatisticsGen → SchemaGen → Transform → Trainer → Evaluator → Quantizer → Pusher
on the bundled digits CSVs, through the real console script (as the README's first command),
with a short Trainer (150 steps). One pipeline run; the assertions read its outputs.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "pipelines", "digits", "data")
COMPONENTS = ["CsvExampleGen", "StatisticsGen", "SchemaGen", "Transform", "Trainer", "Evaluator", "Quantizer", "Pusher"]
TRAIN_STEPS = 150
# The demo's default Beam mode (in-process DirectRunner) keeps CI lean; the multi-processing
# DirectRunner of local_runner is covered by pipelines/penguin's e2e test. Override to try it.
BEAM_MODE = os.environ.get("NANO_TFX_TEST_BEAM_MODE", "in_memory")


def cli() -> list:
    exe = shutil.which("nano-tfx", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "pipelines.cli"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("digits") / "runs")
    start = time.time()
    proc = subprocess.run(
        cli() + ["demo", "--root", root, "--train-steps", str(TRAIN_STEPS), "--beam-mode", BEAM_MODE],
        capture_output=True, text=True, timeout=1500, cwd=REPO,
    )
    seconds = time.time() - start
    print(proc.stdout)
    if proc.returncode != 0:
        log = os.path.join(root, "demo.log")
        tail = open(log).read()[-4000:] if os.path.exists(log) else ""
        pytest.fail(f"nano-tfx demo exited {proc.returncode}: {proc.stderr[-2000:]}\n--- demo.log tail ---\n{tail}")
    return root, proc.stdout, seconds


def _printed(stdout: str, label: str) -> str:
    m = re.search(rf"^{re.escape(label)}: (\S+)$", stdout, re.M)
    assert m, f"{label!r} not printed:\n{stdout}"
    return m.group(1)


def test_demo_prints_pushed_model_and_report(demo):
    root, stdout, seconds = demo
    pushed = _printed(stdout, "Pushed model")
    report_html = _printed(stdout, "Report (HTML)")
    assert pushed.startswith(os.path.join(root, "serving_model") + os.sep)
    assert os.path.isfile(os.path.join(pushed, "model.onnx"))  # the demo's default: ONNX Runtime INT8
    # TFX's Pusher drops nested saved_model.pb files; the layout's Pusher-safe copy of the
    # transform graph proto arrives (the server restores it)
    assert os.path.isfile(os.path.join(pushed, "transform_graph", "transform_fn", "saved_model_proto.bin"))
    assert os.path.isfile(report_html) and "<table" in open(report_html).read()
    # progress: one start and one done line per component, in order
    for name in COMPONENTS:
        assert re.search(rf"\] {name} \.\.\. done \(\d+\.\d+s\)", stdout), name
    assert "Quantizer: blessed" in stdout


def test_every_component_ran_and_timings(demo):
    from pipelines import run_outputs

    root, _, seconds = demo
    outputs = run_outputs(os.path.join(root, "metadata.sqlite"), "digits_int8")
    assert set(COMPONENTS) <= set(outputs)
    assert all(outputs[c]["state"] == "COMPLETE" for c in COMPONENTS), {c: outputs[c]["state"] for c in COMPONENTS}
    timings = {c: round(outputs[c]["seconds"], 1) for c in COMPONENTS}
    print(f"\ndigits e2e ({BEAM_MODE}, {TRAIN_STEPS} steps): {seconds:.0f}s total; {json.dumps(timings)}")


def test_report_is_blessed_int8_within_the_bars(demo):
    root, _, _ = demo
    report_json = glob.glob(os.path.join(root, "pipeline_root", "Quantizer", "report", "*", "report.json"))
    assert len(report_json) == 1
    with open(report_json[0]) as f:
        data = json.load(f)
    tfx_info = data["tfx"]
    assert tfx_info["blessed"] is True, tfx_info["blessing_message"]
    assert tfx_info["backend"] == "onnxruntime" and data["precision"] == "int8"
    assert tfx_info["speedup"] >= 1.0  # the Quantizer's default speed gate held
    assert tfx_info["label_key"] == "label_xf"
    assert tfx_info["baseline"] >= 0.9  # the Evaluator's bar (accuracy_threshold) held for FP32
    chosen = data["trials"][data["chosen"]]
    assert chosen["metric"] >= 0.99 * tfx_info["baseline"]  # default criterion: 1 % relative


def _raw_eval_examples(n: int = 200):
    import tensorflow as tf

    with open(os.path.join(DATA, "eval", "digits.csv")) as f:
        rows = list(csv.DictReader(f))[:n]
    serialized, labels = [], []
    for row in rows:
        feats = {k: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)])) for k, v in row.items() if k != "label"}
        serialized.append(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
        labels.append(int(row["label"]))
    return tf.constant(serialized), np.array(labels)


def test_pushed_int8_model_serves_raw_examples_like_fp32(demo):
    """The pushed layout (ONNX + transform_graph) answers raw tf.Examples through what
    ``nano-tfx serve`` runs, like the Trainer's FP32 ``serving_default``."""
    import tensorflow as tf

    from components.serving.servable import load_servable

    root, stdout, _ = demo
    pushed = load_servable(_printed(stdout, "Pushed model"))
    assert pushed.kind == "examples"
    fp32_dir = glob.glob(os.path.join(root, "pipeline_root", "Trainer", "model", "*", "Format-Serving"))[0]
    fp32 = tf.saved_model.load(fp32_dir)
    x, y = _raw_eval_examples()
    got = pushed.predict({"examples": x.numpy().astype(object)})["outputs"]
    want = fp32.signatures["serving_default"](examples=x)["outputs"].numpy()
    agreement = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    accuracy = float(np.mean(got.argmax(-1) == y))
    print(f"INT8 vs FP32 top-1 agreement {agreement:.3f}, INT8 accuracy {accuracy:.3f} on {len(y)} raw eval rows")
    assert agreement >= 0.97 and accuracy >= 0.88
    assert not np.allclose(got, want)  # it is the quantized model that was pushed


def test_report_command_reads_the_demo_root(demo):
    root, _, _ = demo
    proc = subprocess.run(cli() + ["report", root], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| # | backend |" in proc.stdout and "TFX: blessed=True" in proc.stdout


@pytest.mark.extended  # a second full demo run (~2.5 min); the executor-level resume is in the default set
def test_zz_rerun_resumes_from_previous_report(demo):
    """A second ``nano-tfx demo`` on the same root: upstream components come from TFX's cache,
    the Evaluator now has a baseline model, and the Quantizer resumes from its previous report
    (the resolver wires it in): no trial re-runs, a second version is pushed. Runs last."""
    root, _, _ = demo
    before = _reports(root)
    assert len(before) == 1
    proc = subprocess.run(
        cli() + ["demo", "--root", root, "--train-steps", str(TRAIN_STEPS), "--beam-mode", BEAM_MODE],
        capture_output=True, text=True, timeout=1500, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = _reports(root)
    assert len(after) == 2
    first, report = before[0], after[-1]
    assert report["tfx"]["resumed_from"]
    assert report["tfx"]["evaluator"]["candidate_name"] == "candidate"  # the Evaluator had a baseline
    assert report["trials"] and all(t["status"] == "reused" for t in report["trials"]), report["trials"]
    assert [t["key"] for t in report["trials"]] == [t["key"] for t in first["trials"]][: len(report["trials"])]
    assert report["tfx"]["blessed"] is True
    assert len(glob.glob(os.path.join(root, "serving_model", "*"))) == 2


def _reports(root: str) -> list:
    paths = sorted(glob.glob(os.path.join(root, "pipeline_root", "Quantizer", "report", "*", "report.json")),
                   key=lambda p: int(p.split(os.sep)[-2]))
    out = []
    for path in paths:
        with open(path) as f:
            out.append(json.load(f))
    return out
