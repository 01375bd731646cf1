"""nano-tfx benchmark: TF FP32 vs every nano-tfx backend vs the raw engines, one run.

    .venv/bin/python benchmarks/bench.py [--models mobilenetv2,resnet50,digits,bert_mini,...] [--quick] [--out DIR]

Per model it builds (a row each; a build that raises becomes ``status="failed: why"``):

* ``tf-fp32``               the Keras model through ``tf.function(model(x, training=False))``
                            with a fixed ``input_signature`` (numpy in, ``.numpy()`` out);
* ``nano-<backend>-<prec>`` ``nano_tfx.quantize(model, precision, accelerator, calib_dataset=100
                            images)`` for INC (accelerator=None), 'onnxruntime', 'openvino'; int8,
                            plus bf16 where ``backend_class(name).precisions`` offers it;
* ``nano-auto-int8``        ``accelerator='auto'`` (precision='int8');
* ``nano-auto-auto``        ``accelerator='auto', precision='auto'``: the precision ladder (INT8 →
                            INT8+BF16 → BF16 → FP32 on every engine), the fastest rung;
* ``raw-onnxruntime-*``     tf2onnx (opset 17) → ``quant_pre_process`` → ``quantize_static`` (QDQ,
                            U8S8, per-channel, MinMax) → ``InferenceSession`` (ORT_ENABLE_ALL);
* ``raw-openvino-*``        ``ov.convert_model(SavedModel)`` → ``nncf.quantize`` → ``compile_model``
                            (INFERENCE_PRECISION_HINT f32, PERFORMANCE_HINT LATENCY), ``req.infer``;
* ``raw-tflite-int8``       ``TFLiteConverter`` PTQ (representative dataset, TFLITE_BUILTINS_INT8
                            ops, float I/O) run by ``tf.lite.Interpreter(num_threads=2)``.

Timed with ``nano_tfx.timing.latency_ms`` (median of a block), interleaved over rounds (every
variant once per round, to spread a noisy neighbour over all rows); the reported value is the
median over rounds. Wrapper rows are timed through ``QuantizedModel.run([x])`` (raw arrays in and
out, like the raw engines); ``__call__`` and the same engine object called with its own API
("direct") are timed too. See ``benchmarks/README.md`` for the output format.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import nano_tfx  # noqa: E402  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

import numpy as np  # noqa: E402

SCHEMA = "nano-tfx-bench/1"
ALL_MODELS = ("mobilenetv2", "resnet50", "digits", "bert_mini", "bert_base", "vit_small")
DEFAULT_MODELS = ("mobilenetv2", "resnet50", "digits")
#: transformer encoders (Keras 3 MultiHeadAttention, post-LN, GELU), random weights: (sequence,
#: hidden, heads, FFN, blocks); a BERT's input is its embedded sequence (the token/position lookups
#: are a Gather, no compute), a ViT's the 224x224 image (16x16 patches by a strided Conv2D)
ENCODERS = {"bert_mini": (128, 256, 4, 1024, 4), "bert_base": (128, 768, 12, 3072, 12),
            "vit_small": (196, 384, 6, 1536, 12)}
CALIB_N = 100
B32 = 32
TARGET_MODEL = "mobilenetv2"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# timing plans: rounds of b1 blocks, rounds of b32 blocks
# Repeat caps are high on purpose: the time budget ends a block, so a sub-millisecond model still
# gets ~1 s of samples (a 20-call block of a 0.2 ms model lasts 5 ms and is dominated by the previous
# engine's still-spinning worker threads on a 2-core machine).
PLANS = {
    "full": dict(rounds=5, b1_repeats=5000, b1_budget=2.0, aux_budget=0.75, b32_rounds=3, b32_repeats=2000,
                 b32_budget=1.5, warmup=3),
    "quick": dict(rounds=1, b1_repeats=2000, b1_budget=1.0, aux_budget=0.5, b32_rounds=1, b32_repeats=500,
                  b32_budget=1.0, warmup=2),
}

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# models and data
# --------------------------------------------------------------------------------------------
@dataclass
class ModelCase:
    name: str
    model: Any
    shape: tuple
    calib: np.ndarray  # CALIB_N images: calibration (and, for random models, the agreement set)
    eval_x: np.ndarray  # accuracy / agreement set
    eval_y: np.ndarray | None  # labels (digits) or None (agreement with TF FP32)
    x1: np.ndarray
    x32: np.ndarray
    notes: str = ""


def build_case(name: str) -> ModelCase:
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if name in ("mobilenetv2", "resnet50"):
        shape = (224, 224, 3)
        if name == "mobilenetv2":
            model = keras.applications.MobileNetV2(weights=None, input_shape=shape, classes=1000)
        else:
            model = keras.applications.ResNet50(weights=None, input_shape=shape, classes=1000)
        calib = rng.uniform(-1.0, 1.0, (CALIB_N,) + shape).astype(np.float32)
        n_bn = _recalibrate_batchnorm(model, calib[:B32])
        return ModelCase(name, model, shape, calib, calib, None, calib[:1].copy(), calib[:B32].copy(),
                         "random weights (weights=None), random uniform[-1,1] images; BatchNorm moving "
                         f"statistics of {n_bn} layers re-estimated on {B32} calibration images (without "
                         "it the random network's activations vanish (~1e-12) and every engine outputs the "
                         "same constant, making the agreement column trivially 1.0)")
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = (d.images / 16.0).astype(np.float32)[..., None]
        y = d.target.astype(np.int64)
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
        model = keras.Sequential([
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        model.fit(x_tr, y_tr, epochs=8, batch_size=32, verbose=0)
        return ModelCase(name, model, (8, 8, 1), x_tr[:CALIB_N].copy(), x_te, y_te, x_te[:1].copy(),
                         x_te[:B32].copy(),
                         f"trained 8 epochs on {len(x_tr)} load_digits images; held-out {len(x_te)}")
    if name in ENCODERS:
        seq, hidden, heads, ffn, blocks = ENCODERS[name]
        vit = name.startswith("vit")
        shape = (224, 224, 3) if vit else (seq, hidden)
        model = _encoder(keras, shape, hidden, heads, ffn, blocks, vit)
        calib = (rng.uniform(-1.0, 1.0, (CALIB_N,) + shape) if vit else rng.standard_normal((CALIB_N,) + shape))
        calib = calib.astype(np.float32)
        return ModelCase(name, model, shape, calib, calib, None, calib[:1].copy(), calib[:B32].copy(),
                         f"Keras 3 encoder, random weights: {blocks} post-LN blocks, hidden {hidden}, {heads} heads, "
                         f"FFN {ffn}, sequence {seq}" + (" (16x16 patches of a 224x224 image)" if vit else
                                                         " (input: the embedded sequence)"))
    raise ValueError(f"--models: unknown model {name!r}; expected {list(ALL_MODELS)}")


def _positions(keras, seq: int, hidden: int):
    """A learned position embedding added to ``x`` (a weight, not a constant input: tf2onnx turns
    the ``Embedding(arange)`` form into a graph input the raw ONNX Runtime rows cannot feed)."""
    class Positions(keras.layers.Layer):
        def build(self, input_shape):
            self.table = self.add_weight(shape=(seq, hidden), initializer="random_normal", name="table")

        def call(self, x):
            return x + self.table

    return Positions(name="positions")


def _encoder(keras, shape: tuple, hidden: int, heads: int, ffn: int, blocks: int, vit: bool):
    """A BERT/ViT-shaped encoder: [patch embedding +] position embedding, ``blocks`` x (MHA, add &
    LayerNorm, Dense-GELU-Dense, add & LayerNorm), then the first token (BERT) or the mean (ViT)
    into a classifier."""
    L = keras.layers
    inp = keras.Input(shape, name="input")
    x = inp
    if vit:
        x = L.Reshape((-1, hidden))(L.Conv2D(hidden, 16, strides=16, name="patches")(x))
    x = _positions(keras, x.shape[1], hidden)(x)
    for i in range(blocks):
        a = L.MultiHeadAttention(heads, hidden // heads, name=f"block{i}_mha")(x, x)
        x = L.LayerNormalization(epsilon=1e-12, name=f"block{i}_ln1")(x + a)
        f = L.Dense(hidden, name=f"block{i}_ffn2")(L.Dense(ffn, activation="gelu", name=f"block{i}_ffn1")(x))
        x = L.LayerNormalization(epsilon=1e-12, name=f"block{i}_ln2")(x + f)
    pooled = L.GlobalAveragePooling1D()(x) if vit else L.Lambda(lambda t: t[:, 0, :], name="first_token")(x)
    return keras.Model(inp, L.Dense(1000 if vit else 2, activation="softmax", name="probs")(pooled))


def _recalibrate_batchnorm(model, x: np.ndarray) -> int:
    """Set every BatchNormalization layer's moving mean/variance to the batch statistics of ``x``
    (one forward pass in training mode with momentum 0). Same architecture and cost, weights
    still random; only the activations get a realistic scale."""
    import keras

    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    old = [b.momentum for b in bns]
    for b in bns:
        b.momentum = 0.0
    model(x, training=True)
    for b, m in zip(bns, old):
        b.momentum = m
    return len(bns)


# --------------------------------------------------------------------------------------------
# variants
# --------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    kind: str  # "tf" | "nano" | "raw"
    engine: str
    precision: str
    api: str = ""
    run: Callable | None = None  # list[np.ndarray] -> outputs (timed: b1, b32, accuracy)
    call: Callable | None = None  # QuantizedModel.__call__
    direct: Callable | None = None  # the same engine object through the engine's own API
    size_bytes: int | None = None
    own_raw: str | None = None  # name of the raw variant of the same engine/precision
    status: str = "ok"
    build_s: float | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)
    keep: Any = None  # objects that must stay alive while ``run`` is used


def _first(out: Any) -> np.ndarray:
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        out = out[0]
    return np.asarray(out.numpy() if hasattr(out, "numpy") else out)


def _dir_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def _failed(err: BaseException) -> str:
    last = traceback.format_exception_only(type(err), err)[-1].strip().replace("\n", " ").replace("|", "/")
    return f"failed: {last[:300]}"


def _peak_rss():
    """``benchmarks/_rss.PeakRSS`` (the script's folder is on sys.path; ``-m`` runs see the package)."""
    try:
        from benchmarks._rss import PeakRSS
    except ImportError:
        from _rss import PeakRSS
    return PeakRSS()


def _keep_rss(variant: Variant, key: str, p: Any) -> None:
    """A block's peak RSS and its increment over the block's start, MB (see ``rss_table``)."""
    variant.extra[key] = {"peak_mb": _r(p.peak_mb, 0), "delta_mb": _r(p.delta_mb, 0), "how": p.how}


def build(variant: Variant, fn: Callable[[Variant], None]) -> Variant:
    t = time.perf_counter()
    gc.collect()  # the previous variant's garbage must not be counted in this one's peak
    with _peak_rss() as rss:
        try:
            fn(variant)
        except Exception as err:  # a backend that fails is a result, not the end of the benchmark
            variant.status = _failed(err)
            variant.run = variant.call = variant.direct = None
            traceback.print_exc(file=sys.stderr)
    _keep_rss(variant, "build_rss", rss)
    variant.build_s = round(time.perf_counter() - t, 1)
    log(f"  {variant.name}: {variant.status} ({variant.build_s}s)")
    return variant


def tf_fp32(case: ModelCase, saved_model_dir: str) -> Callable[[Variant], None]:
    def make(v: Variant) -> None:
        import tensorflow as tf

        spec = tf.TensorSpec((None,) + case.shape, tf.float32, name="input")
        fn = tf.function(lambda x: case.model(x, training=False), input_signature=[spec])
        fn.get_concrete_function()
        v.run = lambda xs: [fn(xs[0]).numpy()]
        v.size_bytes = _dir_size(saved_model_dir)
        v.keep = fn
        v.extra["tf_function"] = fn

    return make


def _direct_fn(q) -> Callable | None:
    """The wrapped engine object called with its own API (no nano-tfx code on the path)."""
    c = q.candidate
    try:
        if q.backend == "onnxruntime":
            sess, name, outs = c.session, c.input_names[0], list(c.output_names)
            return lambda xs: sess.run(outs, {name: xs[0]})
        if q.backend == "openvino":
            cm = c.compiled
            req = cm.create_infer_request()
            out = cm.outputs[0]
            return lambda xs: [req.infer({0: xs[0]}, share_inputs=True)[out]]
        if q.backend == "inc":
            sess, feed, fetches = c._sess, c._feeds[0], c._fetches
            return lambda xs: sess.run(fetches, {feed: xs[0]})
    except Exception:
        return None
    return None


def nano(case: ModelCase, accelerator: str | None, precision: str, approach: str = "static") -> Callable[[Variant], None]:
    def make(v: Variant) -> None:
        q = nano_tfx.quantize(case.model, precision=precision, accelerator=accelerator,
                              calib_dataset=case.calib, approach=approach)
        v.run = q.run
        v.call = lambda xs: q(xs[0])
        v.direct = _direct_fn(q)
        v.size_bytes = q.candidate.size_bytes()
        v.keep = q
        if accelerator == "auto":
            v.engine = f"auto->{q.backend}"
            v.own_raw = f"raw-{q.backend}-{q.precision}" if q.backend != "inc" else None
            v.precision = q.precision
        rep = q.report
        if rep is not None:
            v.extra["report_trials"] = [
                {"backend": t.backend, "precision": t.precision, "latency_ms": t.latency_ms,
                 "latency_batch_ms": t.latency_batch_ms, "status": t.status, "seconds": t.seconds}
                for t in rep.trials
            ]
            if rep.ladder:
                v.notes = rep.ladder_summary()
                v.extra["ladder"] = rep.ladder
            elif accelerator == "auto" and rep.chosen is not None:
                v.notes = "auto chose " + q.backend + " (trial latencies: " + ", ".join(
                    f"{t.backend}={t.latency_ms:.3g}ms" if t.latency_ms else f"{t.backend}={t.status}"
                    for t in rep.trials) + ")"
            # nano's own side-by-side numbers (its final timing), beside the bench's rows
            v.extra["report_speed"] = {"speedup": rep.speedup, "int8_gain": rep.int8_gain,
                                       "engine_fp32_latency_ms": rep.engine_fp32_latency_ms,
                                       "fp32_latency_ms": rep.fp32_latency_ms}
            cfg = rep.trials[rep.chosen].config if rep.chosen is not None and rep.trials else None
            if cfg:
                v.extra["config"] = cfg

    return make


class _OrtReader:
    def __init__(self, name: str, xs: np.ndarray):
        self._items = [{name: xs[i:i + 1]} for i in range(len(xs))]
        self._it = iter(self._items)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._items)


