"""End to end: ``nano-tfx demo --pipeline reviews`` runs the text pipeline locally and pushes an
INT8 transformer that answers raw-text tf.Examples.

CsvExampleGen (TFX's bundled IMDB sample, 100 reviews) → StatisticsGen → SchemaGen → Transform
(tokenize + tf.Transform vocabulary) → Trainer (a two-block Keras transformer) → Evaluator →
Quantizer (ONNX Runtime) → Pusher, through the real console script. One pipeline run; the
assertions read its outputs, and ``nano-tfx serve`` answers raw review text for the pushed model.
The INC and OpenVINO layouts of the same Trainer model are served too (extended).
"""
from __future__ import annotations

import csv
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_models  # noqa: E402
from test_pipeline_digits import BEAM_MODE, _printed, cli  # noqa: E402

pytestmark = pytest.mark.slow

REPO = serve_models.REPO
COMPONENTS = ["CsvExampleGen", "StatisticsGen", "SchemaGen", "Transform", "Trainer", "Evaluator", "Quantizer", "Pusher"]
# Reviews the model never saw (their words are mostly out of vocabulary), with HTML and punctuation.
UNSEEN = ["Zyxwv qwerty!!! <br />Flibbertigibbet, the BEST film", "", "awful... simply awful"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reviews") / "runs")
    proc = subprocess.run(cli() + ["demo", "--pipeline", "reviews", "--root", root, "--beam-mode", BEAM_MODE],
                          capture_output=True, text=True, timeout=1500, cwd=REPO)
    print(proc.stdout)
    if proc.returncode != 0:
        log = os.path.join(root, "demo.log")
        tail = open(log).read()[-4000:] if os.path.exists(log) else ""
        pytest.fail(f"nano-tfx demo exited {proc.returncode}: {proc.stderr[-2000:]}\n--- demo.log tail ---\n{tail}")
    return root, proc.stdout


def review_examples(texts=None, with_label: bool = False):
    """Serialized raw tf.Examples as CsvExampleGen writes them (``text`` bytes, ``label`` int64)."""
    import tensorflow as tf

    from pipelines.reviews.pipeline import imdb_data_root

    if texts is None:
        with open(os.path.join(imdb_data_root(), "imdb_small_with_labels.txt")) as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [{"text": t, "label": "0"} for t in texts]
    out = []
    for row in rows:
        feats = {"text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[row["text"].encode()]))}
        if with_label:
            feats["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(row["label"])]))
        out.append(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
    return out, np.array([int(r["label"]) for r in rows])


def _artifact(root: str, component: str, key: str) -> str:
    paths = glob.glob(os.path.join(root, "pipeline_root", component, key, "*"))
    assert len(paths) == 1, paths
    return paths[0]


def test_demo_runs_every_component_and_pushes_onnx_with_the_vocabulary(demo):
    from pipelines import run_outputs

    root, stdout = demo
    assert "IMDB reviews transformer (text)" in stdout.splitlines()[0]
    for name in COMPONENTS:
        assert re.search(rf"\] {name} \.\.\. done \(\d+\.\d+s\)", stdout), name
    outputs = run_outputs(os.path.join(root, "metadata.sqlite"), "reviews_int8")
    assert all(outputs[c]["state"] == "COMPLETE" for c in COMPONENTS), {c: outputs[c]["state"] for c in COMPONENTS}
    print("reviews e2e:", json.dumps({c: round(outputs[c]["seconds"], 1) for c in COMPONENTS}))
    assert "Quantizer: blessed" in stdout
    pushed = _printed(stdout, "Pushed model")
    assert pushed.startswith(os.path.join(root, "serving_model") + os.sep)
    assert os.path.isfile(os.path.join(pushed, "model.onnx"))
    # the transform graph travels with the model: its graph (Pusher-safe copy) and the vocabulary
    transform_fn = os.path.join(pushed, "transform_graph", "transform_fn")
    assert os.path.isfile(os.path.join(transform_fn, "saved_model_proto.bin"))
    vocab = glob.glob(os.path.join(transform_fn, "assets", "review_tokens*"))
    assert vocab and 500 < sum(1 for _ in open(vocab[0], "rb")) <= 2000


def test_transform_writes_token_ids_and_a_padding_mask(demo):
    import tensorflow as tf
    import tensorflow_transform as tft

    from pipelines.reviews.features import MASK_XF, MAX_LEN, TOKENS_XF, VOCAB_SIZE

    root, _ = demo
    out = tft.TFTransformOutput(_artifact(root, "Transform", "transform_graph"))
    examples, _ = review_examples(with_label=True)
    import tensorflow as tf

    xf = out.transform_features_layer()(tf.io.parse_example(tf.constant(examples[:20]), out.raw_feature_spec()))
    tokens, mask = xf[TOKENS_XF].numpy(), xf[MASK_XF].numpy()
    assert tokens.shape == mask.shape == (20, MAX_LEN) and tokens.dtype == np.int64
    assert np.array_equal(mask, (tokens > 0).astype(np.int64))  # 0 is padding, nothing else
    assert tokens.min() >= 0 and tokens.max() <= VOCAB_SIZE + 1  # vocabulary + one OOV bucket
    assert mask.sum(1).max() == MAX_LEN  # long reviews are truncated to MAX_LEN tokens


def test_report_is_blessed_with_every_matmul_in_int8(demo):
    root, _ = demo
    with open(os.path.join(_artifact(root, "Quantizer", "report"), "report.json")) as f:
        data = json.load(f)
    tfx_info = data["tfx"]
    assert tfx_info["blessed"] is True, tfx_info["blessing_message"]
    assert tfx_info["backend"] == "onnxruntime" and data["precision"] == "int8"
    assert tfx_info["label_key"] == "label_xf" and tfx_info["speedup"] >= 1.0
    # two blocks x (Q, K, V, output projection, Q.K^T, attention x V, two FFN) + the logits
    int8, total = data["int8_ops"]["MatMul"]
    assert total >= 17 and int8 == total, data["int8_ops"]
    assert f"INT8: {int8} of {total} MatMul" in tfx_info["blessing_message"]
    chosen = data["trials"][data["chosen"]]
    assert chosen["metric"] >= 0.99 * tfx_info["baseline"]  # default criterion: 1 % relative


def _served_outputs(server_port: int, examples: list) -> np.ndarray:
    import requests

    from test_serve import examples_request

    r = requests.post(f"http://127.0.0.1:{server_port}/v2/models/reviews/infer", json=examples_request(examples),
                      timeout=120)
    assert r.status_code == 200, r.text
    out = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
    assert list(out) == ["outputs"]
    return out["outputs"]


def test_serve_answers_raw_text_like_in_process_predict_and_fp32(demo, tmp_path):
    """``nano-tfx serve`` on the pushed model: raw review text in (tf.Examples over the V2
    protocol), the same logits as the pushed model's in-process predict, the FP32 model's classes."""
    import requests
    import tensorflow as tf

    from components.serving.servable import load_servable
    from test_serve import examples_request

    root, stdout = demo
    pushed = _printed(stdout, "Pushed model")
    examples, labels = review_examples()
    unseen, _ = review_examples(UNSEEN)
    in_process = load_servable(pushed)
    assert in_process.kind == "examples" and [t.name for t in in_process.inputs] == ["examples"]
    want = in_process.predict({"examples": np.array(examples + unseen, dtype=object)})["outputs"]
    fp32 = tf.saved_model.load(os.path.join(_artifact(root, "Trainer", "model"), "Format-Serving"))
    fp32_out = fp32.signatures["serving_default"](examples=tf.constant(examples + unseen))["outputs"].numpy()

    with serve_models.served({"reviews": pushed}, "reviews", str(tmp_path)) as (proc, port, log):
        got = _served_outputs(port, examples + unseen)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        # a request without the review text is the client's error; the server keeps serving
        no_text = tf.train.Example().SerializeToString()
        bad = requests.post(f"http://127.0.0.1:{port}/v2/models/reviews/infer", json=examples_request([no_text]),
                            timeout=60)
        assert bad.status_code == 400 and "text" in bad.text, bad.text
        # the same request in-process: a dynamic INT8 model (ONNX Runtime may measure it the faster
        # approach for this encoder) quantizes activations per call, so a row's output depends on
        # the rows it is batched with
        alone = in_process.predict({"examples": np.array(unseen, dtype=object)})["outputs"]
        np.testing.assert_allclose(_served_outputs(port, unseen), alone, rtol=1e-5, atol=1e-5)
    assert got.shape == (len(examples) + len(unseen), 2) and np.all(np.isfinite(got))
    agreement = float(np.mean(got.argmax(-1) == fp32_out.argmax(-1)))
    print(f"INT8 vs FP32 top-1 agreement {agreement:.3f} on {len(got)} reviews; INT8 accuracy on the 100 "
          f"(train + eval) {np.mean(got[:len(labels)].argmax(-1) == labels):.3f}")
    # Nothing bounds the flips outside the eval split the Quantizer judged (a near-chance model has
    # many logits near the boundary; 7-bit weights without VNNI): a population bar, not 1.0.
    assert agreement >= 0.9
    assert not np.allclose(got, fp32_out)  # it is the quantized model that was pushed


@pytest.mark.extended  # two more quantizations (~1-2 min); the pipeline's ONNX layout is the default case
def test_inc_and_openvino_layouts_serve_raw_text_too(demo, tmp_path):
    """The same Trainer model in the Quantizer's other layouts (INC SavedModel, OpenVINO IR +
    transform_graph), served side by side: raw text in, the FP32 model's classes out."""
    import requests
    import tensorflow as tf

    from test_serve import examples_request

    root, _ = demo
    fp32 = os.path.join(_artifact(root, "Trainer", "model"), "Format-Serving")
    transform = _artifact(root, "Transform", "transform_graph")
    labelled, _ = review_examples(with_label=True)
    calib = serve_models.transformed_inputs(fp32, transform, labelled)
    models = {b: serve_models.write_layout(fp32, transform, calib, None if b == "inc" else b, str(tmp_path / b))
              for b in ("inc", "openvino")}
    examples, _ = review_examples()
    want = tf.saved_model.load(fp32).signatures["serving_default"](examples=tf.constant(examples))["outputs"].numpy()

    with serve_models.served(models, "inc", str(tmp_path)) as (proc, port, log):
        for name in models:
            r = requests.post(f"http://127.0.0.1:{port}/v2/models/{name}/infer", json=examples_request(examples),
                              timeout=120)
            assert r.status_code == 200, r.text
            out = r.json()["outputs"][0]
            got = np.asarray(out["data"]).reshape(out["shape"])
            assert out["name"] == "outputs" and got.shape == want.shape
            assert float(np.mean(got.argmax(-1) == want.argmax(-1))) >= 0.9, name
