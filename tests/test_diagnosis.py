"""Per-layer diagnosis and the sensitivity-guided default strategy, on every backend.

The model: a deep ReLU MLP trained on the digits whose layer ``fc6`` gets a 1000x outlier input
channel (FP32 function unchanged, see ``benchmarks/planted.py``): full INT8 misses a 1% relative
criterion because of that layer alone. A second depth (12 layers, ``fc9``) checks the ranking
after the winning trial on a model the mechanism was not tuned on.
"""
import json
import os
import re
import sys

import numpy as np
import pytest

import nano_tfx
from conftest import accuracy

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import planted  # noqa: E402
from outlier_encoder import smoothing_off  # noqa: E402

CRITERION = {"relative": 0.01, "higher_is_better": True}


@pytest.fixture(scope="session")
def planted_mlp(digits):
    import keras

    model, bad = planted.deep_mlp_with_outlier(keras, digits, depth=8, bad=6, epochs=8)
    return model, bad


@pytest.fixture(scope="session")
def planted_runs(planted_mlp, digits):
    """One default-strategy quantize per backend (shared by the assertions below)."""
    return _quantize_each_backend(planted_mlp[0], digits)


@pytest.fixture(scope="session")
def deeper_planted_runs(digits):
    """The planted MLP at another depth (12 layers, ``fc9`` planted): (runs per backend, name)."""
    import keras

    model, bad = planted.deep_mlp_with_outlier(keras, digits, depth=12, epochs=8)
    return _quantize_each_backend(model, digits), bad


def _quantize_each_backend(model, digits) -> dict:
    _, (xte, yte) = digits
    runs = {}
    # The planted 1000x channel is an activation outlier channel: the default strategy would
    # first try SmoothQuant, which fixes it with no FP32 layer (tests/test_smoothquant.py). These
    # tests are about the fallback ranking, so they run the search spaces without it.
    for accelerator in (None, "onnxruntime", "openvino"):
        try:
            with smoothing_off():
                runs[accelerator] = nano_tfx.quantize(
                    model, accelerator=accelerator, calib_dataset=(xte, yte), metric="accuracy",
                    accuracy_criterion=CRITERION, batch=64, max_trials=6)
        except nano_tfx.AccuracyCriterionNotMet as err:  # asserted per backend below
            runs[accelerator] = err.best_model
            runs[accelerator].report = err.report
    return runs


def _is_layer(name: str, keras_name: str) -> bool:
    """``fc9`` names 'functional_1/fc9_1/MatMul' (any backend's spelling), never fc19 or fc90."""
    return re.search(rf"(^|/){keras_name}(_\d+)?(/|$)", name) is not None


@pytest.mark.parametrize("depth", [8, 12])
@pytest.mark.parametrize("accelerator", [None, "onnxruntime", "openvino"])
def test_culprit_named_first_after_the_win_at_two_depths(depth, accelerator, request):
    """Issue 17: after the fallback step that wins the accuracy back, ``report.layers`` follows
    the measured gains on every backend: the planted layer first, whether its step rescued a
    collapsed full INT8 (INC, ONNX Runtime) or raised the metric most (OpenVINO)."""
    if depth == 8:
        runs, bad = request.getfixturevalue("planted_runs"), request.getfixturevalue("planted_mlp")[1]
    else:
        runs, bad = request.getfixturevalue("deeper_planted_runs")
    report = runs[accelerator].report
    assert report.met, report.table()
    names = [r["name"] for r in report.layers]
    assert _is_layer(names[0], bad), names[:4]
    assert names[0] in {k["name"] for k in report.kept_fp32}
    worst, gains = report.layers[0], [r.get("metric_gain") or 0.0 for r in report.layers]
    assert worst.get("rescued") or worst.get("metric_gain") == max(gains), report.layer_table()


@pytest.mark.extended
def test_openvino_names_the_culprit_after_a_collapsed_full_int8(digits):
    """Issue 17 as reported, on a 12-layer width-32 MLP: OpenVINO's full INT8 collapses (no
    metric), ``fc9``'s step rescues it and 4 more trials win back noise (0.80 -> 0.83). The
    rescue used to earn no credit, and the last 4-layer step's +0.018 (credited whole to each of
    its layers, just above the 0.017 noise floor) named ``fc2`` first."""
    import keras

    model, bad = planted.deep_mlp_with_outlier(keras, digits, depth=12, width=32, seed=2, epochs=8)
    _, (xte, yte) = digits
    try:
        report = nano_tfx.quantize(model, accelerator="openvino", calib_dataset=(xte, yte), metric="accuracy",
                                   accuracy_criterion=CRITERION, batch=64, max_trials=6).report
    except nano_tfx.AccuracyCriterionNotMet as err:  # 7-bit weights (no VNNI) need one more trial
        report = err.report
    assert _is_layer(report.layers[0]["name"], bad), report.layer_table()