def raw_onnxruntime(case: ModelCase, tmp: str, holder: dict) -> tuple[Callable, Callable]:
    """Two builders sharing one tf2onnx conversion: (fp32, int8)."""

    def session(path: str):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return sess, (lambda xs: sess.run(None, {name: xs[0]}))

    def convert() -> str:
        if "fp32" not in holder:
            import tensorflow as tf
            import tf2onnx

            spec = tf.TensorSpec((None,) + case.shape, tf.float32, name="input")
            fn = tf.function(lambda x: case.model(x, training=False), input_signature=[spec])
            path = os.path.join(tmp, "raw_fp32.onnx")
            tf2onnx.convert.from_function(fn, input_signature=[spec], opset=17, output_path=path)
            holder["fp32"] = path
        return holder["fp32"]

    def fp32(v: Variant) -> None:
        path = convert()
        sess, v.run = session(path)
        v.keep, v.size_bytes = sess, os.path.getsize(path)

    def int8(v: Variant) -> None:
        from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                              quantize_static)

        src = convert()
        pre = os.path.join(tmp, "raw_fp32_pre.onnx")
        cwd = os.getcwd()
        try:
            # an incomplete symbolic shape inference (encoders) dumps sym_shape_infer_temp.onnx
            # and uuid-named data files into the current directory: ours, not the caller's
            os.chdir(tmp)
            quant_pre_process(src, pre)
        except Exception as err:  # the documented step is optional
            v.notes = f"quant_pre_process failed ({type(err).__name__}); quantized the raw export"
            pre = src
        finally:
            os.chdir(cwd)
        out = os.path.join(tmp, "raw_int8.onnx")
        quantize_static(pre, out, _OrtReader("input", case.calib), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        sess, v.run = session(out)
        v.keep, v.size_bytes = sess, os.path.getsize(out)

    def int8_dynamic(v: Variant) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        pre = os.path.join(tmp, "raw_fp32_pre.onnx")
        src = pre if os.path.exists(pre) else convert()  # int8 (static) ran first: its pre-processed model
        out = os.path.join(tmp, "raw_int8_dynamic.onnx")
        # MatMul only: ORT's CPU ConvInteger has no int8-weight kernel (a ViT's patch Conv failed
        # to load), and the transformer examples quantize the MatMuls
        quantize_dynamic(src, out, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"])
        sess, v.run = session(out)
        v.keep, v.size_bytes = sess, os.path.getsize(out)

    return fp32, int8, int8_dynamic


def raw_openvino(case: ModelCase, saved_model_dir: str, tmp: str, holder: dict) -> Callable:
    def make_for(hint: str, quantize: bool) -> Callable[[Variant], None]:
        def make(v: Variant) -> None:
            import openvino as ov

            core = holder.setdefault("core", ov.Core())
            if "model" not in holder:
                try:
                    holder["model"] = ov.convert_model(saved_model_dir)
                    holder["route"] = "convert_model(SavedModel dir)"
                except Exception:
                    import tensorflow as tf

                    spec = tf.TensorSpec((None,) + case.shape, tf.float32, name="input")
                    fn = tf.function(lambda x: case.model(x, training=False), input_signature=[spec])
                    holder["model"] = ov.convert_model(fn.get_concrete_function())
                    holder["route"] = "convert_model(concrete function)"
            model = holder["model"]
            if quantize:
                import nncf

                data = nncf.Dataset([case.calib[i:i + 1] for i in range(len(case.calib))])
                model = nncf.quantize(model, data, subset_size=len(case.calib),
                                      target_device=nncf.TargetDevice.CPU)
            cm = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                   "PERFORMANCE_HINT": "LATENCY"})
            req = cm.create_infer_request()
            out = cm.outputs[0]
            v.run = lambda xs: [req.infer({0: xs[0]}, share_inputs=True)[out]]
            v.keep = (cm, req)
            d = os.path.join(tmp, f"raw_ov_{v.precision}")
            ov.save_model(model, os.path.join(d, "model.xml"), compress_to_fp16=False)
            v.size_bytes = _dir_size(d)
            v.notes = holder.get("route", "")

        return make

    return make_for


