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
from components.quantizer.beam_runner import (BeamTrialRunner, default_parallelism, is_local_direct, runner_name,
                                              with_runner_defaults)
from components.quantizer.decision import QuantizerDecision, bounds_text, report_html
from components.quantizer.served_timing import read_raw_examples, served_call_path
from components.quantizer.keys import (
    BLESSING_KEY, EVALUATION_KEY, EXAMPLES_KEY, MODEL_BLESSING_KEY, MODEL_KEY, PREVIOUS_REPORT_KEY,
    QUANTIZED_MODEL_KEY, RAW_EXAMPLES_KEY, REPORT_KEY, TRANSFORM_GRAPH_KEY,
)
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
from nano_tfx.criterion import describe_criterion
from nano_tfx.speed import check_min_speedup
from nano_tfx.interchange import export_signature_as_default

BLESSED_FILE = "BLESSED"
NOT_BLESSED_FILE = "NOT_BLESSED"
DEFAULT_EVAL_BATCH = 32
DEFAULT_SHARD_BATCH = 1024  # rows per inference call in the sharded evaluation


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
        model = _single(input_dict, MODEL_KEY)
        examples = _single(input_dict, EXAMPLES_KEY)
        transform_graph = _single(input_dict, TRANSFORM_GRAPH_KEY)
        evaluation = _single(input_dict, EVALUATION_KEY)
        fp32_blessing = _single(input_dict, MODEL_BLESSING_KEY)
        previous = _single(input_dict, PREVIOUS_REPORT_KEY)
        raw_examples = _single(input_dict, RAW_EXAMPLES_KEY)
        out_model = _single(output_dict, QUANTIZED_MODEL_KEY)
        blessing = _single(output_dict, BLESSING_KEY)
        report_artifact = _single(output_dict, REPORT_KEY)

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

        decision = QuantizerDecision(
            fp32_model=model_path, fp32_model_id=model.id, signature_name=signature_name,
            accelerator=accelerator, precision=precision, beam_runner=str(runner_name(self._beam_pipeline_args)),
            notes=[derived_note] if derived_note else [],
            derived_signature_model=quantize_from if derived_note else None,
        )
        blessing.set_string_custom_property("fp32_model", model.uri)
        blessing.set_int_custom_property("fp32_model_id", model.id)
        out_model.set_int_custom_property("fp32_model_id", model.id)

        # 1. The Evaluator's gate ------------------------------------------------------------
        info: Optional[EvaluatorInfo] = read_evaluation(evaluation.uri) if evaluation else None
        if info is not None:
            decision.evaluator = info.to_dict()
        gate = self._fp32_gate(fp32_blessing, info)
        if gate is not None:
            decision.refuse(gate)
            self._finish(out_model, blessing, report_artifact, None, decision, started)
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
        decision.metric, decision.baseline = metric_name, baseline
        decision.baseline_source = "evaluator" if baseline is not None else "fp32 run"
        decision.value_bounds = {"lower_bound": lower, "upper_bound": upper}
        decision.user_criterion, decision.effective_criterion = user_criterion, criterion
        if bar_note:
            decision.notes.append(bar_note)
        if info is not None and exec_properties.get("metric") and baseline is None:
            decision.notes.append(
                f"metric {metric_name!r} is not among the Evaluator's metrics ({', '.join(sorted(info.metrics))}); "
                "the FP32 baseline is measured on the evaluation split instead"
            )
        if criterion is None:  # the FP32 metric itself misses the Evaluator's value bound
            decision.refuse(f"the FP32 {metric_name}={baseline:.4f} already misses the Evaluator's bounds "
                            f"({bounds_text(lower, upper)})")
            self._finish(out_model, blessing, report_artifact, None, decision, started)
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
        decision.calibration_sampling_seconds = time.time() - t0
        calib = TransformedExamplesSource(sample_path, features, None, batch_size=min(sample_size, batch_size or 32))
        eval_source = TransformedExamplesSource(
            split_file_pattern(examples, eval_split), features, label, batch_size=batch_size or DEFAULT_EVAL_BATCH
        )
        decision.label_key, decision.sample_size = label_key, sample_size
        decision.calibration_split, decision.evaluation_split = calib_split, eval_split

        # 4. Resume + trials as Beam work ---------------------------------------------------
        # The part to quantize as its own SavedModel (serving_default = the signature), so every
        # backend quantizes exactly it, whatever SavedModel route it takes.
        quantizable = export_signature_as_default(
            quantize_from, signature_name, os.path.join(tmp_dir, "quantizable_model"))
        fp32_fingerprint = fingerprint(model_path)
        decision.fp32_fingerprint = fp32_fingerprint
        eval_digest = _file_digest(eval_source.files())
        request_key = self._request_key(
            fp32_fingerprint, signature_name, accelerator, precision, metric_name, baseline, criterion, label_key,
            # Left out: what bounds or judges the search, not what a trial computes (reused trials
            # are judged against today's speed bar, and the budget is today's).
            sample_size, batch_size,
            {k: v for k, v in exec_properties.items() if k not in ("min_speedup", "max_trials", "timeout")},
            _file_digest([sample_path]),
            eval_digest,
        )
        decision.request_key = request_key
        previous_report = self._previous_report(previous, request_key, decision)
        if previous_report is not None:
            # Same Trainer model (fp32_fingerprint is in request_key); the re-exported
            # quantizable SavedModel's bytes may differ, so point the report at it.
            previous_report.model_fingerprint = fingerprint(quantizable)
        runner = BeamTrialRunner(
            self._beam_pipeline_args,
            results_dir=os.path.join(tmp_dir, "trial_results"),
            artifact_root=os.path.join(report_artifact.uri, "trials"),
            make_pipeline=self._make_beam_pipeline_fn,
            sharded_evaluation=self._sharded_evaluation(
                exec_properties, quantizable, eval_source, fp32_fingerprint + eval_digest,
                report_artifact, previous),
        )
        decision.trial_parallelism, decision.tuning_runner = runner.parallelism, runner.description
        raw_bar = exec_properties.get("min_speedup")
        min_speedup = check_min_speedup(DEFAULT_MIN_SPEEDUP if raw_bar is None else raw_bar) or None
        decision.min_speedup = min_speedup or 0.0
        kwargs = dict(
            precision=precision, accelerator=accelerator, calib_dataset=calib, metric=metric,
            accuracy_criterion=criterion, tuning_strategy=exec_properties.get("tuning_strategy") or None,
            max_trials=exec_properties.get("max_trials") or None, timeout=exec_properties.get("timeout") or 0,
            batch=batch_size, sample_size=sample_size, signature_name="serving_default",
            eval_dataset=eval_source, baseline=baseline, trial_runner=runner,
            previous_report=previous_report, workdir=os.path.join(tmp_dir, "nano_tfx"),
            min_speedup=min_speedup, trial_evaluation=exec_properties.get("trial_evaluation") or "full",
            confidence=exec_properties.get("confidence") or 0.99,
            call_path=self._served_call_path(raw_examples, eval_split, model_path, transform_graph.uri, info, decision)
            if "auto" in (accelerator, precision) else None,
        )
        met, err_seen = True, None
        try:
            quantized = nano_tfx.quantize(quantizable, **kwargs)
        except nano_tfx.AccuracyCriterionNotMet as err:
            quantized, met, err_seen = err.best_model, False, err
        except nano_tfx.QuantizationFailed as err:
            # No model at all (the backend cannot convert it, or every trial failed): a verdict,
            # not a crashed run. Nothing is blessed; the report keeps each trial's error.
            logging.warning("Quantizer: %s", err)
            decision.refuse(f"not blessed: {err}")
            self._finish(out_model, blessing, report_artifact, err.report, decision, started)
            return
        decision.judge(quantized.report, met, speed_refused=isinstance(err_seen, nano_tfx.SpeedupNotMet))
        if runner.chunks is not None:
            decision.evaluation_mode, decision.evaluation_shards = runner.chunks.mode, len(runner.chunks.split.shards)
            decision.fp32_results, decision.fp32_results_dir = runner.chunks.fp32_source, runner.chunks.fp32_dir
            decision.evaluation_pipelines = runner.chunks.pipelines_run

        # 5. Outputs ------------------------------------------------------------------------
        decision.backend, decision.serving_dir, decision.raw_parse_keys = self._write_model(
            quantized, model_path, transform_graph.uri, out_model, info)
        self._finish(out_model, blessing, report_artifact, quantized.report, decision, started)

    # -- steps ---------------------------------------------------------------------------------
    def _sharded_evaluation(self, exec_properties: Dict[str, Any], quantizable: str,
                            eval_source: TransformedExamplesSource, fingerprint_: str,
                            report_artifact: types.Artifact, previous: Optional[types.Artifact]):
        """``trial_evaluation='sequential'``: the factory of this run's ``ShardedChunks`` (FP32 once,
        kept in the report artifact's ``fp32_eval/`` and reused from ``previous_report``'s), or None."""
        if (exec_properties.get("trial_evaluation") or "full") != "sequential" or eval_source.label is None:
            return None
        from components.quantizer.sharded_eval import FP32_DIR, ShardedChunks, ShardedSplit
        from nano_tfx.interchange import describe_saved_model

        source = describe_saved_model(quantizable, "serving_default")
        workers = default_parallelism(self._beam_pipeline_args)
        split = ShardedSplit.plan(eval_source.files(), eval_source.features, eval_source.label, source.input_names,
                                  min_shards=2 * workers if workers > 1 else 1,
                                  batch_size=exec_properties.get("batch_size") or DEFAULT_SHARD_BATCH)
        fp32_dir = os.path.join(report_artifact.uri, FP32_DIR)
        previous_dir = os.path.join(previous.uri, FP32_DIR) if previous is not None else None

        # local workers share this machine's cores: each candidate's engine gets its share
        threads = max(1, (os.cpu_count() or 1) // workers) if is_local_direct(self._beam_pipeline_args) else None

        def build(mode: str, make_pipeline, reference):
            return ShardedChunks(split, source, fingerprint_, fp32_dir, previous_dir, mode=mode,
                                 make_pipeline=make_pipeline, reference=reference, worker_threads=threads)

        return build

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
                    f"the Evaluator's bound {bound:.4g} is tighter than the criterion "
                    f"({describe_criterion(user)}): allowed drop {room:.6g}")
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
    def _previous_report(previous: Optional[types.Artifact], request_key: str, decision: QuantizerDecision):
        if previous is None:
            return None
        path = os.path.join(previous.uri, REPORT_JSON)
        if not fileio.exists(path):
            decision.notes.append(f"previous_report {previous.uri} has no {REPORT_JSON}: nothing reused")
            return None
        data = json.loads(io_utils.read_string_file(path))
        old_key = (data.get("tfx") or {}).get("request_key")
        if old_key != request_key:
            decision.notes.append(
                "previous_report is for another request (data, metric, criterion or parameters changed): "
                "nothing reused")
            return None
        decision.resumed_from = previous.uri
        return nano_tfx.Report.from_dict(data)

    def _write_model(self, quantized: Any, fp32_path: str, transform_uri: str, out_model: types.Artifact,
                     info: Optional[EvaluatorInfo]) -> tuple[str, str, Optional[List[str]]]:
        """The serving layout of ``quantized`` into ``out_model``: (backend, serving dir, raw parse keys)."""
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
        out_model.set_string_custom_property("nano_tfx_backend", backend)
        out_model.set_string_custom_property("nano_tfx_precision", str(quantized.precision))
        return backend, serving_dir, parse_keys

    def _served_call_path(self, raw_examples: Optional[types.Artifact], split: str, fp32_path: str,
                          transform_uri: str, info: Optional[EvaluatorInfo], decision: QuantizerDecision):
        """The ``call_path`` the finalists are chosen by (``served_timing``): raw examples of the
        evaluation split through parse + tf.Transform + engine, as ``nano-tfx serve`` runs them.
        None (model-only timing) without ``raw_examples``."""
        if raw_examples is None:
            return None
        pattern = split_file_pattern(raw_examples, split, what="raw_examples")
        examples = read_raw_examples(pattern)
        # what a request carries, as _write_model records it for the server
        keys = serving.raw_parse_keys(fp32_path) or self._raw_keys_without_labels(
            transform_uri, list(info.label_keys if info else []))
        decision.notes.append(f"finalists timed through the served call path (parse + tf.Transform + engine) "
                              f"on {len(examples)} raw {split!r} examples")
        return served_call_path(transform_uri, keys, examples, notes=decision.notes)

    @staticmethod
    def _raw_keys_without_labels(transform_uri: str, labels: List[str]) -> Optional[List[str]]:
        import tensorflow_transform as tft

        keys = [k for k in tft.TFTransformOutput(transform_uri).raw_feature_spec() if k not in labels]
        return keys if labels else None

    def _finish(self, out_model: types.Artifact, blessing: types.Artifact, report_artifact: types.Artifact,
                report: Optional[nano_tfx.Report], decision: QuantizerDecision, started: float) -> None:
        """Write report.json (+ ``tfx``: the decision), report.html and the blessing."""
        decision.seconds = time.time() - started
        message = decision.blessing_message
        if report is None:
            report = nano_tfx.Report(backend=decision.accelerator or "inc", precision=decision.precision or "int8",
                                     stop_reason=message)
        data = report.to_dict()
        data["tfx"] = decision.to_dict()
        fileio.makedirs(report_artifact.uri)
        io_utils.write_string_file(os.path.join(report_artifact.uri, REPORT_JSON),
                                   json.dumps(data, indent=2, default=str))
        io_utils.write_string_file(os.path.join(report_artifact.uri, REPORT_HTML), report_html(report, decision))
        report_artifact.set_string_custom_property("blessing_message", message)
        report_artifact.set_int_custom_property("num_trials", len(report.trials))

        fileio.makedirs(blessing.uri)
        io_utils.write_string_file(
            os.path.join(blessing.uri, BLESSED_FILE if decision.blessed else NOT_BLESSED_FILE), "")
        # 'blessed' is what the Pusher checks. 'current_model_id' is deliberately NOT set:
        # LatestBlessedModelStrategy keys on it, and the quantized model must never become the
        # Evaluator's next FP32 baseline.
        _set_properties(blessing, decision.blessing_properties())
        fileio.makedirs(out_model.uri)
        if not decision.blessed and not fileio.exists(os.path.join(out_model.uri, serving.SERVING_DIR)):
            io_utils.write_string_file(os.path.join(out_model.uri, "NOT_QUANTIZED.txt"), message + "\n")
        logging.info("Quantizer: blessed=%s (%s); report at %s", decision.blessed, message, report_artifact.uri)


def _set_properties(artifact: types.Artifact, props: Dict[str, Any]) -> None:
    """Custom properties by value type (MLMD keeps int, float and string apart)."""
    for key, value in props.items():
        if isinstance(value, bool) or isinstance(value, int):
            artifact.set_int_custom_property(key, int(value))
        elif isinstance(value, float):
            artifact.set_float_custom_property(key, value)
        else:
            artifact.set_string_custom_property(key, str(value))