@pytest.mark.parametrize("accelerator", [None, "onnxruntime", "openvino"])
def test_planted_layer_ranked_first_and_criterion_met(accelerator, planted_runs, planted_mlp, digits):
    model, bad = planted_mlp
    _, (xte, yte) = digits
    q = planted_runs[accelerator]
    report = q.report
    assert report.met and len(report.trials) <= 6, report.table()
    assert report.trials[0].passed is not True  # full INT8 misses (or collapses): the planted layer
    assert report.layers, "the miss must have been diagnosed"
    worst = report.layers[0]
    assert f"/{bad}" in worst["name"] or f"{bad}_" in worst["name"], [r["name"] for r in report.layers[:3]]
    # the error it starts itself stands out (an amplifier right behind it ranks low), and
    # keeping it in FP32 is what raised the metric
    assert worst["own_error"] > 3 * max(r["own_error"] for r in report.layers[1:]), report.layer_table()
    if report.trials[0].metric is not None:  # a collapsed full INT8 has no metric to gain from
        # how much the planted channel costs varies with the trained model (0.06-0.7 seen): the
        # gain must be the largest and above the tuner's noise floor (twice the allowed drop)
        noise = 2 * CRITERION["relative"] * report.baseline
        assert worst.get("metric_gain", 0) == max(r.get("metric_gain") or 0 for r in report.layers) > noise
    assert worst["range_ratio"] > 100  # the 1000x channel is visible in the FP32 input range
    assert {"name", "sqnr_db", "mse"} <= set(worst)
    kept = {k["name"]: k for k in report.kept_fp32}
    assert worst["name"] in kept and "adds relative MSE" in kept[worst["name"]]["reason"]
    assert len(kept) <= 5  # OpenVINO: INT8 kernels on AVX2-only CPUs sit near the 1% bar
    # baseline + one evaluation per trial (no in-trial accuracy control in the default strategy)
    assert report.metric_evaluations == 1 + sum(t.evaluations for t in report.trials) <= 1 + len(report.trials)
    fp32 = accuracy(model.predict(xte, verbose=0), yte)
    assert accuracy(q.predict(xte), yte) >= fp32 * 0.99


def test_report_json_html_and_cli_carry_the_layer_table(planted_runs, tmp_path, capsys):
    from nano_tfx.report import Report
    from pipelines.cli import main

    report = planted_runs["onnxruntime"].report
    path = tmp_path / "report.json"
    path.write_text(report.to_json())
    data = json.loads(path.read_text())
    assert data["layers"][0]["name"] == report.layers[0]["name"] and data["metric_evaluations"] >= 2
    assert Report.from_dict(data).layers == report.layers
    page = report.to_html()
    assert "Layers by quantization error" in page and report.layers[0]["name"] in page
    assert "<svg" in page  # the bar chart of the worst layers
    assert main(["report", "--layers", str(path)]) == 0
    out = capsys.readouterr().out
    assert report.layers[0]["name"] in out and "SQNR dB" in out


def test_quantized_model_diagnose(planted_runs, planted_mlp, digits):
    _, bad = planted_mlp
    _, (xte, _) = digits
    q = planted_runs["openvino"]
    rows = q.diagnose(xte[:128])
    assert rows and all(f"{bad}_" not in r["name"] and not r["name"].endswith(bad) for r in rows)  # kept in FP32
    assert all(np.isfinite(r["sqnr_db"]) and r["sqnr_db"] > 5 for r in rows)
    with pytest.raises(ValueError, match="data"):
        q.diagnose(None)


def _clipped_planted_mlp():
    """The planted MLP as one CI run trained it (weights in ``tests/data``): OpenVINO's default
    activation range (mean of per-sample maxima) clips fc6's 4000x channel on most rows."""
    import keras

    weights = np.load(os.path.join(os.path.dirname(__file__), "data", "planted_mlp_clipped_fc6.npz"))
    L = keras.layers
    inp = keras.Input((8, 8, 1), name="image")
    x = L.Flatten()(inp)
    for i in range(8):
        x = L.Dense(64, activation="relu", name=f"fc{i}")(x)
    model = keras.Model(inp, L.Dense(10, activation="softmax", name="probs")(x))
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([weights[f"{layer.name}:{i}"] for i in range(len(layer.weights))])
    return model


