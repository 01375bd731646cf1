"""``nano-tfx``: the command line.

    nano-tfx demo                      # the digits pipeline, locally, end to end
    nano-tfx demo --pipeline reviews   # the text pipeline (IMDB reviews -> transformer -> INT8)
    nano-tfx quantize SAVED_MODEL --calib data.npz --output q [--accelerator openvino] ...
    nano-tfx report PATH               # a report's table (report.json, a model or a run dir)
    nano-tfx serve MODEL_DIR --name NAME --port PORT [--host HOST]   # V2 inference protocol

Errors end the command with a non-zero exit code and one line on stderr:
``nano-tfx <command>: error: <reason>``. TensorFlow / TFX / INC logs go to a log file
(``--verbose`` shows them instead); progress lines go to stdout.

It lives in ``pipelines`` (the top of the import flow pipelines → components → nano_tfx) because
``demo`` runs a pipeline; ``quantize`` and ``report`` only use the ``nano_tfx`` engine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from typing import Any, Iterator, Optional, Sequence

EXIT_ERROR = 2  # bad arguments, paths or data
EXIT_NOT_MET = 3  # quantization ran but no model met the accuracy criterion / was not blessed

TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfr", ".tfrecord.gz", ".tfrecords.gz", ".gz")


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


def _one_line(text: Any) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _error_line(err: BaseException) -> str:
    if isinstance(err, (CliError, ValueError, FileNotFoundError)):
        return _one_line(err)
    return f"{type(err).__name__}: {_one_line(err)}"


def _as_cli_error(err: BaseException, log_path: Optional[str]) -> CliError:
    """An engine/library failure as a one-line CliError (bad input: exit 2; else 1)."""
    if isinstance(err, CliError):
        return err
    code = EXIT_ERROR if isinstance(err, (ValueError, FileNotFoundError)) else 1
    return CliError(_error_line(err) + (f" (log: {log_path})" if log_path else ""), code)


# -- progress + quiet logs --------------------------------------------------------------------
class Console:
    """Progress lines on the real stdout, even while fds 1/2 are redirected to a log file.

    ``step(label)`` starts a step; on a terminal an elapsed-time ticker rewrites the line until
    ``done``; elsewhere (CI, pipes) one line is printed per start and per end.
    """

    def __init__(self, fd: Optional[int] = None):
        self.fd = fd if fd is not None else sys.stdout.fileno()
        self.tty = os.isatty(self.fd)
        self._lock = threading.Lock()
        self._ticker: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._label = ""
        self._started = 0.0

    def write(self, text: str) -> None:
        with self._lock:
            os.write(self.fd, text.encode())

    def line(self, text: str = "") -> None:
        self.write(("\r\033[K" if self.tty else "") + text + "\n")

    def step(self, label: str) -> None:
        self._end_ticker()
        self._label, self._started = label, time.time()
        if not self.tty:
            self.line(f"{label} ...")
            return
        self._stop.clear()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            self.write(f"\r\033[K{self._label} ... {time.time() - self._started:4.0f}s")
        return None

    def _end_ticker(self) -> None:
        if self._ticker is not None:
            self._stop.set()
            self._ticker.join()
            self._ticker = None

    def done(self, status: str = "done", seconds: Optional[float] = None) -> None:
        self._end_ticker()
        secs = time.time() - self._started if seconds is None else seconds
        self.line(f"{self._label} ... {status} ({secs:.1f}s)")


@contextlib.contextmanager
def quiet_output(log_path: Optional[str]) -> Iterator[Console]:
    """Send fds 1/2 (Python, TensorFlow's C++ logs, Beam worker processes) to ``log_path``;
    yield a ``Console`` on the original stdout. ``log_path=None``: no redirection."""
    if log_path is None:
        yield Console()
        return
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    console = Console(saved_out)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        yield console
    finally:
        console._end_ticker()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)


def _quiet_libraries() -> None:
    """Before TensorFlow is imported: only its errors; absl/Python warnings off the console."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import warnings

    warnings.filterwarnings("ignore")


# -- nano-tfx quantize ------------------------------------------------------------------------
def _is_tfrecord(path: str) -> bool:
    if os.path.isdir(path):
        return True
    return path.lower().endswith(TFRECORD_SUFFIXES)


def check_data_path(path: str, option: str) -> str:
    """Existence and format of a --calib / --eval path (before any heavy import)."""
    if not os.path.exists(path):
        raise CliError(f"{option}: {path!r} does not exist")
    if os.path.isdir(path):
        files = _tfrecord_files(path)
        if not files:
            raise CliError(f"{option}: directory {path!r} holds no TFRecord files")
        return path
    if os.path.getsize(path) == 0:
        raise CliError(f"{option}: {path!r} is empty")
    if path.lower().endswith(".npz"):
        import zipfile

        if not zipfile.is_zipfile(path):
            raise CliError(f"{option}: {path!r} is not an NPZ archive (numpy.savez / savez_compressed)")
    elif not _is_tfrecord(path):
        raise CliError(
            f"{option}: {path!r}: expected an .npz file or a TFRecord of tf.Examples "
            f"(.tfrecord, .tfrecords, .tfr, .gz, or a directory of them)"
        )
    return path


def _tfrecord_files(path: str) -> list:
    if not os.path.isdir(path):
        return [path]
    return sorted(
        os.path.join(path, f) for f in os.listdir(path)
        if not f.startswith((".", "_")) and os.path.isfile(os.path.join(path, f))
    )


def load_npz(path: str, inputs: Sequence[Any], label: Optional[str], option: str):
    """``(x, y)``: ``x`` an array (one input) or a dict keyed by input name; ``y`` or None.

    Keys: the model's input names, or ``x`` for a single-input model (or the only non-label
    array); the label under ``--label`` (default ``y`` or ``label`` when present).
    """
    import zipfile

    import numpy as np

    if not zipfile.is_zipfile(path):
        raise CliError(f"{option}: {path!r} is not an NPZ archive (numpy.savez / savez_compressed)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as err:  # noqa: BLE001 - any unreadable file is a one-line data error
        raise CliError(f"{option}: cannot read {path!r} as NPZ ({_error_line(err)})") from err
    if not arrays:
        raise CliError(f"{option}: {path!r} holds no arrays")
    not_arrays = sorted(k for k, v in arrays.items() if not isinstance(v, np.ndarray))
    if not_arrays:
        raise CliError(f"{option}: {path!r} is a zip but not a numpy archive: members {not_arrays} are not .npy arrays")
    label_key = label if label else next((k for k in ("y", "label", "labels") if k in arrays), None)
    if label and label not in arrays:
        raise CliError(f"--label: {label!r} is not an array of {path!r}; it has {sorted(arrays)}")
    y = arrays.pop(label_key) if label_key else None
    names = [t.name for t in inputs]
    if all(n in arrays for n in names):
        x = {n: arrays[n] for n in names}
    elif len(names) == 1 and ("x" in arrays or len(arrays) == 1):
        x = {names[0]: arrays["x"] if "x" in arrays else next(iter(arrays.values()))}
    else:
        raise CliError(
            f"{option}: {path!r} has arrays {sorted(arrays)}; the model's inputs are {names} "
            "(name the arrays after the inputs, or 'x' for a single-input model)"
        )
    for info in inputs:
        arr = x[info.name]
        want = tuple(info.shape)
        if arr.ndim != len(want) or any(w is not None and w != g for w, g in zip(want[1:], arr.shape[1:])):
            raise CliError(
                f"{option}: array for input {info.name!r} has shape {tuple(arr.shape)}; the model "
                f"expects {want} (batch first)"
            )
    counts = {k: len(v) for k, v in x.items()}
    if y is not None:
        counts[label_key] = len(y)
    if len(set(counts.values())) != 1:
        raise CliError(f"{option}: {path!r}: arrays have different numbers of rows {counts}")
    return x, y


def _example_feature_kinds(record: bytes) -> dict:
    import tensorflow as tf

    ex = tf.train.Example.FromString(record)
    out = {}
    for key, feat in ex.features.feature.items():
        kind = feat.WhichOneof("kind")
        out[key] = (kind, len(getattr(feat, kind).value) if kind else 0)
    return out


class TFRecordExamples:
    """A stream of ``(inputs dict, labels)`` batches from TFRecords of ``tf.Example``.

    Each model input is a feature of the same name holding ``prod(shape[1:])`` values
    (reshaped to the input's shape); the label is the ``label`` feature (scalar per example).
    """

    batched = True

    def __init__(self, path: str, inputs: Sequence[Any], label: Optional[str], batch: int, option: str):
        import tensorflow as tf

        self.files = _tfrecord_files(path)
        self.compression = "GZIP" if all(f.lower().endswith(".gz") for f in self.files) else ""
        self.inputs, self.batch, self.option = list(inputs), batch, option
        try:
            first = next(iter(tf.data.TFRecordDataset(self.files[:1], self.compression).take(1)), None)
        except Exception as err:  # noqa: BLE001
            raise CliError(f"{option}: cannot read {path!r} as TFRecord ({_error_line(err)})") from err
        if first is None:
            raise CliError(f"{option}: {path!r} holds no records")
        try:
            kinds = _example_feature_kinds(first.numpy())
        except Exception as err:  # noqa: BLE001
            raise CliError(f"{option}: {path!r}: records are not tf.Example protos ({_error_line(err)})") from err
        spec = {}
        for t in self.inputs:
            if t.name not in kinds:
                raise CliError(
                    f"{option}: {path!r}: tf.Examples have features {sorted(kinds)}, the model's inputs "
                    f"are {[i.name for i in self.inputs]}"
                )
            size = 1
            for d in t.shape[1:]:
                size *= int(d or 1)
            dtype = {"bytes_list": tf.string, "int64_list": tf.int64}.get(kinds[t.name][0], tf.float32)
            if kinds[t.name][1] != size:
                raise CliError(
                    f"{option}: feature {t.name!r} has {kinds[t.name][1]} values per example; input "
                    f"{t.name!r} of shape {tuple(t.shape)} needs {size}"
                )
            spec[t.name] = tf.io.FixedLenFeature([size], dtype)
        self.label = label if label else ("label" if "label" in kinds else None)
        if label and label not in kinds:
            raise CliError(f"--label: {label!r} is not a feature of the tf.Examples; they have {sorted(kinds)}")
        if self.label:
            kind = kinds[self.label][0]
            spec[self.label] = tf.io.FixedLenFeature(
                [kinds[self.label][1]], {"int64_list": tf.int64, "bytes_list": tf.string}.get(kind, tf.float32))
        self.spec = spec

    def batches(self):
        import numpy as np
        import tensorflow as tf

        ds = tf.data.TFRecordDataset(self.files, self.compression).batch(self.batch)
        ds = ds.map(lambda s: tf.io.parse_example(s, self.spec))
        for parsed in ds.as_numpy_iterator():
            x = {}
            for t in self.inputs:
                shape = [-1] + [int(d or 1) for d in t.shape[1:]]
                x[t.name] = np.reshape(parsed[t.name], shape)
            y = None
            if self.label:
                y = parsed[self.label]
                y = y.reshape(-1) if y.shape[-1] == 1 else y
            yield x, y


def _make_source(path: str, inputs: Sequence[Any], label: Optional[str], batch: int, option: str):
    import nano_tfx

    if path.lower().endswith(".npz"):
        x, y = load_npz(path, inputs, label, option)
        return (x, y) if y is not None else x
    reader = TFRecordExamples(path, inputs, label, batch, option)

    class _Source(nano_tfx.BatchSource):
        batched = True

        def batches(self):
            return reader.batches()

    return _Source()


def _criterion(args) -> Optional[dict]:
    if args.relative is not None and args.absolute is not None:
        raise CliError("--relative / --absolute: give one of them")
    if args.metric is None:
        if args.relative is not None or args.absolute is not None:
            raise CliError("--relative / --absolute: need --metric to measure accuracy with")
        return None
    crit: dict = {"higher_is_better": not args.lower_is_better}
    if args.absolute is not None:
        crit["absolute"] = args.absolute
    else:
        crit["relative"] = 0.01 if args.relative is None else args.relative
    return crit


def _progress(console: Console, max_trials: Optional[int]):
    """The engine's one progress hook, writing its trial lines to the console."""
    from nano_tfx.progress import ProgressLine

    return ProgressLine(lambda text: console.line(text), prefix="  ", max_trials=max_trials)


def _quantize_steps(args, console: Console, model: str, output: str, calib: str, evald: Optional[str],
                    criterion: Optional[dict], accelerator: Optional[str]):
    """Read the model and data, quantize with per-trial progress, save. -> (model, met)."""
    import nano_tfx
    from nano_tfx.criterion import describe_criterion
    from nano_tfx.interchange import describe_saved_model

    console.step(f"Reading SavedModel {args.saved_model} [{args.signature}]")
    try:
        source = describe_saved_model(model, args.signature)
    except (ValueError, OSError) as err:
        raise CliError(f"SAVED_MODEL: {_error_line(err)}") from err
    console.done(f"inputs {[f'{t.name}{list(t.shape)}:{t.dtype}' for t in source.inputs]}")
    console.step(f"Reading calibration data {args.calib}")
    calib_data = _make_source(calib, source.inputs, args.label, args.batch or 32, "--calib")
    eval_data = _make_source(evald, source.inputs, args.label, args.batch or 32, "--eval") if evald else None
    console.done()
    what = (f"{args.precision} on {accelerator or 'inc'}"
            + (f", {args.metric} {describe_criterion(criterion)}" if criterion else ", no accuracy control"))
    console.line(f"Quantizing ({what})")
    kwargs = dict(
        precision=args.precision, accelerator=accelerator, calib_dataset=calib_data,
        metric=args.metric, accuracy_criterion=criterion, tuning_strategy=args.strategy,
        max_trials=args.max_trials, timeout=args.timeout, batch=args.batch,
        sample_size=args.sample_size, signature_name=args.signature,
        on_trial_end=_progress(console, args.max_trials), min_speedup=args.min_speedup,
    )
    if eval_data is not None:
        kwargs["eval_dataset"] = eval_data
    met = True
    try:
        quantized = nano_tfx.quantize(model, **kwargs)
    except nano_tfx.AccuracyCriterionNotMet as err:
        if not args.keep_best:
            raise
        quantized, met = err.best_model, False
    console.step(f"Saving to {args.output}")
    quantized.save(output)
    console.done()
    return quantized, met


def cmd_quantize(args) -> int:
    model = os.path.abspath(args.saved_model)
    if not os.path.exists(model):
        raise CliError(f"SAVED_MODEL: {args.saved_model!r} does not exist")
    if not os.path.isfile(os.path.join(model, "saved_model.pb")):
        raise CliError(f"SAVED_MODEL: {args.saved_model!r} is not a SavedModel directory (no saved_model.pb)")
    calib = check_data_path(args.calib, "--calib")
    evald = check_data_path(args.eval, "--eval") if args.eval else None
    if evald and not args.metric:
        raise CliError("--eval: evaluation data needs --metric")
    output = os.path.abspath(args.output)
    if os.path.exists(output) and not args.overwrite and (not os.path.isdir(output) or os.listdir(output)):
        raise CliError(f"--output: {args.output!r} exists (use --overwrite to replace it)")
    if os.path.commonpath([output, model]) in (output, model):
        raise CliError("--output: must not be the SAVED_MODEL directory or contain it")
    criterion = _criterion(args)
    accelerator = None if args.accelerator in ("inc", "none") else args.accelerator

    log_path = None if args.verbose else (args.log or output.rstrip(os.sep) + ".log")
    _quiet_libraries()
    import nano_tfx  # noqa: F401  (oneDNN first)

    try:
        with quiet_output(log_path) as console:
            quantized, met = _quantize_steps(args, console, model, output, calib, evald, criterion, accelerator)
    except nano_tfx.AccuracyCriterionNotMet as err:
        report_path = output.rstrip(os.sep) + ".report.json"
        with open(report_path, "w") as f:
            f.write(err.report.to_json())
        print(err.report.table())
        raise CliError(f"{_one_line(err)} (report: {report_path}; --keep-best saves the best model)",
                       EXIT_NOT_MET) from err
    except Exception as err:  # noqa: BLE001 - one line; the log has the rest
        raise _as_cli_error(err, log_path) from err
    report = quantized.report
    if report is not None:
        print(report.table())
    print(f"Quantized model: {output}" + ("" if met else "  (best found; the criterion was NOT met)"))
    if log_path:
        print(f"Log: {log_path}")
    return 0 if met else EXIT_NOT_MET


# -- nano-tfx report --------------------------------------------------------------------------
def find_report(path: str) -> str:
    """A report.json from: the file itself, a directory holding it (a saved model, a
    QuantizationReport artifact), or a local pipeline root (its latest Quantizer report)."""
    if not os.path.exists(path):
        raise CliError(f"PATH: {path!r} does not exist")
    if os.path.isfile(path):
        return path
    direct = os.path.join(path, "report.json")
    if os.path.isfile(direct):
        return direct
    md = os.path.join(path, "metadata.sqlite")
    if os.path.isfile(md):
        from pipelines import run_outputs

        reports = (run_outputs(md).get("Quantizer") or {}).get("outputs", {}).get("report") or []
        if reports and os.path.isfile(os.path.join(reports[0]["uri"], "report.json")):
            return os.path.join(reports[0]["uri"], "report.json")
    found = []
    for dirpath, _, files in os.walk(path):
        if "report.json" in files:
            full = os.path.join(dirpath, "report.json")
            found.append((os.path.getmtime(full), full))
    if not found:
        raise CliError(f"PATH: no report.json in {path!r}")
    return max(found)[1]


def cmd_report(args) -> int:
    from nano_tfx.report import Report

    path = find_report(args.path)
    try:
        with open(path) as f:
            data = json.load(f)
        report = Report.from_dict(data)
    except Exception as err:  # noqa: BLE001
        raise CliError(f"PATH: {path!r} is not a nano-tfx report ({_error_line(err)})") from err
    if args.format == "json":
        print(json.dumps(data, indent=2))
        return 0
    print(f"Report: {path}")
    if getattr(args, "layers", False):
        coverage = report.int8_coverage_text()  # the table's summary line carries it otherwise
        if coverage:
            print(coverage)
        if not report.layers:
            print("No per-layer diagnosis in this report (full INT8 met the criterion, or no metric).")
        else:
            print(report.layer_table())
        for k in report.kept_fp32:
            print(f"kept in FP32: {k['name']} ({k['backend']}): {k['reason']}")
        return 0
    print(report.table())
    tfx_info = data.get("tfx") if isinstance(data, dict) else None
    if tfx_info:
        print(f"TFX: blessed={tfx_info.get('blessed')} - {tfx_info.get('blessing_message')}")
        html_path = os.path.join(os.path.dirname(path), "report.html")
        if os.path.isfile(html_path):
            print(f"HTML: {html_path}")
    return 0


# -- nano-tfx demo ----------------------------------------------------------------------------
#: ``--pipeline`` choices: (package under ``pipelines``, what the first line says it runs)
DEMO_PIPELINES = {
    "digits": ("digits", "digits CNN"),
    "reviews": ("reviews", "IMDB reviews transformer (text)"),
}


def cmd_demo(args) -> int:
    import importlib

    package, what = DEMO_PIPELINES[args.pipeline]
    entry = importlib.import_module(f"pipelines.{package}").ENTRY  # light: names and defaults only
    root = os.path.abspath(args.root or entry.default_root)
    os.makedirs(root, exist_ok=True)
    log_path = None if args.verbose else os.path.join(root, "demo.log")
    _quiet_libraries()
    import nano_tfx  # noqa: F401  (oneDNN first)

    print(f"nano-tfx demo: {what} -> INT8 with TFX, locally (root: {root})")
    if log_path:
        print(f"Logs: {log_path}")
    train_steps = args.train_steps if args.train_steps is not None else entry.defaults["train_steps"]
    kwargs: dict = dict(train_steps=train_steps, accelerator=None if args.accelerator in (None, "inc") else args.accelerator)
    if args.max_trials:
        kwargs["max_trials"] = args.max_trials
    if args.min_speedup is not None:
        kwargs["min_speedup"] = args.min_speedup
    with quiet_output(log_path) as console:
        console.step(f"Loading TFX and the {args.pipeline} pipeline")
        from absl import logging as absl_logging

        from pipelines.runners import beam_args

        importlib.import_module(entry.pipeline_module)  # TFX, TFMA, the Quantizer: timed in this step

        absl_logging.set_verbosity(absl_logging.INFO)
        console.done()

        def progress(event: str, node: str, index: int, total: int, seconds: float) -> None:
            if event == "start":
                console.step(f"[{index:2d}/{total}] {node}")
            else:
                console.done("done", seconds)

        try:
            summary = entry.run(root, beam_pipeline_args=beam_args(args.num_workers, args.beam_mode),
                                progress=progress, **kwargs)
        except Exception as err:  # noqa: BLE001 - one line; demo.log has the traceback
            console.done("FAILED")
            raise _as_cli_error(err, log_path) from err
    print()
    if summary.get("fp32_metric") is not None:
        int8 = summary.get("int8_metric")
        print(f"Accuracy: FP32 {summary['fp32_metric']:.4f} -> INT8 "
              + (f"{int8:.4f}" if int8 is not None else "n/a"))
    print(f"Quantizer: {'blessed' if summary['blessed'] else 'NOT blessed'} - {summary.get('message')}")
    if summary.get("report_html"):
        print(f"Report (HTML): {summary['report_html']}")
    if summary["pushed"]:
        print(f"Pushed model: {summary['pushed_model']}")
        return 0
    print("Pushed model: none (the Pusher only pushes a blessed quantized model)")
    return EXIT_NOT_MET


# -- nano-tfx serve ---------------------------------------------------------------------------
def _name_eq_dir(text: str) -> tuple:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=MODEL_DIR, got {text!r}")
    return name, path


def cmd_serve(args) -> int:
    """Serve MODEL_DIR (and any --model NAME=DIR) on the V2 Open Inference Protocol until
    SIGTERM/SIGINT; exit 0 after a clean shutdown."""
    import logging

    models = [(args.name, args.model_dir)] + list(args.model or [])
    for name, path in models:
        if not os.path.isdir(path):
            raise CliError(f"MODEL_DIR: {path!r} is not a directory (model {name!r})")
    import nano_tfx  # noqa: F401  (oneDNN first)
    from components.serving.server import ServeOptions, serve

    handler = logging.StreamHandler()  # nano_tfx's lines next to MLServer's (which has its own handler)
    handler.setFormatter(logging.Formatter("%(asctime)s [nano_tfx] %(levelname)s - %(message)s"))
    lib_logger = logging.getLogger("nano_tfx")
    lib_logger.addHandler(handler)
    lib_logger.setLevel(logging.INFO)
    lib_logger.propagate = False  # TFX/absl configure the root logger too: one line each
    try:
        options = ServeOptions(
            host=args.host, port=args.port, max_batch_size=args.max_batch_size,
            max_request_bytes=args.max_request_size, adaptive_batch_size=args.adaptive_batch_size,
            adaptive_batch_time=args.adaptive_batch_time, thread_num=args.threads, tf_threads=args.tf_threads,
            direct_infer=args.direct_infer, extra_models={n: os.path.abspath(p) for n, p in args.model or []})
        serve(os.path.abspath(args.model_dir), args.name, options)
    except ValueError as err:
        raise CliError(_one_line(err)) from err
    return 0


def _add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve a model folder on the V2 Open Inference Protocol (REST, MLServer)")
    s.add_argument("model_dir", metavar="MODEL_DIR",
                   help="a Quantizer Format-Serving/ dir, a QuantizedModel.save dir or a Trainer SavedModel")
    s.add_argument("--name", required=True, help="model name: POST /v2/models/NAME/infer")
    s.add_argument("--port", type=int, default=8080, help="HTTP port (default: %(default)s)")
    s.add_argument("--host", default="127.0.0.1", help="listen address (default: %(default)s; 0.0.0.0 in a container)")
    s.add_argument("--max-batch-size", type=int, default=1024,
                   help="most rows (examples) in one request; more is answered 413 (default: %(default)s)")
    s.add_argument("--max-request-size", type=int, default=32 * 1024 * 1024,
                   help="largest request body in bytes; more is answered 413 (default: %(default)s)")
    s.add_argument("--adaptive-batch-size", type=int, default=0,
                   help="MLServer adaptive batching: merge up to N concurrent requests into one engine call "
                        "(default: off; a malformed request fails the requests merged with it)")
    s.add_argument("--adaptive-batch-time", type=float, default=0.0,
                   help="adaptive batching: wait at most this many seconds for a batch to fill")
    s.add_argument("--threads", type=int, default=None,
                   help="engine threads (ONNX Runtime / OpenVINO / INC); default: the engine's own, the settings "
                        "accelerator='auto' timed the engines with")
    s.add_argument("--tf-threads", type=int, default=None,
                   help="TensorFlow intra-/inter-op threads for request parsing + tf.Transform (default 1: the "
                        "engine keeps the cores; raise it for big FP32 batches served by TensorFlow)")
    s.add_argument("--no-direct-infer", dest="direct_infer", action="store_false",
                   help="answer every infer request through MLServer's own route (its metrics and inference "
                        "middlewares; ~0.3 ms more per request) instead of the direct one for plain V2 requests")
    s.add_argument("--model", action="append", type=_name_eq_dir, metavar="NAME=MODEL_DIR",
                   help="serve another model from the same server (repeatable)")
    s.set_defaults(func=cmd_serve)


# -- entry point ------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (``nano-tfx quantize: error: ...``), exit code 2."""

    def error(self, message: str):  # noqa: D401
        self.exit(EXIT_ERROR, f"{self.prog}: error: {_one_line(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nano-tfx", description="Accuracy-controlled INT8 post-training quantization for TF/Keras.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    demo = sub.add_parser("demo", help="run a bundled pipeline locally (Trainer -> Evaluator -> Quantizer -> Pusher)")
    demo.add_argument("--pipeline", default="digits", choices=sorted(DEMO_PIPELINES),
                      help="digits: a CNN on 8x8 digit images (default); reviews: a transformer on TFX's "
                           "IMDB review text (tokenized by tf.Transform)")
    demo.add_argument("--root", default=None, help="output directory (default: runs/<pipeline>_int8)")
    demo.add_argument("--train-steps", type=int, default=None,
                      help="Trainer steps (default: the pipeline's, 300 for digits, 60 for reviews)")
    # ONNX Runtime by default: on the digits CNN and the reviews encoder it beats TF FP32 on any
    # x86 CPU, so the Quantizer's speed gate (min_speedup=1.0) blesses it; INC INT8 on stock
    # TensorFlow runs the CNN at ~1x FP32 on CPUs without VNNI, where the gate's verdict would be
    # a coin toss.
    demo.add_argument("--accelerator", default="onnxruntime", choices=["inc", "onnxruntime", "openvino", "auto"],
                      help="the Quantizer's backend (default: %(default)s; the pushed layout is then ONNX + "
                           "transform_graph, served on raw tf.Examples by `nano-tfx serve`)")
    demo.add_argument("--max-trials", type=int, default=None)
    demo.add_argument("--min-speedup", type=float, default=None,
                      help="the Quantizer's speed gate (default 1.0: never bless a model slower than FP32; 0: off)")
    demo.add_argument("--num-workers", type=int, default=0, help="Beam DirectRunner workers (0: one per CPU)")
    demo.add_argument("--beam-mode", default="in_memory", choices=["in_memory", "multi_threading", "multi_processing"],
                      help="Beam DirectRunner mode (default: %(default)s, the quickest on a small machine; "
                           "multi_processing, local_runner's default, runs Beam work and Quantizer trials "
                           "in worker processes)")
    demo.add_argument("--verbose", action="store_true", help="show TFX/TensorFlow logs instead of writing demo.log")
    demo.set_defaults(func=cmd_demo)

    q = sub.add_parser("quantize", help="quantize a SavedModel with calibration data (.npz or TFRecord)")
    q.add_argument("saved_model", metavar="SAVED_MODEL")
    q.add_argument("--calib", required=True, help=".npz (arrays named after the inputs, or x; labels y) or TFRecord of tf.Examples")
    q.add_argument("--output", "-o", required=True, help="directory for the quantized model (nano_tfx.load)")
    q.add_argument("--accelerator", default="inc", choices=["inc", "onnxruntime", "openvino", "auto"],
                   help="inc = Intel Neural Compressor on the TF graph (default)")
    q.add_argument("--precision", default="int8", choices=["int8", "bf16", "fp16", "auto"])
    q.add_argument("--metric", default=None, help="e.g. accuracy, sparse_categorical_accuracy, mse; enables accuracy control")
    q.add_argument("--eval", default=None, help="labelled evaluation data (default: the calibration data)")
    q.add_argument("--label", default=None, help="label array/feature name (default: y or label when present)")
    q.add_argument("--relative", type=float, default=None, help="allowed relative metric drop (default 0.01)")
    q.add_argument("--absolute", type=float, default=None, help="allowed absolute metric drop")
    q.add_argument("--lower-is-better", action="store_true")
    q.add_argument("--strategy", default=None, help="tuning strategy (basic, bayesian, random, exhaustive, mse)")
    q.add_argument("--max-trials", type=int, default=None)
    q.add_argument("--timeout", type=float, default=0)
    q.add_argument("--min-speedup", type=float, default=None,
                   help="refuse a model less than this many times faster than FP32 at batch 1 "
                        "(e.g. 1.0: never slower; default: no gate, the speed-up is reported)")
    q.add_argument("--sample-size", type=int, default=100, help="calibration samples (default: %(default)s)")
    q.add_argument("--batch", type=int, default=None)
    q.add_argument("--signature", default="serving_default")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--keep-best", action="store_true", help="save the best model even if the criterion is not met")
    q.add_argument("--log", default=None, help="log file (default: OUTPUT.log)")
    q.add_argument("--verbose", action="store_true", help="show library logs instead of writing the log file")
    q.set_defaults(func=cmd_quantize)

    r = sub.add_parser("report", help="print a quantization report's table")
    r.add_argument("path", metavar="PATH", help="report.json, a quantized model dir, a report artifact or a demo root")
    r.add_argument("--format", choices=["table", "json"], default="table")
    r.add_argument("--layers", action="store_true",
                   help="print the per-layer diagnosis (worst first) and the layers kept in FP32")
    r.set_defaults(func=cmd_report)

    _add_serve_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from nano_tfx import __version__

        print(f"nano-tfx {__version__}")
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_ERROR
    try:
        return int(args.func(args) or 0)
    except CliError as err:
        code, line = err.code, _error_line(err)
    except KeyboardInterrupt:
        code, line = 130, "interrupted"
    except Exception as err:  # noqa: BLE001 - one line, whatever failed
        code, line = 1, _error_line(err)
    sys.stdout.flush()
    sys.stderr.write(f"nano-tfx {args.command}: error: {line}\n")
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