class _TFLiteRunner:
    """One interpreter per batch size (TFLite tensors have fixed shapes once allocated)."""

    def __init__(self, blob: bytes, threads: int = 2):
        import tensorflow as tf

        self._tf, self._blob, self._threads, self._by_n = tf, blob, threads, {}

    def _get(self, n: int):
        if n not in self._by_n:
            it = self._tf.lite.Interpreter(model_content=self._blob, num_threads=self._threads)
            inp = it.get_input_details()[0]
            it.resize_tensor_input(inp["index"], [n] + list(inp["shape"][1:]))
            it.allocate_tensors()
            self._by_n[n] = (it, inp["index"], it.get_output_details()[0]["index"])
        return self._by_n[n]

    def __call__(self, xs):
        it, i, o = self._get(len(xs[0]))
        it.set_tensor(i, xs[0])
        it.invoke()
        return [it.get_tensor(o)]


def raw_tflite(case: ModelCase, saved_model_dir: str) -> Callable[[Variant], None]:
    def make(v: Variant) -> None:
        import tensorflow as tf

        conv = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]

        def representative():
            for i in range(len(case.calib)):
                yield [case.calib[i:i + 1]]

        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        blob = conv.convert()
        v.run = _TFLiteRunner(blob, threads=2)
        v.size_bytes = len(blob)

    return make


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------
def _predict(run: Callable, x: np.ndarray, bs: int = B32) -> np.ndarray:
    return np.concatenate([_first(run([x[i:i + bs]])) for i in range(0, len(x), bs)])


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def measure(case: ModelCase, variants: list[Variant], plan: dict) -> None:
    from nano_tfx.timing import latency_ms

    ok = [v for v in variants if v.status == "ok"]
    # accuracy / agreement first (also a warm-up of every engine at batch 32)
    ref = None
    tf_row = next((v for v in ok if v.kind == "tf"), None)
    if tf_row is not None:
        ref = _predict(tf_row.run, case.eval_x)
        tf_row.extra["ref_distinct_top1"] = int(len(np.unique(ref.argmax(-1))))
    for v in ok:
        try:
            gc.collect()
            with _peak_rss() as rss:
                pred = _predict(v.run, case.eval_x)
            _keep_rss(v, "infer_rss", rss)
            top = pred.argmax(-1)
            if ref is not None:
                v.extra["agreement_vs_tf"] = float(np.mean(top == ref.argmax(-1)))
                v.extra["out_rel_l2"] = float(np.linalg.norm(pred - ref) / max(np.linalg.norm(ref), 1e-30))
            if case.eval_y is not None:
                v.extra["accuracy"] = float(np.mean(top == case.eval_y))
        except Exception as err:
            v.status = _failed(err)
            traceback.print_exc(file=sys.stderr)
    ok = [v for v in ok if v.status == "ok"]
    for v in ok:
        v.extra.update(b1=[], call=[], direct=[], b32=[])
    x1, x32 = [case.x1], [case.x32]
    w = plan["warmup"]
    for r in range(plan["rounds"]):
        for v in ok:
            try:
                v.extra["b1"].append(latency_ms(v.run, x1, w, plan["b1_repeats"], plan["b1_budget"]))
                if v.direct is not None:
                    v.extra["direct"].append(latency_ms(v.direct, x1, w, plan["b1_repeats"], plan["aux_budget"]))
                if v.call is not None:
                    v.extra["call"].append(latency_ms(v.call, x1, w, plan["b1_repeats"], plan["aux_budget"]))
            except Exception as err:
                v.status = _failed(err)
        log(f"  b1 round {r + 1}/{plan['rounds']} done")
    for r in range(plan["b32_rounds"]):
        for v in ok:
            if v.status != "ok":
                continue
            try:
                v.extra["b32"].append(latency_ms(v.run, x32, w, plan["b32_repeats"], plan["b32_budget"]))
            except Exception as err:
                v.status = _failed(err)
        log(f"  b32 round {r + 1}/{plan['b32_rounds']} done")


