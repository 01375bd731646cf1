"""Hardening (issue 10): every data form on every backend, no silent garbage, safe save/load.

The default run keeps one real quantization per backend and data form class; the full
data-forms x backends matrix is marked ``extended`` (``NANO_TFX_EXTENDED=1`` runs it).
"""
import glob
import json
import os
import stat
import tempfile

import numpy as np
import pytest

import nano_tfx
from conftest import accuracy

BACKENDS = [None, "onnxruntime", "openvino"]
LOOSE = {"relative": 0.05, "higher_is_better": True}


@pytest.fixture(autouse=True)
def private_tmp(tmp_path_factory, monkeypatch):
    """A temp dir of this test's own: other processes on the machine write to /tmp too."""
    path = tmp_path_factory.mktemp("systmp")
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


def _leftovers() -> set:
    tmp = tempfile.gettempdir()
    return set(glob.glob(os.path.join(tmp, "nano_tfx_*"))) | set(glob.glob(os.path.join(tmp, "tmp*.log")))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def mlp(digits):
    """A small trained Keras 3 MLP on flattened digits (fast trials on every backend)."""
    import keras

    (xtr, ytr), _ = digits
    keras.utils.set_random_seed(0)
    inp = keras.Input((64,), name="pixels")
    h = keras.layers.Dense(64, activation="relu")(inp)
    out = keras.layers.Dense(10, activation="softmax", name="probs")(h)
    model = keras.Model(inp, out)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy", keras.metrics.SparseCategoricalAccuracy(name="sca")])
    model.fit(xtr.reshape(-1, 64), ytr, epochs=8, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def flat(digits):
    _, (xte, yte) = digits
    return xte.reshape(-1, 64).astype("float32"), yte


def _forms(x, y):
    """Every data form the README promises, as (name, calib_dataset, has_labels)."""
    import tensorflow as tf

    ro = x.copy()
    ro.setflags(write=False)
    return {
        "numpy": (x, False),
        "numpy_readonly": (ro, False),
        "numpy_noncontiguous": (np.asfortranarray(x)[:, ::1], False),
        "float64": (x.astype("float64"), False),
        "tensor": (tf.constant(x), False),
        "tuple_xy": ((x, y), True),
        "tfdata_unbatched": (tf.data.Dataset.from_tensor_slices((x, y)), True),
        "tfdata_batched": (tf.data.Dataset.from_tensor_slices((x, y)).batch(16), True),
        "generator_fn": (lambda: ((x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)), True),
        "one_shot_generator": (((x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)), True),
    }


def _agree(q, model, x) -> float:
    return float((q.predict(x).argmax(-1) == model.predict(x, verbose=0).argmax(-1)).mean())


# -- the default run: one real case per backend, the hardest forms ----------------------------
# (``auto`` runs all three again: extended set; its one budget is covered by the budget test)
@pytest.mark.parametrize("accelerator", BACKENDS + [pytest.param("auto", marks=pytest.mark.extended)])
def test_readonly_tfdata_with_metric_and_one_shot_generator(accelerator, mlp, flat):
    """tf.data's read-only arrays with accuracy control (OpenVINO failed every trial), then a
    one-shot generator without a metric (failed everywhere, leaked spool folders)."""
    import keras
    import tensorflow as tf

    x, y = flat
    before = _leftovers()
    q = nano_tfx.quantize(mlp, accelerator=accelerator,
                          calib_dataset=tf.data.Dataset.from_tensor_slices((x[:128], y[:128])),
                          metric=keras.metrics.SparseCategoricalAccuracy(), accuracy_criterion=LOOSE,
                          max_trials=2, sample_size=64, batch=32)
    assert q.report.met and all(not t.failed for t in q.report.trials if t.backend == q.backend)
    assert _agree(q, mlp, x) >= 0.95
    readonly = np.frombuffer(x[:4].tobytes(), dtype=np.float32).reshape(4, 64)
    np.testing.assert_allclose(q(readonly).numpy(), q.predict(x[:4]), atol=1e-6)
    del q
    gen = (x[i * 8:(i + 1) * 8] for i in range(4))
    q = nano_tfx.quantize(mlp, accelerator=accelerator, calib_dataset=gen)
    assert _agree(q, mlp, x) >= 0.95
    assert len(np.unique(q.predict(x).argmax(-1))) > 1
    del q
    import gc

    gc.collect()
    assert _leftovers() - before == set()


def test_auto_keeps_its_timeout(mlp, flat):
    """``timeout`` covers every backend of ``auto``: the first trial always runs; after it no work
    starts that is expected to end past the deadline (a trial that did would exceed it)."""
    x, y = flat
    try:
        q = nano_tfx.quantize(mlp, accelerator="auto", calib_dataset=(x[:128], y[:128]), metric="accuracy",
                              accuracy_criterion={"relative": 0.01}, timeout=5, max_trials=50)
        report = q.report
    except nano_tfx.AccuracyCriterionNotMet as err:
        report = err.report
    assert "timeout=5s" in report.stop_reason or report.stop_reason == "all backends tried"
    # Relative to measured trials, so it holds on any CPU: what started after the first trial fit.
    assert sum(t.seconds for t in report.trials[1:]) <= 5.0
    assert 0 < report.seconds and report.trials[0].seconds <= report.seconds


def test_one_shot_generator_with_metric_calibrates_and_evaluates(mlp, flat):
    x, y = flat
    gen = ((x[i:i + 16], y[i:i + 16]) for i in range(0, 128, 16))
    q = nano_tfx.quantize(mlp, accelerator="onnxruntime", calib_dataset=gen, metric="accuracy",
                          accuracy_criterion=LOOSE, max_trials=2)
    assert q.report.met and q.report.baseline > 0.8


def test_dict_inputs_for_a_multi_input_model(flat):
    import keras

    x, y = flat
    a, b = keras.Input((32,), name="left"), keras.Input((32,), name="right")
    h = keras.layers.Concatenate()([keras.layers.Dense(16, activation="relu")(a), keras.layers.Dense(16)(b)])
    model = keras.Model([a, b], keras.layers.Dense(10, activation="softmax")(h))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit([x[:, :32], x[:, 32:]], y, epochs=3, verbose=0)
    data = {"left": x[:, :32], "right": x[:, 32:]}
    q = nano_tfx.quantize(model, accelerator="onnxruntime", calib_dataset=(data, y), metric="accuracy",
                          accuracy_criterion=LOOSE, max_trials=2)
    assert q.report.met
    assert (q.predict(data).argmax(-1) == model.predict([x[:, :32], x[:, 32:]], verbose=0).argmax(-1)).mean() > 0.9


@pytest.mark.extended
@pytest.mark.parametrize("with_metric", [False, True])
@pytest.mark.parametrize("form", list(_forms(np.zeros((1, 64), "float32"), np.zeros(1, "int64"))))
@pytest.mark.parametrize("accelerator", BACKENDS + ["auto"])
def test_data_forms_matrix(accelerator, form, with_metric, mlp, flat):
    x, y = flat
    data, labelled = _forms(x[:128], y[:128])[form]
    if with_metric and not labelled:
        data = (data, y[:128]) if form != "tensor" else (data, y[:128])
    kwargs = dict(metric="accuracy", accuracy_criterion=LOOSE, max_trials=3) if with_metric else {}
    q = nano_tfx.quantize(mlp, accelerator=accelerator, calib_dataset=data, **kwargs)
    assert _agree(q, mlp, x) >= 0.9


# -- no garbage model, ever -------------------------------------------------------------------
@pytest.mark.parametrize("accelerator", BACKENDS)
@pytest.mark.parametrize("bad", ["one_inf", "all_nan"])
def test_non_finite_calibration_data_is_refused_by_name(accelerator, bad, mlp, flat):
    x, _ = flat
    data = x[:64].copy()
    if bad == "one_inf":
        data[3, 5] = np.inf
    else:
        data[:] = np.nan
    before = _leftovers()
    with pytest.raises(ValueError, match=r"calib_dataset: input 'pixels' holds %d non-finite" % (1 if bad == "one_inf" else 64 * 64)):
        nano_tfx.quantize(mlp, accelerator=accelerator, calib_dataset=data)
    assert _leftovers() - before == set()


def test_a_collapsed_or_non_finite_candidate_is_a_failed_trial(mlp, flat, tmp_path):
    from nano_tfx.backends.base import Candidate
    from nano_tfx.data import make_batches
    from nano_tfx.interchange import to_saved_model
    from nano_tfx.tuning.runner import GarbageModelError, TrialJob, check_outputs

    x, _ = flat
    source = to_saved_model(mlp, str(tmp_path))
    calib = make_batches(x[:32], source.inputs).calibration()
    job = TrialJob(source=source, backend="onnxruntime", options=None, precision="int8", approach="static",
                   calibration=calib)

    class Fixed(Candidate):
        def __init__(self, fn):
            self.fn = fn

        def run(self, inputs):
            return [self.fn(inputs[0])]

        def save(self, directory):
            raise NotImplementedError

    with pytest.raises(GarbageModelError, match="same output for all"):
        check_outputs(job, Fixed(lambda a: np.tile(np.eye(10, dtype="float32")[3], (len(a), 1))))
    with pytest.raises(GarbageModelError, match="non-finite"):
        check_outputs(job, Fixed(lambda a: np.full((len(a), 10), np.nan, "float32")))
    check_outputs(job, Fixed(lambda a: mlp.predict(a, verbose=0)))  # a real model passes
    # Constant at FP32's mean: still far from a trained model's varied outputs.
    mean = mlp.predict(x[:32], verbose=0).mean(0)
    with pytest.raises(GarbageModelError, match=r"same output for all .* SQNR"):
        check_outputs(job, Fixed(lambda a: np.tile(mean, (len(a), 1))))


def test_a_constant_candidate_close_to_a_near_uniform_fp32_model_is_valid(flat, tmp_path):
    """A random-weight softmax is near-uniform: its rows differ by far less than one INT8 step,
    so identical INT8 rows are correct (the seed's EfficientNetB0 case), not a collapse."""
    import keras

    from nano_tfx.backends.base import Candidate
    from nano_tfx.data import make_batches
    from nano_tfx.interchange import to_saved_model
    from nano_tfx.tuning.runner import GarbageModelError, TrialJob, check_outputs

    x, _ = flat
    keras.utils.set_random_seed(0)
    inp = keras.Input((64,), name="pixels")
    out = keras.layers.Dense(10, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(stddev=1e-3))(inp)
    model = keras.Model(inp, out)
    ref = model.predict(x[:32], verbose=0)
    assert np.ptp(ref, axis=0).max() > 0  # FP32 rows do differ, by a little
    source = to_saved_model(model, str(tmp_path))
    job = TrialJob(source=source, backend="onnxruntime", options=None, precision="int8", approach="static",
                   calibration=make_batches(x[:32], source.inputs).calibration())

    class Constant(Candidate):
        def __init__(self, row):
            self.row = row

        def run(self, inputs):
            return [np.tile(self.row, (len(inputs[0]), 1))]

        def save(self, directory):
            raise NotImplementedError

    check_outputs(job, Constant(np.round(ref.mean(0) * 255) / 255))  # one INT8 step away at most: valid
    with pytest.raises(GarbageModelError, match="same output for all"):
        check_outputs(job, Constant(np.eye(10, dtype="float32")[3]))  # constant and far: refused


@pytest.mark.parametrize("kwargs, match", [
    (dict(accuracy_criterion={"relative": float("nan")}, metric="accuracy"), "accuracy_criterion: 'relative' must be a finite"),
    (dict(timeout=float("nan")), "timeout: expected finite seconds"),
    (dict(timeout=float("inf")), "timeout: expected finite seconds"),
    (dict(eval_func=lambda m: float("nan")), "eval_func: .* is nan for the FP32 model"),
    (dict(eval_func=lambda m: "abc"), "eval_func: .* must return a number"),
    (dict(eval_func=lambda m: None), "eval_func: .* must return a number"),
    (dict(metric=lambda y, p: float("nan")), "metric: .* is nan for the FP32 model"),
])
def test_bad_inputs_name_the_argument_and_leave_nothing(kwargs, match, mlp, flat):
    x, y = flat
    before = _leftovers()
    with pytest.raises(ValueError, match=match):
        nano_tfx.quantize(mlp, calib_dataset=(x[:64], y[:64]), **kwargs)
    assert _leftovers() - before == set()


def test_quantizer_refuses_nan_criterion_and_timeout():
    from components.quantizer.validation import validate_parameters

    base = dict(accelerator=None, precision="int8", accuracy_criterion=None, metric=None, label_key=None,
                tuning_strategy=None, max_trials=None, timeout=0, calibration_split="train",
                evaluation_split="eval", sample_size=10, batch_size=None, signature_name="s")
    with pytest.raises(ValueError, match="accuracy_criterion"):
        validate_parameters(**{**base, "accuracy_criterion": {"relative": float("nan")}})
    with pytest.raises(ValueError, match="timeout"):
        validate_parameters(**{**base, "timeout": float("nan")})


def test_auto_budget_bounds_the_whole_call(mlp, flat):
    x, y = flat
    q_or_err = None
    try:
        q_or_err = nano_tfx.quantize(mlp, accelerator="auto", calib_dataset=(x, y), metric="accuracy",
                                     accuracy_criterion={"absolute": 0.0, "higher_is_better": True},
                                     max_trials=2, tuning_strategy="exhaustive")
    except nano_tfx.AccuracyCriterionNotMet as err:
        q_or_err = err
    report = q_or_err.report
    assert len(report.trials) <= 2


def test_inc_trials_leak_no_descriptor_or_log_file(mlp, flat):
    x, y = flat
    q = nano_tfx.quantize(mlp, calib_dataset=x[:32], tuning_strategy="exhaustive")  # warm-up (imports)
    del q
    before, fds = _leftovers(), _open_fds()
    try:
        nano_tfx.quantize(mlp, calib_dataset=(x[:64], y[:64]), metric="accuracy", max_trials=3,
                          accuracy_criterion={"absolute": 0.0, "higher_is_better": True}, tuning_strategy="exhaustive")
    except nano_tfx.AccuracyCriterionNotMet as err:
        assert len(err.report.trials) == 3
    import gc

    gc.collect()
    assert _open_fds() <= fds
    assert _leftovers() - before == set()


def test_failed_trial_keeps_its_traceback(mlp, flat, tmp_path):
    from nano_tfx.backends.base import TrialConfig
    from nano_tfx.report import Report

    x, y = flat
    bad = TrialConfig.make({"no_such_knob": 1})
    from nano_tfx.api import quantize
    from nano_tfx.tuning import strategies

    class OneBad(strategies.BasicStrategy):
        def _candidates(self, history):
            yield bad
            yield from super()._candidates(history)

    strategies.STRATEGIES["one_bad_test"] = OneBad
    try:
        q = quantize(mlp, accelerator="onnxruntime", calib_dataset=(x[:64], y[:64]), metric="accuracy",
                     accuracy_criterion=LOOSE, tuning_strategy="one_bad_test", max_trials=3)
    finally:
        del strategies.STRATEGIES["one_bad_test"]
    failed = q.report.trials[0]
    assert failed.status == "failed" and "no_such_knob" in failed.error
    assert "Traceback" in failed.traceback and "onnxruntime" in failed.traceback
    back = Report.from_json(q.report.to_json()).trials[0]
    assert back.status == "failed" and back.traceback == failed.traceback


# -- save / load ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(mlp, flat, tmp_path_factory):
    """One saved model per backend (full INT8, calibrated, compiled like the Keras model)."""
    x, _ = flat
    out = {}
    for accelerator in BACKENDS:
        q = nano_tfx.quantize(mlp, accelerator=accelerator, calib_dataset=x[:64])
        path = tmp_path_factory.mktemp("saved") / (accelerator or "inc")
        q.save(str(path))
        out[accelerator or "inc"] = (q, str(path))
    return out


@pytest.mark.parametrize("backend", ["inc", "onnxruntime", "openvino"])
def test_compile_config_survives_save_and_load(backend, saved, flat):
    x, y = flat
    q, path = saved[backend]
    before = q.evaluate(x, y, return_dict=True)
    assert set(before) == {"loss", "accuracy", "sca"}
    after = nano_tfx.load(path).evaluate(x, y, return_dict=True)
    assert after == pytest.approx(before, abs=1e-5)


def test_an_unserialisable_custom_metric_is_a_warning_not_a_crash(saved, flat, tmp_path, caplog):
    x, y = flat
    q, _ = saved["onnxruntime"]
    import logging

    q.compile(loss="sparse_categorical_crossentropy", metrics=[lambda yt, yp: 0.5])
    with caplog.at_level(logging.WARNING, logger="nano_tfx"):
        q.save(str(tmp_path / "m"))
    assert "cannot be saved" in caplog.text
    assert set(nano_tfx.load(str(tmp_path / "m")).evaluate(x, y, return_dict=True)) == {"loss"}


def test_save_never_destroys_what_it_did_not_write(saved, tmp_path, monkeypatch):
    q, _ = saved["onnxruntime"]
    foreign = tmp_path / "d"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a nano-tfx model"):
        q.save(str(foreign))
    assert (foreign / "keep.txt").read_text() == "mine"
    monkeypatch.chdir(foreign)
    for target in (".", ""):
        with pytest.raises(ValueError, match="path:"):
            q.save(target)
    assert sorted(os.listdir(foreign)) == ["keep.txt"]
    plain = tmp_path / "file.bin"
    plain.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a directory"):
        q.save(str(plain))
    assert plain.read_bytes() == b"x"
    # an existing model is replaced atomically; overwrite=False refuses; nothing left behind
    target = tmp_path / "model"
    q.save(str(target))
    q.save(str(target))
    with pytest.raises(ValueError, match="overwrite=True"):
        q.save(str(target), overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "file.bin", "model"]
    mode = stat.S_IMODE(os.stat(target).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask
    # empty directory: written into
    empty = tmp_path / "empty"
    empty.mkdir()
    q.save(str(empty))
    assert nano_tfx.load(str(empty)).backend == "onnxruntime"


def _copy(path, tmp_path, name):
    import shutil

    dst = tmp_path / name
    shutil.copytree(path, dst)
    return dst


@pytest.mark.parametrize("damage, file", [
    (lambda d: (d / "nano_tfx.json").write_text('{"format": 1, "bac'), "nano_tfx.json"),
    (lambda d: (d / "nano_tfx.json").write_text(""), "nano_tfx.json"),
    (lambda d: (d / "nano_tfx.json").write_text("{}"), "nano_tfx.json"),
    (lambda d: (d / "nano_tfx.json").write_text(
        json.dumps({**json.loads((d / "nano_tfx.json").read_text()), "format": 999})), "format 999"),
])
def test_damaged_manifest_is_one_clear_error(damage, file, saved, tmp_path):
    d = _copy(saved["onnxruntime"][1], tmp_path, "m")
    damage(d)
    with pytest.raises(ValueError, match=f"{str(d)!r}.*{file}|{file}.*"):
        nano_tfx.load(str(d))


@pytest.mark.parametrize("backend, file, how", [
    ("inc", "int8_graph.pb", "half"), ("inc", "int8_graph.pb", "empty"),
    ("onnxruntime", "model.onnx", "half"), ("openvino", "model.xml", "half"), ("openvino", "model.bin", "empty"),
])
def test_damaged_model_file_is_named(backend, file, how, saved, tmp_path):
    d = _copy(saved[backend][1], tmp_path, "m")
    data = (d / file).read_bytes()
    (d / file).write_bytes(data[: len(data) // 2] if how == "half" else b"")
    with pytest.raises(ValueError, match=f"damaged nano-tfx model: .*{file.split('.')[0]}"):
        nano_tfx.load(str(d))


def test_truncated_report_does_not_block_the_model(saved, tmp_path, flat, caplog):
    x, _ = flat
    d = _copy(saved["openvino"][1], tmp_path, "m")
    (d / "report.json").write_text('{"backend": ')
    import logging

    with caplog.at_level(logging.WARNING, logger="nano_tfx"):
        loaded = nano_tfx.load(str(d))
    assert loaded.report is None and "damaged" in caplog.text
    assert loaded.predict(x[:2]).shape == (2, 10)


def test_garbage_saved_model_names_the_argument(tmp_path):
    (tmp_path / "saved_model.pb").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"model: .*not a readable SavedModel"):
        nano_tfx.quantize(str(tmp_path), calib_dataset=np.zeros((4, 3), "float32"))


def test_cli_bad_calibration_files_exit_2_with_one_line(mlp, flat, tmp_path, capfd):
    import zipfile

    from nano_tfx.interchange import to_saved_model
    from pipelines.cli import main

    x, _ = flat
    model_dir = to_saved_model(mlp, str(tmp_path)).path
    not_npz = tmp_path / "notnpz.npz"
    with zipfile.ZipFile(not_npz, "w") as z:
        z.writestr("readme.txt", "hello")
    nan = tmp_path / "nan.npz"
    np.savez(nan, x=np.full((8, 64), np.nan, "float32"))
    for path, match in ((not_npz, "--calib: .*not a numpy archive"), (nan, "calib_dataset: input 'pixels' holds 512 non-finite")):
        code = main(["quantize", model_dir, "--calib", str(path), "--output", str(tmp_path / "out"), "--verbose"])
        err = capfd.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and __import__("re").search(match, err), err
        assert not (tmp_path / "out").exists()
