"""Quantizer executor: Evaluator gate → Beam calibration sample → Beam trials → serve-ready output.

1. Gate: if the Evaluator did not bless the FP32 model, nothing is quantized nor blessed.
2. Bars: the FP32 baseline is the Evaluator's metric (overall slice); its value thresholds are
   folded into the allowed drop, so the tuner searches for a model meeting *both* bars.
3. Data: ``sample_size`` calibration records are drawn from the Transform output in Beam
   (bounded memory); evaluation streams the evaluation split inside each trial.
4. Trials: ``nano_tfx.quantize(trial_runner=BeamTrialRunner)`` — each batch of proposed configs
   is one Beam pipeline with the component's ``beam_pipeline_args`` (Dask, Flink, Spark,
   Dataflow); on the local DirectRunner the trials run in-process (``tuning_runner``).
5. Output: the chosen model in its server's layout (``serving.py``), ``blessing`` (BLESSED only
   when every bar holds: accuracy, the Evaluator's bounds and ``min_speedup``, the quantized
   model timed side by side with the FP32 signature it replaces) and ``report`` (JSON of every trial + HTML). A ``previous_report`` of the
   same model fingerprint and request lets finished trials be reused.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional

from absl import logging
from tfx import types
from tfx.dsl.components.base import base_beam_executor
from tfx.dsl.io import fileio
from tfx.types import artifact_utils
from tfx.utils import io_utils, path_utils

import nano_tfx
from nano_tfx.api import fingerprint
from components.quantizer import serving
from components.quantizer.artifacts import REPORT_HTML, REPORT_JSON
from components.quantizer.beam_runner import BeamTrialRunner, with_runner_defaults, runner_name
from components.quantizer.data import (
    TransformedExamplesSource, feature_layout, sample_records, split_file_pattern,
)
from components.quantizer.eval_result import (
    EvaluatorInfo, guess_higher_is_better, keras_metric_from_config, read_evaluation,
)
from components.quantizer.signatures import (
    FROM_TRANSFORMED_FEATURES, derive_from_transformed_features, missing_signature_message,
)
from components.quantizer.validation import (
    DEFAULT_ACCURACY_CRITERION, DEFAULT_MIN_SPEEDUP, validate_accuracy_criterion,
)
from nano_tfx.speed import check_min_speedup
from nano_tfx.interchange import export_signature_as_default

BLESSED_FILE = "BLESSED"
NOT_BLESSED_FILE = "NOT_BLESSED"
DEFAULT_EVAL_BATCH = 32


def _single(input_dict: Dict[str, List[types.Artifact]], key: str) -> Optional[types.Artifact]:
    items = input_dict.get(key) or []
    return artifact_utils.get_single_instance(items) if items else None


def _signature_defs(model_path: str) -> Any:
    """The SavedModel's signature map, read from saved_model.pb (no graph loading)."""
    from tensorflow.python.tools import saved_model_utils

    return saved_model_utils.get_meta_graph_def(model_path, "serve").signature_def


def _signature_io(model_path: str, signature_name: str, defs: Any = None) -> tuple[list[str], list[str]]:
    """Input / output names of a signature (``defs``: the map when already read)."""
    defs = _signature_defs(model_path) if defs is None else defs
    if signature_name not in defs:
        raise ValueError(missing_signature_message(model_path, signature_name, list(defs)))
    sig = defs[signature_name]
    return sorted(sig.inputs), sorted(sig.outputs)


def _file_digest(paths: List[str]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with fileio.open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:20]


