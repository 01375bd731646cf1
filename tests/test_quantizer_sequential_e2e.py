"""The Quantizer executor with ``trial_evaluation='sequential'`` on a split large enough to stop
early (issue 19): the digits Transform + Trainer-style model (cheap, no orchestrator), a
generated transformed evaluation split of ~10 800 rows in 4 files. The trial is decided on a
fraction of the rows by the sharded evaluator, the chosen model's metric is the whole split's,
FP32's per-example results are kept in the report artifact, and a resumed run reuses them."""
from __future__ import annotations

import json
import os
import sys

import nano_tfx  # noqa: F401  (first: oneDNN)
import numpy as np
import pytest
import tensorflow as tf
from tfx.types import artifact_utils, standard_artifacts

from components import QuantizationReport
from components.quantizer.sharded_eval import FP32_DIR, META

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_models  # noqa: E402
from test_components_quantizer_executor import _artifact, run_executor  # noqa: E402
from test_sharded_eval import write_split  # noqa: E402

COPIES = 30  # x 359 eval rows (noisy copies)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    import tensorflow_transform as tft

    from pipelines.digits.features import IMAGE_XF, LABEL_XF

    root = str(tmp_path_factory.mktemp("seq_e2e"))
    fp32_dir, transform_dir = serve_models.digits_models(root, epochs=6)
    names = list(tft.TFTransformOutput(transform_dir).transformed_feature_spec())
    examples = _artifact(standard_artifacts.Examples, os.path.join(root, "transformed_examples"))
    examples.split_names = artifact_utils.encode_split_names(["train", "eval"])
    rng = np.random.default_rng(5)
    sizes = {}
    for split, copies, files in (("train", 1, 1), ("eval", COPIES, 4)):
        raw, _ = serve_models.digits_examples(split)
        xf = serve_models.transformed_inputs_from(transform_dir, raw, names)
        image = np.concatenate([xf[IMAGE_XF] + (rng.normal(0, 0.03, xf[IMAGE_XF].shape) if c else 0)
                                for c in range(copies)]).astype("float32")
        cols = {IMAGE_XF: image, LABEL_XF: np.tile(xf[LABEL_XF].reshape(-1), copies)}
        write_split(os.path.join(examples.uri, f"Split-{split}"), cols, files)
        sizes[split] = len(image)
    model = _artifact(standard_artifacts.Model, os.path.join(root, "model"))
    os.makedirs(model.uri)
    os.symlink(fp32_dir, os.path.join(model.uri, "Format-Serving"))
    return {"model": model, "examples": examples,
            "transform_graph": _artifact(standard_artifacts.TransformGraph, transform_dir),
            "n_eval": sizes["eval"], "label": LABEL_XF}


def _run(artifacts, out, previous=None):
    inputs = {k: artifacts[k] for k in ("model", "examples", "transform_graph")}
    if previous:
        inputs["previous_report"] = _artifact(QuantizationReport, previous)
    return run_executor(inputs, out, inputs=inputs, accelerator="onnxruntime", metric="sparse_categorical_accuracy",
                        label_key=artifacts["label"], max_trials=1, min_speedup=0, trial_evaluation="sequential",
                        accuracy_criterion=json.dumps({"absolute": 0.05, "higher_is_better": True}))


def test_the_quantizer_decides_early_and_a_resumed_run_reuses_fp32(artifacts, tmp_path):
    outputs, report = _run(artifacts, str(tmp_path / "first"))
    tfx = report["tfx"]
    assert outputs["blessing"].get_int_custom_property("blessed") == 1, tfx["blessing_message"]
    assert report["trial_evaluation"] == "sequential"
    assert tfx["evaluation_mode"] == "in-process" and tfx["evaluation_shards"] == 4  # 1 local worker
    assert tfx["fp32_results"] == "computed"
    assert os.path.exists(os.path.join(outputs["report"].uri, FP32_DIR, META))
    chosen = report["trials"][report["chosen"]]
    seq = chosen["sequential"]
    n = artifacts["n_eval"]
    assert seq["n_total"] == n and seq["decided"] == "early-pass", seq
    assert seq["examples_evaluated"] <= 0.25 * n
    # the chosen model's metric (the blessing's) is the whole split's: recompute it here
    serving = os.path.join(outputs["quantized_model"].uri, "Format-Serving")
    q = nano_tfx.load(serving)
    files = sorted(tf.io.gfile.glob(os.path.join(artifacts["examples"].uri, "Split-eval", "*")))
    from pipelines.digits.features import IMAGE_XF, LABEL_XF

    spec = {IMAGE_XF: tf.io.FixedLenFeature((64,), tf.float32), LABEL_XF: tf.io.FixedLenFeature((), tf.int64)}
    hits = 0
    for batch in tf.data.TFRecordDataset(files, compression_type="GZIP").batch(2048):
        parsed = tf.io.parse_example(batch, spec)
        hits += int(np.sum(q.predict(parsed[IMAGE_XF].numpy()).argmax(-1) == parsed[LABEL_XF].numpy()))
    assert chosen["metric"] == pytest.approx(hits / n, abs=1e-9)

    # resumed: FP32's results are reused from the previous run's report (copied into this one)
    outputs2, report2 = _run(artifacts, str(tmp_path / "second"), previous=outputs["report"].uri)
    assert report2["tfx"]["fp32_results"].startswith("reused from"), report2["tfx"]["fp32_results"]
    assert os.path.exists(os.path.join(outputs2["report"].uri, FP32_DIR, META))
    assert [t["status"] for t in report2["trials"]] == ["reused"]
    assert outputs2["blessing"].get_int_custom_property("blessed") == 1