@pytest.mark.parametrize("accelerator", ["onnxruntime", "openvino"])
def test_layer_input_is_tapped_in_front_of_its_own_quantizer(accelerator, digits):
    """Falling a layer back removes its input quantizer, so that error is the layer's. Tapped
    behind it, the clipped channel looked like *input* error on this model and fc6 ranked last on
    OpenVINO (CI failure). ORT folds each Relu into the Q/DQ pair and gives the pre-activation
    tensor the Relu's name: the tap re-applies the Relu (else every layer 'adds' -0.2..-0.6)."""
    _, (xte, yte) = digits
    try:
        report = nano_tfx.quantize(_clipped_planted_mlp(), accelerator=accelerator, calib_dataset=(xte, yte),
                                   metric="accuracy", accuracy_criterion=CRITERION, max_trials=2).report
    except nano_tfx.AccuracyCriterionNotMet as err:  # the ranking is what is tested here
        report = err.report
    rows = report.layers  # the diagnosis of the fully quantized trial (ORT's collapses)
    assert "/fc6_" in rows[0]["name"], [(r["name"], r["own_error"]) for r in rows[:3]]
    assert rows[0]["own_error"] > 10 * rows[1]["own_error"]
    assert all(r["added_mse"] > -0.05 for r in rows), [(r["name"], r["added_mse"]) for r in rows]


def _inc_mobilenet_block(tmp_path):
    """Conv+BN+ReLU6 (grappler folds the BN scale and renames the conv after it), depthwise conv
    (INC hands back a Dequantize), projection + residual, Dense: (backend, prepared, batches)."""
    import keras

    from nano_tfx.backends.base import backend_class
    from nano_tfx.diagnosis import Batches
    from nano_tfx.interchange import export_keras

    keras.utils.set_random_seed(1)
    L = keras.layers
    inp = keras.Input((8, 8, 3), name="image")
    x = L.ReLU(6.0)(L.BatchNormalization(name="stem_bn")(L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inp)))
    h = L.ReLU(6.0)(L.BatchNormalization(name="b_expand_bn")(L.Conv2D(16, 1, use_bias=False, name="b_expand")(x)))
    h = L.ReLU(6.0)(L.BatchNormalization(name="b_dw_bn")(L.DepthwiseConv2D(3, padding="same", use_bias=False, name="b_dw")(h)))
    h = L.BatchNormalization(name="b_project_bn")(L.Conv2D(8, 1, use_bias=False, name="b_project")(h))
    x = L.Add()([x, h])
    out = L.Dense(4, name="probs")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    for layer in model.layers:  # non-trivial BN statistics (an untrained BN folds to nothing)
        if isinstance(layer, L.BatchNormalization):
            n = layer.get_weights()[0].shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.1, n),
                               rng.uniform(0.5, 2.0, n)])
    batches = Batches([[rng.random((16, 8, 8, 3), dtype=np.float32)]])
    backend = backend_class(None)()
    return backend, backend.prepare(export_keras(model, str(tmp_path / "sm")), str(tmp_path)), batches


def _quantized_ops(candidate) -> list[str]:
    return [op.name for op in candidate._sess.graph.get_operations()
            if op.type.startswith("Quantized") and op.type != "QuantizeV2"]


def test_inc_diagnosis_covers_every_layer_of_a_mobilenet_block(tmp_path):
    """Every quantized layer gets a row, under the name INC's fallback accepts."""
    from nano_tfx.diagnosis import format_table

    backend, prepared, batches = _inc_mobilenet_block(tmp_path)
    space = backend.search_space(prepared, "int8", "static")
    candidate = backend.quantize(prepared, "int8", space.default(), batches)
    rows = backend.diagnose(prepared, candidate, list(batches))
    assert len(_quantized_ops(candidate)) == len(prepared.compute_nodes) == 5
    assert len(rows) == 5, [r["name"] for r in rows]
    assert {r["name"] for r in rows} == set(space.fallback_candidates)
    assert all(np.isfinite(r["sqnr_db"]) and 5 < r["sqnr_db"] < 80 for r in rows), format_table(rows)
    for keras_name in ("stem_bn", "b_expand_bn", "b_dw", "b_project_bn", "probs"):
        assert sum(f"/{keras_name}_1/" in r["name"] for r in rows) == 1, [r["name"] for r in rows]


@pytest.mark.slow
def test_inc_fallback_by_the_folded_bn_name_keeps_the_conv_in_fp32(tmp_path):
    """The conv of a Conv+BN pair is only known to INC by the BN Mul's name (the default run
    covers the names through the diagnosis rows above)."""
    from nano_tfx.backends.base import TrialConfig

    backend, prepared, batches = _inc_mobilenet_block(tmp_path)
    expand = next(n for n in prepared.compute_nodes if "/b_expand_bn_1/" in n)
    knobs = dict(backend.search_space(prepared, "int8", "static").default().knobs)
    kept = backend.quantize(prepared, "int8", TrialConfig.make(knobs, [expand]), batches)
    assert len(_quantized_ops(kept)) == 4 and not any(n.startswith(expand + "_eightbit") for n in _quantized_ops(kept))