class Executor(base_beam_executor.BaseBeamExecutor):
    """Executor of the ``Quantizer`` component."""

    def Do(
        self,
        input_dict: Dict[str, List[types.Artifact]],
        output_dict: Dict[str, List[types.Artifact]],
        exec_properties: Dict[str, Any],
    ) -> None:
        self._log_startup(input_dict, output_dict, exec_properties)
        started = time.time()
        model = _single(input_dict, "model")
        examples = _single(input_dict, "examples")
        transform_graph = _single(input_dict, "transform_graph")
        evaluation = _single(input_dict, "evaluation")
        fp32_blessing = _single(input_dict, "model_blessing")
        previous = _single(input_dict, "previous_report")
        out_model = _single(output_dict, "quantized_model")
        blessing = _single(output_dict, "blessing")
        report_artifact = _single(output_dict, "report")

        signature_name = exec_properties.get("signature_name") or "from_transformed_features"
        accelerator = exec_properties.get("accelerator") or None
        precision = exec_properties.get("precision") or "int8"
        model_path = path_utils.serving_model_path(model.uri, path_utils.is_old_model_artifact(model))
        # A stock Trainer run_fn exports only serving_default: derive the default signature from
        # the model's own Keras call (quantized from a tmp copy; the FP32 model stays the original).
        quantize_from, derived_note = model_path, None
        defs = _signature_defs(model_path)
        if signature_name == FROM_TRANSFORMED_FEATURES and transform_graph is not None and signature_name not in defs:
            import tensorflow_transform as tft

            quantize_from = derive_from_transformed_features(
                model_path, tft.TFTransformOutput(transform_graph.uri),
                os.path.join(self._get_tmp_dir(), "derived_model"))
            derived_note = (f"the Trainer model has no {signature_name!r} signature: derived it from the "
                            f"model's own Keras call ({quantize_from}); the FP32 model is unchanged")
            logging.info("Quantizer: %s", derived_note)
        input_names, _ = _signature_io(quantize_from, signature_name, None if derived_note else defs)

        tfx_info: dict = {
            "fp32_model": model_path,
            "fp32_model_id": model.id,
            "signature_name": signature_name,
            "accelerator": accelerator,
            "precision": precision,
            "beam_runner": str(runner_name(self._beam_pipeline_args)),
            "notes": [derived_note] if derived_note else [],
        }
        if derived_note:
            tfx_info["derived_signature_model"] = quantize_from
        blessing.set_string_custom_property("fp32_model", model.uri)
        blessing.set_int_custom_property("fp32_model_id", model.id)
        out_model.set_int_custom_property("fp32_model_id", model.id)

        # 1. The Evaluator's gate ------------------------------------------------------------
        info: Optional[EvaluatorInfo] = read_evaluation(evaluation.uri) if evaluation else None
        if info is not None:
            tfx_info["evaluator"] = info.to_dict()
        gate = self._fp32_gate(fp32_blessing, info)
        if gate is not None:
            self._finish(out_model, blessing, report_artifact, None, tfx_info, False, gate, started)
            return

        # 2. Metric, baseline and bars -------------------------------------------------------
        metric_name = exec_properties.get("metric") or (info.first_metric if info else None)
        if not metric_name:
            raise ValueError(
                "metric: no metric given and no Evaluator evaluation to take its first metric from; "
                "set Quantizer(metric='sparse_categorical_accuracy', ...) or wire evaluation="
            )
        metric: Any = metric_name
        if info is not None and not exec_properties.get("metric"):
            metric = keras_metric_from_config(info.first_metric_config) or metric_name
        baseline = info.baseline(metric_name) if info else None
        lower, upper = info.value_bounds(metric_name) if info else (None, None)
        user_criterion = validate_accuracy_criterion(
            json.loads(exec_properties["accuracy_criterion"]) if exec_properties.get("accuracy_criterion") else None
        )
        if user_criterion is None:
            hib = (info.higher_is_better(metric_name) if info else None)
            user_criterion = dict(DEFAULT_ACCURACY_CRITERION, higher_is_better=(
                hib if hib is not None else guess_higher_is_better(metric_name)))
        criterion, bar_note = self._effective_criterion(user_criterion, baseline, lower, upper)
        tfx_info.update(
            metric=metric_name, baseline=baseline, baseline_source="evaluator" if baseline is not None else "fp32 run",
            value_bounds={"lower_bound": lower, "upper_bound": upper},
            user_criterion=user_criterion, effective_criterion=criterion,
        )
        if bar_note:
            tfx_info["notes"].append(bar_note)
        if info is not None and exec_properties.get("metric") and baseline is None:
            tfx_info["notes"].append(
                f"metric {metric_name!r} is not among the Evaluator's metrics {sorted(info.metrics)}; "
                "the FP32 baseline is measured on the evaluation split instead"
            )
        if criterion is None:  # the FP32 metric itself misses the Evaluator's value bound
            self._finish(out_model, blessing, report_artifact, None, tfx_info, False,
                         f"the FP32 {metric_name}={baseline} already misses the Evaluator's bounds "
                         f"[{lower}, {upper}]", started)
            return

        # 3. Data ---------------------------------------------------------------------------
        import tensorflow_transform as tft

        tft_output = tft.TFTransformOutput(transform_graph.uri)
        xf_spec = tft_output.transformed_feature_spec()
        label_key = self._label_key(exec_properties.get("label_key"), info, xf_spec, input_names)
        features, label = feature_layout(xf_spec, input_names, label_key)
        batch_size = exec_properties.get("batch_size") or None
        sample_size = int(exec_properties.get("sample_size") or 100)
        calib_split = exec_properties.get("calibration_split") or "train"
        eval_split = exec_properties.get("evaluation_split") or "eval"
        tmp_dir = self._get_tmp_dir()
        t0 = time.time()
        sample_path = sample_records(
            self._sampling_pipeline(), split_file_pattern(examples, calib_split), sample_size,
            os.path.join(tmp_dir, "calibration"),
        )
        tfx_info["calibration_sampling_seconds"] = round(time.time() - t0, 2)
        calib = TransformedExamplesSource(sample_path, features, None, batch_size=min(sample_size, batch_size or 32))
        eval_source = TransformedExamplesSource(
            split_file_pattern(examples, eval_split), features, label, batch_size=batch_size or DEFAULT_EVAL_BATCH
        )
        tfx_info.update(label_key=label_key, calibration_split=calib_split, evaluation_split=eval_split,
                        sample_size=sample_size)

        # 4. Resume + trials as Beam work ---------------------------------------------------
        # The part to quantize as its own SavedModel (serving_default = the signature), so every
        # backend quantizes exactly it, whatever SavedModel route it takes.
        quantizable = export_signature_as_default(
            quantize_from, signature_name, os.path.join(tmp_dir, "quantizable_model"))
        fp32_fingerprint = fingerprint(model_path)
        tfx_info["fp32_fingerprint"] = fp32_fingerprint
        request_key = self._request_key(
            fp32_fingerprint, signature_name, accelerator, precision, metric_name, baseline, criterion, label_key,
            # Left out: what bounds or judges the search, not what a trial computes (reused trials
            # are judged against today's speed bar, and the budget is today's).
            sample_size, batch_size,
            {k: v for k, v in exec_properties.items() if k not in ("min_speedup", "max_trials", "timeout")},
            _file_digest([sample_path]),
            _file_digest(eval_source.files()),
        )
        tfx_info["request_key"] = request_key
        previous_report = self._previous_report(previous, request_key, tfx_info)
        if previous_report is not None:
            # Same Trainer model (fp32_fingerprint is in request_key); the re-exported
            # quantizable SavedModel's bytes may differ, so point the report at it.
            previous_report.model_fingerprint = fingerprint(quantizable)
        runner = BeamTrialRunner(
            self._beam_pipeline_args,
            results_dir=os.path.join(tmp_dir, "trial_results"),
            artifact_root=os.path.join(report_artifact.uri, "trials"),
            make_pipeline=self._make_beam_pipeline_fn,
        )
        tfx_info["trial_parallelism"] = runner.parallelism
        tfx_info["tuning_runner"] = runner.description
        raw_bar = exec_properties.get("min_speedup")
        min_speedup = check_min_speedup(DEFAULT_MIN_SPEEDUP if raw_bar is None else raw_bar) or None
        tfx_info["min_speedup"] = min_speedup or 0.0
        kwargs = dict(
            precision=precision, accelerator=accelerator, calib_dataset=calib, metric=metric,
            accuracy_criterion=criterion, tuning_strategy=exec_properties.get("tuning_strategy") or None,
            max_trials=exec_properties.get("max_trials") or None, timeout=exec_properties.get("timeout") or 0,
            batch=batch_size, sample_size=sample_size, signature_name="serving_default",
            eval_dataset=eval_source, baseline=baseline, trial_runner=runner,
            previous_report=previous_report, workdir=os.path.join(tmp_dir, "nano_tfx"),
            min_speedup=min_speedup,
        )
        met, err_seen = True, None
        try:
            quantized = nano_tfx.quantize(quantizable, **kwargs)
        except nano_tfx.AccuracyCriterionNotMet as err:
            quantized, met, err_seen = err.best_model, False, err
        report = quantized.report
        chosen = report.chosen_trial
        value = chosen.metric if chosen else None
        if chosen is None and report.trials:
            ok = [t for t in report.trials if t.metric is not None]
            if ok:
                value = (max if criterion["higher_is_better"] else min)(t.metric for t in ok)
        bounds_ok = value is not None and (lower is None or value >= lower) and (upper is None or value <= upper)
        # Never bless a model slower than min_speedup × FP32 (checked here too: the blessing is ours).
        speed_ok = not min_speedup or (report.speedup is not None and report.speedup >= min_speedup)
        blessed = bool(met and bounds_ok and speed_ok)
        speed = report.speed_summary()
        tfx_info.update(speedup=report.speedup, fp32_latency_ms=report.fp32_latency_ms)
        if blessed:
            message = (f"INT8 {metric_name}={value:.4f} vs FP32 {report.baseline:.4f}: within "
                       f"{user_criterion} and the Evaluator's bounds [{lower}, {upper}]; {speed}")
        elif not speed_ok or isinstance(err_seen, nano_tfx.SpeedupNotMet):
            message = (f"{speed}: the quantized model is not {min_speedup:g}× as fast as FP32, so it is "
                       f"not blessed (accuracy {metric_name}={value} vs FP32 {report.baseline}); "
                       "push the FP32 model instead (see README, 'When the speed gate blocks')")
        elif not met:
            message = (f"no trial met {criterion} (baseline {metric_name}={report.baseline}); "
                       f"best {value}; stopped: {report.stop_reason}; {speed}")
        else:
            message = f"INT8 {metric_name}={value} misses the Evaluator's bounds [{lower}, {upper}]; {speed}"

        # 5. Outputs ------------------------------------------------------------------------
        self._write_model(quantized, model_path, transform_graph.uri, out_model, info, tfx_info)
        self._finish(out_model, blessing, report_artifact, report, tfx_info, blessed, message, started,
                     int8_metric=value)

    # -- steps ---------------------------------------------------------------------------------
    def _sampling_pipeline(self):
        """The executor's Beam pipeline (its args, or the context's factory in tests)."""
        if self._make_beam_pipeline_fn is not None:
            return self._make_beam_pipeline_fn()
        import apache_beam as beam

        return beam.Pipeline(argv=with_runner_defaults(self._beam_pipeline_args))

    @staticmethod
    def _fp32_gate(fp32_blessing: Optional[types.Artifact], info: Optional[EvaluatorInfo]) -> Optional[str]:
        """None when the FP32 model may be quantized; else why not."""
        if fp32_blessing is not None:
            if fp32_blessing.get_int_custom_property("blessed") != 1 and not fileio.exists(
                os.path.join(fp32_blessing.uri, BLESSED_FILE)
            ):
                return "the Evaluator did not bless the FP32 model: nothing is quantized or blessed"
        elif info is not None and info.validation_ok is False:
            return "the Evaluator's validation of the FP32 model failed: nothing is quantized or blessed"
        return None

    @staticmethod
    def _effective_criterion(user: dict, baseline: Optional[float], lower: Optional[float],
                             upper: Optional[float]) -> tuple[Optional[dict], Optional[str]]:
        """Fold the Evaluator's value bound into the allowed drop (one absolute criterion)."""
        hib = user["higher_is_better"]
        bound = lower if hib else upper
        if baseline is None or bound is None:
            return user, None
        room = (baseline - bound) if hib else (bound - baseline)
        if room < 0:
            return None, None
        allowed = user["relative"] * abs(baseline) if "relative" in user else user["absolute"]
        if room < allowed:
            return ({"absolute": float(room), "higher_is_better": hib},
                    f"the Evaluator's bound {bound} is tighter than {user}: allowed drop {room:.6g}")
        return user, None

    @staticmethod
    def _label_key(explicit: Optional[str], info: Optional[EvaluatorInfo], xf_spec: dict,
                   input_names: List[str]) -> str:
        if explicit:
            if explicit not in xf_spec:
                raise ValueError(f"label_key: {explicit!r} is not a transformed feature; they are {sorted(xf_spec)}")
            return explicit
        for key in (info.label_keys if info else []):
            if key in xf_spec:
                return key
        rest = [k for k in xf_spec if k not in input_names]
        if len(rest) == 1:
            return rest[0]
        raise ValueError(
            "label_key: cannot tell which transformed feature is the label (features not consumed by "
            f"the model: {rest}); set Quantizer(label_key=...)"
        )

    @staticmethod
    def _request_key(*parts: Any) -> str:
        text = json.dumps([p if not isinstance(p, dict) else sorted(p.items()) for p in parts],
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    @staticmethod
    def _previous_report(previous: Optional[types.Artifact], request_key: str, tfx_info: dict):
        if previous is None:
            return None
        path = os.path.join(previous.uri, REPORT_JSON)
        if not fileio.exists(path):
            tfx_info["notes"].append(f"previous_report {previous.uri} has no {REPORT_JSON}: nothing reused")
            return None
        data = json.loads(io_utils.read_string_file(path))
        old_key = (data.get("tfx") or {}).get("request_key")
        if old_key != request_key:
            tfx_info["notes"].append(
                "previous_report is for another request (data, metric, criterion or parameters changed): "
                "nothing reused")
            return None
        tfx_info["resumed_from"] = previous.uri
        return nano_tfx.Report.from_dict(data)

    def _write_model(self, quantized: Any, fp32_path: str, transform_uri: str, out_model: types.Artifact,
                     info: Optional[EvaluatorInfo], tfx_info: dict) -> None:
        serving_dir = os.path.join(out_model.uri, serving.SERVING_DIR)
        staging = os.path.join(self._get_tmp_dir(), "quantized_model")
        quantized.save(staging)
        if fileio.exists(serving_dir):
            fileio.rmtree(serving_dir)
        backend = quantized.backend
        parse_keys = None
        if backend == "inc":
            parse_keys = serving.raw_parse_keys(fp32_path)
            exclude = [] if parse_keys else list(info.label_keys if info else [])
            parse_keys = serving.write_tf_serving_model(staging, transform_uri, serving_dir, parse_keys, exclude)
        else:
            shutil.copytree(staging, serving_dir)
            serving.copy_transform_graph(transform_uri, serving_dir)
            # nano-tfx serve parses the FP32 model's raw keys (the label is not in a request).
            raw_keys = serving.raw_parse_keys(fp32_path)
            serving.write_serving_manifest(serving_dir, raw_keys or self._raw_keys_without_labels(
                transform_uri, list(info.label_keys if info else [])))
            if backend == "onnxruntime":
                io_utils.write_string_file(
                    os.path.join(out_model.uri, "config.pbtxt"),
                    serving.triton_config("quantized_model", quantized.inputs, quantized.outputs))
        io_utils.write_string_file(
            os.path.join(serving_dir, serving.SERVING_DOC),
            serving.serving_doc(backend, parse_keys, quantized.inputs, quantized.outputs))
        tfx_info.update(backend=backend, serving_dir=serving_dir, raw_parse_keys=parse_keys)
        out_model.set_string_custom_property("nano_tfx_backend", backend)
        out_model.set_string_custom_property("nano_tfx_precision", str(quantized.precision))

    @staticmethod
    def _raw_keys_without_labels(transform_uri: str, labels: List[str]) -> Optional[List[str]]:
        import tensorflow_transform as tft

        keys = [k for k in tft.TFTransformOutput(transform_uri).raw_feature_spec() if k not in labels]
        return keys if labels else None

    def _finish(self, out_model: types.Artifact, blessing: types.Artifact, report_artifact: types.Artifact,
                report: Any, tfx_info: dict, blessed: bool, message: str, started: float,
                int8_metric: Optional[float] = None) -> None:
        tfx_info.update(blessed=blessed, blessing_message=message, int8_metric=int8_metric,
                        seconds=round(time.time() - started, 2))
        if report is None:
            report = nano_tfx.Report(backend=tfx_info.get("accelerator") or "inc",
                                     precision=tfx_info.get("precision") or "int8",
                                     stop_reason=message)
        data = report.to_dict()
        data["tfx"] = tfx_info
        fileio.makedirs(report_artifact.uri)
        io_utils.write_string_file(os.path.join(report_artifact.uri, REPORT_JSON),
                                   json.dumps(data, indent=2, default=str))
        io_utils.write_string_file(os.path.join(report_artifact.uri, REPORT_HTML),
                                   _report_html(report, tfx_info, self._get_tmp_dir()))
        report_artifact.set_string_custom_property("blessing_message", message)
        report_artifact.set_int_custom_property("num_trials", len(report.trials))

        fileio.makedirs(blessing.uri)
        io_utils.write_string_file(os.path.join(blessing.uri, BLESSED_FILE if blessed else NOT_BLESSED_FILE), "")
        # 'blessed' is what the Pusher checks. 'current_model_id' is deliberately NOT set:
        # LatestBlessedModelStrategy keys on it, and the quantized model must never become the
        # Evaluator's next FP32 baseline.
        blessing.set_int_custom_property("blessed", 1 if blessed else 0)
        blessing.set_string_custom_property("blessing_message", message[:2000])
        if int8_metric is not None:
            blessing.set_float_custom_property("quantized_metric", float(int8_metric))
        if tfx_info.get("baseline") is not None:
            blessing.set_float_custom_property("fp32_metric", float(tfx_info["baseline"]))
        for key in ("speedup", "fp32_latency_ms"):
            if tfx_info.get(key) is not None:
                blessing.set_float_custom_property(key, float(tfx_info[key]))
        fileio.makedirs(out_model.uri)
        if not blessed and not fileio.exists(os.path.join(out_model.uri, serving.SERVING_DIR)):
            io_utils.write_string_file(os.path.join(out_model.uri, "NOT_QUANTIZED.txt"), message + "\n")
        logging.info("Quantizer: blessed=%s (%s); report at %s", blessed, message, report_artifact.uri)


def _report_html(report: Any, tfx_info: dict, tmp_dir: str) -> str:
    plot_b64 = None
    png = os.path.join(tmp_dir, "report_plot.png")
    try:
        if report.plot_png(png):
            with open(png, "rb") as f:
                plot_b64 = base64.b64encode(f.read()).decode()
    except Exception as err:  # noqa: BLE001 - a missing plot must not fail the component
        logging.warning("Quantizer: no plot: %s", err)
    workers: Dict[str, int] = {}
    for t in report.trials:
        if t.status != "reused" and t.worker:
            workers[t.worker] = workers.get(t.worker, 0) + 1
    decision = [
        (k, json.dumps(tfx_info.get(k), default=str))
        for k in ("blessed", "blessing_message", "metric", "baseline", "int8_metric", "value_bounds",
                  "user_criterion", "effective_criterion", "min_speedup", "speedup", "fp32_latency_ms",
                  "backend", "beam_runner", "tuning_runner", "trial_parallelism",
                  "resumed_from", "notes")
        if k in tfx_info
    ]
    return report.to_html(plot_b64, extra_sections=[
        {"title": "TFX decision", "rows": decision},
        {"title": "Trials per worker", "text": json.dumps(workers)},
    ])