def _ratio_per_round(a: list, b: list) -> float | None:
    pairs = [x / y for x, y in zip(a, b) if x and y]
    return float(statistics.median(pairs)) if pairs else None


def rows_for(case: ModelCase, variants: list[Variant]) -> tuple[list[dict], str | None]:
    by = {v.name: v for v in variants}
    tf_b1 = _median(by["tf-fp32"].extra.get("b1", [])) if "tf-fp32" in by else None
    raws = [(v.name, _median(v.extra.get("b1", []))) for v in variants if v.kind == "raw" and v.status == "ok"]
    raws = [(n, t) for n, t in raws if t is not None]
    fastest = min(raws, key=lambda p: p[1]) if raws else None
    rows = []
    for v in variants:
        e = v.extra
        b1 = _median(e.get("b1", []))
        b32 = _median(e.get("b32", []))
        own = by.get(v.own_raw) if v.own_raw else None
        own_ok = own is not None and own.status == "ok" and own.extra.get("b1")
        rows.append({
            "model": case.name,
            "variant": v.name,
            "kind": v.kind,
            "engine": v.engine,
            "precision": v.precision,
            "api": v.api,
            "status": v.status,
            "b1_ms": _r(b1),
            "b1_call_ms": _r(_median(e.get("call", []))),
            "b1_direct_ms": _r(_median(e.get("direct", []))),
            "b32_ms": _r(b32),
            "b32_ips": _r(B32 / b32 * 1000.0 if b32 else None, 1),
            "accuracy": _r(e.get("accuracy") if case.eval_y is not None else e.get("agreement_vs_tf"), 4),
            "accuracy_kind": ("top1_heldout" if case.eval_y is not None else "top1_agreement_vs_tf_fp32")
            if v.status == "ok" else None,
            "agreement_vs_tf": _r(e.get("agreement_vs_tf"), 4),
            "out_rel_l2_vs_tf": _r(e.get("out_rel_l2"), 5),
            "size_mb": _r(v.size_bytes / 1e6 if v.size_bytes else None, 3),
            "ratio_b1_vs_tf_fp32": _r(b1 / tf_b1 if b1 and tf_b1 else None, 3),
            "ratio_b1_vs_fastest_raw": _r(b1 / fastest[1] if b1 and fastest else None, 3),
            "own_raw": v.own_raw,
            "ratio_b1_vs_own_raw": _r(_ratio_per_round(e.get("b1", []), own.extra["b1"]) if own_ok else None, 3),
            "ratio_run_vs_direct": _r(_ratio_per_round(e.get("b1", []), e.get("direct", [])), 3),
            "gain_b1_vs_engine_fp32": _r(_engine_fp32_gain(v, by), 3),
            # report.speedup (nano's own side-by-side timing, FP32 SavedModel vs the returned model)
            # beside TF FP32 (this bench's tf.function row) ÷ the returned model's __call__, per round
            "report_speedup": _r((e.get("report_speed") or {}).get("speedup"), 3),
            "call_speedup_vs_tf_fp32": _r(_ratio_per_round(by["tf-fp32"].extra.get("b1", []), e.get("call", []))
                                          if "tf-fp32" in by and e.get("call") else None, 3),
            # the returned model's ms as nano's report timed it (its FP32 ms ÷ report.speedup) ÷ the
            # same model's q(x) ms here: how far the report's own number is from the model's call
            "report_ms_vs_call": _r(_ratio(_report_ms(e.get("report_speed")), _median(e.get("call", []))), 3),
            "build_s": v.build_s,
            "build_peak_rss_mb": (e.get("build_rss") or {}).get("peak_mb"),
            "build_rss_delta_mb": (e.get("build_rss") or {}).get("delta_mb"),
            "infer_peak_rss_mb": (e.get("infer_rss") or {}).get("peak_mb"),
            "infer_rss_delta_mb": (e.get("infer_rss") or {}).get("delta_mb"),
            "b1_ms_rounds": [_r(t) for t in e.get("b1", [])],
            "b32_ms_rounds": [_r(t) for t in e.get("b32", [])],
            "b1_call_ms_rounds": [_r(t) for t in e.get("call", [])],
            "b1_direct_ms_rounds": [_r(t) for t in e.get("direct", [])],
            "notes": v.notes,
            "details": {k: val for k, val in e.items()
                        if k in ("report_trials", "report_speed", "config", "ref_distinct_top1")},
        })
    return rows, (fastest[0] if fastest else None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _report_ms(speed: dict | None) -> float | None:
    """The returned model's batch-1 ms in nano's report (FP32 ms ÷ speedup), None if not reported."""
    if not speed or not speed.get("speedup") or not speed.get("fp32_latency_ms"):
        return None
    return speed["fp32_latency_ms"] / speed["speedup"]


def _engine_fp32_gain(v: Variant, by: dict) -> float | None:
    """The same engine's FP32 row's b1 ms ÷ this row's (> 1: faster than the engine's FP32), for
    the engines' INT8/BF16 rows (auto: the engine it chose); median over rounds of the per-round
    ratio. None where the engine has no FP32 row (INC, TFLite) or the row is FP32 itself."""
    engine = v.engine.split("->")[-1]  # "auto->openvino"
    fp32 = by.get(f"raw-{engine}-fp32")
    if v.precision == "fp32" or v.status != "ok" or fp32 is None or fp32.status != "ok":
        return None
    return _ratio_per_round(fp32.extra.get("b1", []), v.extra.get("b1", []))


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


# --------------------------------------------------------------------------------------------
# one model
# --------------------------------------------------------------------------------------------
def by_name(variants: list[Variant], name: str) -> Variant | None:
    return next((v for v in variants if v.name == name), None)


def bench_model(name: str, plan: dict, skipped: list, only: set | None = None) -> tuple[list[dict], str | None, str]:
    from nano_tfx.backends.base import backend_class, backend_names

    log(f"{name}: building model")
    case = build_case(name)
    tmp = tempfile.mkdtemp(prefix=f"nano_tfx_bench_{name}_")
    try:
        sm = os.path.join(tmp, "saved_model")
        case.model.export(sm, verbose=False)
        variants: list[Variant] = []

        def add(v: Variant, fn: Callable[[Variant], None]) -> None:
            if only is not None and v.name not in only and v.name != "tf-fp32":  # --variants
                skipped.append({"model": name, "variant": v.name, "reason": "not in --variants"})
                return
            variants.append(build(v, fn))

        add(Variant("tf-fp32", "tf", "tensorflow", "fp32", "tf.function(model(x, training=False))"),
            tf_fp32(case, sm))
        bf16_backends = []
        for backend in backend_names():
            acc = None if backend == "inc" else backend
            own = None if backend == "inc" else f"raw-{backend}-int8"
            add(Variant(f"nano-{backend}-int8", "nano", backend, "int8", "QuantizedModel.run([x])", own_raw=own),
                nano(case, acc, "int8"))
            try:
                precs = dict(backend_class(backend).precisions)
            except Exception as err:
                precs = {}
                skipped.append({"model": name, "variant": f"nano-{backend}-bf16", "reason": _failed(err)})
            if "bf16" in precs:
                bf16_backends.append(backend)
                add(Variant(f"nano-{backend}-bf16", "nano", backend, "bf16", "QuantizedModel.run([x])",
                            own_raw="raw-openvino-bf16" if backend == "openvino" else None),
                    nano(case, acc, "bf16"))
            else:
                skipped.append({"model": name, "variant": f"nano-{backend}-bf16",
                                "reason": f"{backend}.precisions = {sorted(precs)} (no bf16 on this CPU/backend)"})
        if name in ENCODERS:
            add(Variant("nano-onnxruntime-int8-dynamic", "nano", "onnxruntime", "int8", "QuantizedModel.run([x])",
                        own_raw="raw-onnxruntime-int8-dynamic"), nano(case, "onnxruntime", "int8", "dynamic"))
        add(Variant("nano-auto-int8", "nano", "auto", "int8", "QuantizedModel.run([x])"), nano(case, "auto", "int8"))
        # the precision ladder on every engine (issue 20): the fastest of INT8/INT8+BF16/BF16/FP32
        add(Variant("nano-auto-auto", "nano", "auto", "auto", "QuantizedModel.run([x])"), nano(case, "auto", "auto"))

        ort_holder: dict = {}
        ort_fp32, ort_int8, ort_dyn = raw_onnxruntime(case, tmp, ort_holder)
        add(Variant("raw-onnxruntime-int8", "raw", "onnxruntime", "int8", "InferenceSession.run"), ort_int8)
        if name in ENCODERS:  # ORT dynamic INT8 (MatMulInteger), the transformer option (issue 18 item 3)
            add(Variant("raw-onnxruntime-int8-dynamic", "raw", "onnxruntime", "int8", "InferenceSession.run",
                        notes="quantize_dynamic(per_channel=True, QInt8, MatMul only)"), ort_dyn)
        add(Variant("raw-onnxruntime-fp32", "raw", "onnxruntime", "fp32", "InferenceSession.run"), ort_fp32)
        ov_holder: dict = {}
        ov = raw_openvino(case, sm, tmp, ov_holder)
        add(Variant("raw-openvino-int8", "raw", "openvino", "int8", "InferRequest.infer"), ov("f32", True))
        add(Variant("raw-openvino-fp32", "raw", "openvino", "fp32", "InferRequest.infer"), ov("f32", False))
        if "openvino" in bf16_backends:
            add(Variant("raw-openvino-bf16", "raw", "openvino", "bf16", "InferRequest.infer"), ov("bf16", False))
        add(Variant("raw-tflite-int8", "raw", "tflite", "int8", "Interpreter.invoke (num_threads=2)"),
            raw_tflite(case, sm))

        # interleave each wrapper with its raw engine so that neighbouring blocks share the load
        order = ["tf-fp32", "nano-inc-int8", "nano-onnxruntime-int8", "raw-onnxruntime-int8",
                 "nano-onnxruntime-int8-dynamic", "raw-onnxruntime-int8-dynamic", "raw-onnxruntime-fp32", "nano-openvino-int8", "raw-openvino-int8", "nano-openvino-bf16",
                 "raw-openvino-bf16", "raw-openvino-fp32", "raw-tflite-int8", "nano-auto-int8", "nano-auto-auto"]
        rank = {n: i for i, n in enumerate(order)}
        variants.sort(key=lambda v: rank.get(v.name, len(order)))
        log(f"{name}: measuring accuracy and latency")
        measure(case, variants, plan)
        rows, fastest = rows_for(case, variants)
        distinct = by_name(variants, "tf-fp32").extra.get("ref_distinct_top1") if by_name(variants, "tf-fp32") else None
        notes = case.notes + (f"; TF FP32 predicts {distinct} distinct top-1 classes on the "
                              f"{len(case.eval_x)}-image {'held-out' if case.eval_y is not None else 'agreement'} set"
                              if distinct is not None else "")
        return rows, fastest, notes
    finally:
        import keras

        del case
        keras.backend.clear_session()
        gc.collect()
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# targets and reports
# --------------------------------------------------------------------------------------------
#: engines ONEDNN_MAX_CPU_ISA caps (oneDNN inside); ONNX Runtime's MLAS picks its kernels by cpuid
CAPPED_ENGINES = ("openvino", "tensorflow", "inc")


def isa_cap() -> str | None:
    """``ONEDNN_MAX_CPU_ISA`` when set (upper case; 'ALL' counts as unset)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or "").strip().upper()
    return cap if cap and cap != "ALL" else None


def _encoder_targets(rows: list[dict], model: str, flags: dict) -> list[dict]:
    """Issue 18 item 8, batch 1: ``auto`` INT8 vs the fastest engine FP32 row and vs TF FP32 (per-round
    ratios, higher = faster). With AVX-512 VNNI or AMX: >= 2x and >= 4x (the BERT-base shape is the
    primary one); AVX2 only: >= 1.3x the fastest FP32 engine."""
    auto = next((r for r in rows if r["model"] == model and r["variant"] == "nano-auto-int8"), None)
    tf = next((r for r in rows if r["model"] == model and r["variant"] == "tf-fp32"), None)
    fp32 = [r for r in rows if r["model"] == model and r["kind"] == "raw" and r["precision"] == "fp32"
            and r["status"] == "ok" and r.get("b1_ms")]
    cap = isa_cap()
    emulated = cap is not None and not any(k in cap for k in ("VNNI", "AMX"))
    if emulated:
        # an AVX2-only CPU emulated with ONEDNN_MAX_CPU_ISA: it caps oneDNN (OpenVINO, TensorFlow),
        # not ONNX Runtime's MLAS, so only capped engines are compared
        fp32 = [r for r in fp32 if r["engine"] in CAPPED_ENGINES]
        if not auto or auto["engine"].split("->")[-1] not in CAPPED_ENGINES:
            auto = next((r for r in rows if r["model"] == model and r["variant"] == "nano-openvino-int8"), None)
    if not auto or not auto.get("b1_ms"):
        return []
    vnni = bool(flags.get("avx512_vnni") or flags.get("amx_int8") or flags.get("avx_vnni")) and not emulated
    cpu = (f"AVX2-only emulated (ONEDNN_MAX_CPU_ISA={cap}; OpenVINO/TensorFlow capped, ONNX Runtime rows left out)"
           if emulated else "VNNI/AMX CPU" if vnni else "AVX2-only CPU")
    out = []
    if fp32:
        best = min(fp32, key=lambda r: r["b1_ms"])
        gain = _ratio_per_round(best.get("b1_ms_rounds") or [], auto.get("b1_ms_rounds") or [])
        bar = 2.0 if vnni else 1.3
        out.append({"target": "encoder_auto_int8_vs_fastest_fp32_engine_b1", "model": model,
                    "variant": auto["variant"], "value": _r(gain), "threshold": f">= {bar:g}",
                    "met": bool(gain and gain >= bar), "primary": model == "bert_base",
                    "note": f"{best['variant']} {best['b1_ms']:.3f} ms ÷ {auto['variant']} ({auto['engine']}) "
                            f"{auto['b1_ms']:.3f} ms; " + cpu})
    if tf and tf.get("b1_ms") and vnni:
        gain = _ratio_per_round(tf.get("b1_ms_rounds") or [], auto.get("b1_ms_rounds") or [])
        out.append({"target": "encoder_auto_int8_vs_tf_fp32_b1", "model": model, "variant": "nano-auto-int8",
                    "value": _r(gain), "threshold": ">= 4", "met": bool(gain and gain >= 4),
                    "primary": model == "bert_base", "note": "VNNI/AMX CPU"})
    return out


def targets(rows: list[dict], models: list[str], flags: dict | None = None) -> list[dict]:
    out = []

    def row(model, variant):
        return next((r for r in rows if r["model"] == model and r["variant"] == variant), None)

    for model in models:
        auto, tf = row(model, "nano-auto-int8"), row(model, "tf-fp32")
        primary = model == TARGET_MODEL
        if model in ENCODERS:
            out += _encoder_targets(rows, model, flags or {})
        if auto and tf:
            speed = tf["b1_ms"] / auto["b1_ms"] if auto.get("b1_ms") and tf.get("b1_ms") else None
            out.append({"target": "auto_speedup_vs_tf_fp32_b1", "model": model, "variant": "nano-auto-int8",
                        "value": _r(speed, 2), "threshold": ">= 10", "met": bool(speed and speed >= 10),
                        "primary": primary})
            ratio = auto.get("ratio_b1_vs_fastest_raw")
            out.append({"target": "auto_vs_fastest_raw_b1", "model": model, "variant": "nano-auto-int8",
                        "value": ratio, "threshold": "<= 1.05", "met": bool(ratio and ratio <= 1.05),
                        "primary": primary})
            out.append(_auto_vs_fastest_nano(rows, model, auto, primary))
        ladder = row(model, "nano-auto-auto")
        if ladder and ladder.get("b1_ms"):
            # the ladder returns the fastest rung: within 5 % of the fastest nano row of any precision
            others = [r for r in rows if r["model"] == model and r["kind"] == "nano" and r.get("b1_ms")
                      and r["variant"] != "nano-auto-auto" and r["status"] == "ok"]
            if others:
                best = min(others, key=lambda r: r["b1_ms"])
                ratio = _ratio_per_round(ladder.get("b1_ms_rounds") or [], best.get("b1_ms_rounds") or [])
                ratio = ratio if ratio is not None else ladder["b1_ms"] / best["b1_ms"]
                out.append({"target": "ladder_vs_fastest_nano_b1", "model": model, "variant": "nano-auto-auto",
                            "value": _r(ratio), "threshold": "<= 1.05", "met": bool(ratio <= 1.05),
                            "primary": primary, "note": f"vs {best['variant']}, same run"})
        for r in rows:
            if r["model"] != model or r["kind"] != "nano" or r["variant"] in ("nano-auto-int8", "nano-auto-auto"):
                continue
            if r["status"] != "ok":
                out.append({"target": "wrapper_vs_raw_b1", "model": model, "variant": r["variant"], "value": None,
                            "threshold": "<= 1.05", "met": False, "primary": primary, "note": r["status"]})
                continue
            if r["ratio_b1_vs_own_raw"] is not None:
                out.append({"target": "wrapper_vs_raw_b1", "model": model, "variant": r["variant"],
                            "value": r["ratio_b1_vs_own_raw"], "threshold": "<= 1.05",
                            "met": r["ratio_b1_vs_own_raw"] <= 1.05, "primary": primary,
                            "note": f"vs {r['own_raw']} (independently built)"})
            if r["ratio_run_vs_direct"] is not None:
                out.append({"target": "wrapper_overhead_same_engine_b1", "model": model, "variant": r["variant"],
                            "value": r["ratio_run_vs_direct"], "threshold": "<= 1.05",
                            "met": r["ratio_run_vs_direct"] <= 1.05, "primary": primary,
                            "note": "QuantizedModel.run vs the same engine object's own API"})
    return out


def _auto_vs_fastest_nano(rows: list[dict], model: str, auto: dict, primary: bool) -> dict:
    """auto b1 / the fastest single-backend nano INT8 row's b1, timed in the same rounds of this run
    (median of the per-round ratios: a noisy neighbour hits both alike)."""
    singles = [r for r in rows if r["model"] == model and r["kind"] == "nano" and r["precision"] == "int8"
               and r["variant"] != "nano-auto-int8" and r["status"] == "ok" and r.get("b1_ms")]
    target = {"target": "auto_vs_fastest_nano_b1", "model": model, "variant": "nano-auto-int8", "value": None,
              "threshold": "<= 1.05", "met": False, "primary": primary,
              "note": "auto vs fastest nano backend, same run"}
    if not singles or not auto.get("b1_ms"):
        target["note"] += ": not measured"
        return target
    fastest = min(singles, key=lambda r: r["b1_ms"])
    ratio = _ratio_per_round(auto.get("b1_ms_rounds") or [], fastest.get("b1_ms_rounds") or [])
    ratio = ratio if ratio is not None else auto["b1_ms"] / fastest["b1_ms"]
    target.update(value=_r(ratio, 3), met=ratio <= 1.05,
                  note=f"auto vs fastest nano backend, same run: {auto['engine']} {auto['b1_ms']:.3f} ms vs "
                       f"{fastest['variant']} {fastest['b1_ms']:.3f} ms")
    return target


def _fmt(x: Any, spec: str = "{:.2f}") -> str:
    if x is None:
        return ""
    return spec.format(x) if isinstance(x, (int, float)) else str(x)


TABLE_COLUMNS = ("model", "variant", "engine", "prec", "b1 ms", "b1 __call__ ms", "b32 img/s", "accuracy",
                 "acc kind", "size MB", "b1/TF-FP32", "b1/fastest-raw", "b1/own-raw", "÷ same engine FP32",
                 "status")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    kinds = {"top1_heldout": "held-out top-1", "top1_agreement_vs_tf_fp32": "top-1 agree w/ TF FP32"}
    for r in rows:
        cells = [r["model"], r["variant"], r["engine"], r["precision"], _fmt(r["b1_ms"]), _fmt(r["b1_call_ms"]),
                 _fmt(r["b32_ips"], "{:.1f}"), _fmt(r["accuracy"], "{:.4f}"), kinds.get(r["accuracy_kind"], ""),
                 _fmt(r["size_mb"], "{:.2f}"), _fmt(r["ratio_b1_vs_tf_fp32"], "{:.3f}"),
                 _fmt(r["ratio_b1_vs_fastest_raw"], "{:.3f}"), _fmt(r["ratio_b1_vs_own_raw"], "{:.3f}"),
                 _fmt(r.get("gain_b1_vs_engine_fp32"), "{:.2f}×"), r["status"]]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def rss_table(rows: list[dict]) -> str:
    """Peak RSS per variant, MB: of its build (quantization for nano rows) and of predicting the
    accuracy set at batch 32. One benchmark process builds every variant in turn, so "peak" is the
    process' high-water mark during that block (``benchmarks/_rss.py`` resets it at the block's
    start) and includes what earlier variants keep alive; "+" is the increment over the block's
    start: the variant's own cost. Fresh-process peaks: ``benchmarks/memory_bench.py``."""
    lines = ["## Peak RSS (MB)", "",
             "| model | variant | build peak | build + | inference peak | inference + |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {_fmt(r.get('build_peak_rss_mb'), '{:.0f}')} | "
                     f"{_fmt(r.get('build_rss_delta_mb'), '{:.0f}')} | {_fmt(r.get('infer_peak_rss_mb'), '{:.0f}')} | "
                     f"{_fmt(r.get('infer_rss_delta_mb'), '{:.0f}')} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    env, rows = result["env"], result["rows"]
    out = [
        "# nano-tfx benchmark",
        "",
        f"schema {result['schema']} · {result['created']} · mode {result['mode']} · models "
        f"{','.join(result['models'])} · {result['elapsed_s']:.0f}s",
        f"CPU: {env['cpu_model']} ({env['nproc']} cpus), avx512_vnni={env['cpu_flags']['avx512_vnni']}, "
        f"amx_int8={env['cpu_flags']['amx_int8']}, avx512_bf16={env['cpu_flags']['avx512_bf16']}, "
        f"avx2={env['cpu_flags']['avx2']}"
        + (f" · ONEDNN_MAX_CPU_ISA={env['onednn_max_cpu_isa']} (OpenVINO/TensorFlow capped to it)"
           if env.get("onednn_max_cpu_isa") else "")
        + f" · load avg start {env['loadavg_start']} end {env['loadavg_end']}",
        f"versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items())}",
        "",
        "b1 = median (over rounds) of the median latency of one batch-1 call; b32 img/s = 32 / median batch-32 "
        "latency. Wrapper rows are timed via `QuantizedModel.run([x])`; `__call__` in its own column. "
        "TF FP32 = Keras model in `tf.function` (fixed input_signature). Ratios are latency ratios "
        "(lower = faster); per-round for b1/own-raw. \"÷ same engine FP32\" = the engine's raw FP32 row's "
        "b1 ÷ this row's (higher = faster; what INT8/BF16 adds over the engine itself), per-round.",
        "",
        markdown_table(rows),
        "",
        rss_table(rows),
        "",
        "fastest raw engine (b1): " + ", ".join(f"{m}: {v}" for m, v in result["fastest_raw"].items()),
        "",
        "## Wrapper overhead (batch 1, ms)",
        "",
        "| model | variant | run | __call__ | same engine direct | run/direct | own raw | run/own raw |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["model"], r["variant"]): r for r in rows}
    for r in rows:
        if r["kind"] != "nano" or r["status"] != "ok":
            continue
        own = by.get((r["model"], r["own_raw"])) if r["own_raw"] else None
        out.append(f"| {r['model']} | {r['variant']} | {_fmt(r['b1_ms'])} | {_fmt(r['b1_call_ms'])} | "
                   f"{_fmt(r['b1_direct_ms'])} | {_fmt(r['ratio_run_vs_direct'], '{:.3f}')} | "
                   f"{(r['own_raw'] + ' ' + _fmt(own['b1_ms'])) if own else ''} | "
                   f"{_fmt(r['ratio_b1_vs_own_raw'], '{:.3f}')} |")
    out += ["", "## report.speedup vs the returned model's own call path (batch 1)", "",
            "report.speedup: nano's side-by-side timing (FP32 SavedModel signature vs the returned model's "
            "run); call: this bench's TF FP32 row ÷ the returned model's `q(x)`, per round (a different "
            "FP32 reference function, same process).", "",
            "report ms ÷ q(x) ms: the returned model's time in the report (its FP32 ms ÷ report.speedup) "
            "÷ the same model's `q(x)` median here (what the report says of the model itself).", "",
            "| model | variant | report.speedup | TF FP32 ÷ q(x) | call ÷ report | report ms ÷ q(x) ms |",
            "|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "nano" and r["status"] == "ok" and r.get("report_speedup") and r.get("call_speedup_vs_tf_fp32"):
            out.append(f"| {r['model']} | {r['variant']} | {_fmt(r['report_speedup'])} | "
                       f"{_fmt(r['call_speedup_vs_tf_fp32'])} | "
                       f"{_fmt(r['call_speedup_vs_tf_fp32'] / r['report_speedup'], '{:.3f}')} | "
                       f"{_fmt(r.get('report_ms_vs_call'), '{:.3f}')} |")
    out += ["", "## Targets", "", "| target | model | variant | value | threshold | met | note |",
            "|---|---|---|---|---|---|---|"]
    for t in result["targets"]:
        out.append(f"| {t['target']}{' (primary)' if t['primary'] else ''} | {t['model']} | {t['variant']} | "
                   f"{_fmt(t['value'], '{:.3f}')} | {t['threshold']} | {'yes' if t['met'] else 'NO'} | "
                   f"{t.get('note', '')} |")
    if result["skipped"]:
        out += ["", "## Not run", ""] + [f"- {s['model']} {s['variant']}: {s['reason']}" for s in result["skipped"]]
    notes = [r for r in rows if r["notes"]]
    if notes:
        out += ["", "## Notes", ""] + [f"- {r['model']} {r['variant']}: {r['notes']}" for r in notes]
    out += ["", "## Models", ""] + [f"- {m}: {n}" for m, n in result["model_notes"].items()]
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(6 * max(len(models), 1), 4.5), squeeze=False)
    colors = {"tf": "black", "nano": "tab:blue", "raw": "tab:orange"}
    for ax, model in zip(axes[0], models):
        pts = [r for r in rows if r["model"] == model and r["b1_ms"] and r["accuracy"] is not None]
        for r in pts:
            marker = "*" if r["variant"] == "nano-auto-int8" else ("s" if r["kind"] == "tf" else "o")
            ax.scatter(r["b1_ms"], r["accuracy"], color=colors.get(r["kind"], "gray"), marker=marker,
                       s=110 if marker == "*" else 40)
            ax.annotate(r["variant"], (r["b1_ms"], r["accuracy"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        kind = pts[0]["accuracy_kind"] if pts else ""
        ax.set_xscale("log")
        ax.set_xlabel("batch-1 latency, median (ms, log)")
        ax.set_ylabel("held-out top-1 accuracy" if kind == "top1_heldout" else "top-1 agreement with TF FP32")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict:
    import importlib

    flags: set[str] = set()
    model_name = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    versions = {}
    for mod in ("tensorflow", "keras", "onnxruntime", "openvino", "nncf", "neural_compressor", "tf2onnx", "onnx"):
        try:
            m = importlib.import_module(mod)
            versions[mod] = getattr(m, "__version__", None) or getattr(m, "get_version", lambda: "?")()
        except Exception as err:  # pragma: no cover
            versions[mod] = f"unavailable ({type(err).__name__})"
    try:
        from nano_tfx.backends.openvino import cpu_capabilities

        ov_caps = sorted(cpu_capabilities())
    except Exception:
        ov_caps = None
    return {
        "python": platform.python_version(),
        "cpu_model": model_name,
        "nproc": os.cpu_count(),
        "cpu_flags": {k: k in flags for k in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                              "amx_int8", "amx_bf16")},
        "openvino_cpu_capabilities": ov_caps,
        "onednn_max_cpu_isa": isa_cap(),  # set: OpenVINO/TensorFlow capped to that ISA (emulation)
        "versions": versions,
        "loadavg_start": None,
        "loadavg_end": None,
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help="comma-separated subset of " + ",".join(ALL_MODELS) + " (default: the CNNs)")
    ap.add_argument("--quick", action="store_true", help="fewer timing rounds/repeats (smoke runs)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated variant names to build (default: all; tf-fp32 is always built), "
                         "e.g. raw-openvino-fp32,raw-openvino-bf16,raw-onnxruntime-fp32,nano-auto-int8 for a "
                         "big encoder on 2 cores")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"), help="output directory")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in ALL_MODELS]
    if unknown or not models:
        ap.error(f"--models: unknown {unknown}; expected a subset of {','.join(ALL_MODELS)}")
    plan = PLANS["quick" if args.quick else "full"]
    only = {v.strip() for v in args.variants.split(",") if v.strip()} if args.variants else None
    os.makedirs(args.out, exist_ok=True)

    env = environment()
    env["loadavg_start"] = _loadavg()
    rows: list[dict] = []
    fastest: dict = {}
    skipped: list = []
    model_notes: dict = {}
    for m in models:
        t = time.perf_counter()
        try:
            mrows, fast, notes = bench_model(m, plan, skipped, only)
        except Exception as err:  # the model itself could not be built/exported
            traceback.print_exc(file=sys.stderr)
            mrows, fast, notes = [{"model": m, "variant": "tf-fp32", "kind": "tf", "engine": "tensorflow",
                                   "precision": "fp32", "status": _failed(err)}], None, ""
        rows += mrows
        fastest[m] = fast
        model_notes[m] = notes
        log(f"{m}: done in {time.perf_counter() - t:.0f}s")
    env["loadavg_end"] = _loadavg()
    result = {
        "schema": SCHEMA,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "mode": "quick" if args.quick else "full",
        "plan": plan,
        "models": models,
        "env": env,
        "method": {
            "tf_fp32": "Keras model called in tf.function(model(x, training=False)) with a fixed input_signature",
            "wrapper_timing": "QuantizedModel.run([x]) (raw numpy in/out); __call__ in b1_call_ms; the same "
                              "engine object via its own API in b1_direct_ms",
            "calibration": f"{CALIB_N} images (random uniform[-1,1] for ImageNet models, load_digits train split)",
            "latency": "nano_tfx.timing.latency_ms per block; median over interleaved rounds",
        },
        "rows": [dict(_complete(r)) for r in rows],
        "fastest_raw": fastest,
        "skipped": skipped,
        "model_notes": model_notes,
        "elapsed_s": round(time.perf_counter() - _T0, 1),
    }
    result["targets"] = targets(result["rows"], models, env["cpu_flags"])
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    md = markdown(result)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(md)
    try:
        plot(result["rows"], os.path.join(args.out, "latency_vs_accuracy.png"))
    except Exception:
        traceback.print_exc(file=sys.stderr)
    print("CPU flags: " + ", ".join(f"{k}={v}" for k, v in env["cpu_flags"].items())
          + (f"; ONEDNN_MAX_CPU_ISA={env['onednn_max_cpu_isa']} (OpenVINO/TensorFlow capped)"
             if env.get("onednn_max_cpu_isa") else ""))
    print(markdown_table(result["rows"]))
    print()
    print(rss_table(result["rows"]))
    print()
    for t in result["targets"]:
        print(f"target {t['target']} {t['model']} {t['variant']}: {t['value']} ({t['threshold']}) "
              f"{'met' if t['met'] else 'NOT met'}")
    log(f"wrote {args.out}/bench.json, bench.md, latency_vs_accuracy.png")
    return 0


ROW_KEYS = ("model", "variant", "kind", "engine", "precision", "api", "status", "b1_ms", "b1_call_ms",
            "b1_direct_ms", "b32_ms", "b32_ips", "accuracy", "accuracy_kind", "agreement_vs_tf",
            "out_rel_l2_vs_tf", "size_mb", "ratio_b1_vs_tf_fp32", "ratio_b1_vs_fastest_raw", "own_raw",
            "ratio_b1_vs_own_raw", "ratio_run_vs_direct", "gain_b1_vs_engine_fp32", "build_s", "b1_ms_rounds",
            "b32_ms_rounds", "b1_call_ms_rounds", "b1_direct_ms_rounds", "notes", "details",
            # peak RSS (MB) of the variant's build and of its accuracy pass (see rss_table)
            "build_peak_rss_mb", "build_rss_delta_mb", "infer_peak_rss_mb", "infer_rss_delta_mb",
            # report.speedup of the nano variants, and TF FP32 ms ÷ the returned model's own q(x) ms
            "report_speedup", "call_speedup_vs_tf_fp32", "report_ms_vs_call")


def _complete(row: dict):
    """Every row carries every key (None when not applicable): the format later runs check."""
    for k in ROW_KEYS:
        yield k, row.get(k, [] if k.endswith("_rounds") else ({} if k == "details" else
                                                                 ("" if k in ("api", "notes") else None)))


if __name__ == "__main__":
    raise SystemExit(main())
