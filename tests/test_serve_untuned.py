"""A pipeline nobody tuned to, quantized and served on its raw tf.Examples (issue 13's last bar).

TFX's own Chicago taxi example, untouched: ``taxi_utils_native_keras``'s ``preprocessing_fn``
(z-scores, vocabularies, buckets, missing values filled in) and ``_build_keras_model`` (Keras 3
wide & deep: float and int32 inputs, Normalization, CategoryEncoding -> DenseBincount, four
inputs wired to no layer), trained a few hundred steps on the stock CSV. The Quantizer's layouts
for ``accelerator='onnxruntime'`` and ``'openvino'`` and the FP32 Trainer model are served by one
``nano-tfx serve`` subprocess; raw eval rows (empty CSV fields = missing features), with and
without the label, must get the FP32 model's answers.
"""
from __future__ import annotations

import csv
import os
import signal
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_models  # noqa: E402
from test_serve import Server  # noqa: E402

BACKENDS = ["onnxruntime", "openvino"]
EVAL_ROWS = (10000, 10600)  # far from the training rows


def _taxi_models_as_a_trainer_would(root: str) -> tuple:
    """Build the stock taxi model in its own process, where tf.Transform is imported before
    ``tf.keras`` is first touched (as in a TFX Trainer): ``tf.keras`` is then tf_keras, whose
    functional models accept the stock model's unused inputs. In this test process an earlier
    test may already have bound ``tf.keras`` to Keras 3, which refuses them."""
    import subprocess

    code = ("import sys; sys.path.insert(0, %r); import serve_models; "
            "print('PATHS', *serve_models.taxi_models(%r), sep='\\t')" % (os.path.dirname(os.path.abspath(__file__)), root))
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1",
               PYTHONPATH=serve_models.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1200,
                          cwd=serve_models.REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PATHS\t")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    _, fp32, transform = lines[-1].split("\t")
    return fp32, transform


@pytest.fixture(scope="module")
def taxi_server(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("taxi"))
    fp32, transform = _taxi_models_as_a_trainer_would(root)
    calib = serve_models.transformed_inputs(fp32, transform, serve_models.taxi_examples(0, 100))
    models = {"taxi_fp32": fp32}
    for backend in BACKENDS:
        models[f"taxi_{backend}"] = serve_models.write_layout(fp32, transform, calib, backend,
                                                              os.path.join(root, backend))
    with serve_models.served(models, "taxi_fp32", root, timeout=300) as (proc, port, log):
        srv = Server(proc, port, log)
        srv.models = models
        yield srv


@pytest.fixture(scope="module")
def taxi_eval():
    with_label = serve_models.taxi_examples(*EVAL_ROWS, with_label=True)
    without = serve_models.taxi_examples(*EVAL_ROWS, with_label=False)
    return with_label, without


@pytest.fixture(scope="module")
def fp32_probs(taxi_server, taxi_eval):
    return taxi_server.predict("taxi_fp32", taxi_eval[1])["outputs"].ravel()


@pytest.fixture(scope="module")
def taxi_labels():
    """The stock label: a tip over 20% of the fare (positives are ~22% of the rows)."""
    with open(serve_models.TAXI_DATA) as f:
        rows = list(csv.DictReader(f))[EVAL_ROWS[0]:EVAL_ROWS[1]]
    return np.array([float(r["tips"] or 0) > 0.2 * float(r["fare"] or "nan") for r in rows])


def test_eval_rows_have_missing_features(taxi_eval):
    """The point of the data: requests where some features are absent (filled by the Transform)."""
    import tensorflow as tf

    n_features = [len(tf.train.Example.FromString(e).features.feature) for e in taxi_eval[1]]
    assert min(n_features) < max(n_features) <= 17  # 17 columns besides the label


def test_fp32_served_taxi_answers_like_the_trainer_model(taxi_server, taxi_eval, fp32_probs, taxi_labels):
    import tensorflow as tf
    from sklearn.metrics import roc_auc_score

    direct = tf.saved_model.load(taxi_server.models["taxi_fp32"]).signatures["serving_default"](
        examples=tf.constant(taxi_eval[1]))["outputs"].numpy().ravel()
    np.testing.assert_allclose(fp32_probs, direct, atol=1e-5)
    assert fp32_probs.shape == (EVAL_ROWS[1] - EVAL_ROWS[0],)
    # Trained (ranks big tippers first), though few probabilities pass 0.5 after ~190 steps.
    assert roc_auc_score(taxi_labels, fp32_probs) > 0.85


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_serves_taxi_raw_examples_like_fp32(taxi_server, taxi_eval, fp32_probs, taxi_labels, backend):
    from sklearn.metrics import roc_auc_score

    fp32_auc = roc_auc_score(taxi_labels, fp32_probs)
    for examples in taxi_eval:  # the label feature in the request or not: same answers
        out = taxi_server.predict(f"taxi_{backend}", examples)
        assert list(out) == ["outputs"]
        probs = out["outputs"].ravel()
        diff = np.abs(probs - fp32_probs)
        agreement = np.mean((probs > 0.5) == (fp32_probs > 0.5))
        assert agreement >= 0.99, (backend, agreement)
        assert diff.mean() < 0.02 and diff.max() < 0.3, (backend, diff.mean(), diff.max())
        assert abs(roc_auc_score(taxi_labels, probs) - fp32_auc) < 0.02


def test_openvino_layout_keeps_the_unused_inputs(taxi_server):
    """The four community-area/census-tract inputs feed no layer: the IR still takes them."""
    import nano_tfx
    from nano_tfx.interchange import describe_saved_model

    fp32_inputs = [t.name for t in describe_saved_model(
        taxi_server.models["taxi_fp32"], "from_transformed_features").inputs]
    model = nano_tfx.load(taxi_server.models["taxi_openvino"])
    assert sorted(t.name for t in model.inputs) == sorted(fp32_inputs)
    assert "pickup_census_tract_xf" in fp32_inputs


def test_zz_sigterm_stops_the_taxi_server_cleanly(taxi_server):
    taxi_server.proc.send_signal(signal.SIGTERM)
    assert taxi_server.proc.wait(30) == 0
