"""``nano_tfx.quantize``: the seed's arguments → checked request → interchange → tuning → result.

The Keras ``Model.quantize``, the Keras callback and the TFX ``Quantizer`` all end here.
"""
from __future__ import annotations

import hashlib
import logging as _logging
import math
import numbers
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

from nano_tfx.backends.base import BackendOptions, backend_class, backend_names, trial_precision
from nano_tfx.criterion import AccuracyCriterion
from nano_tfx.data import SpooledSource, make_batches
from nano_tfx.errors import AccuracyCriterionNotMet, QuantizationFailed, SpeedupNotMet
from nano_tfx.interchange import SavedModelSource, to_saved_model
from nano_tfx.metrics import check_metric_value, make_evaluator
from nano_tfx.progress import ProgressLine, TrialHook, as_hooks
from nano_tfx.report import Report
from nano_tfx.result import QuantizedModel
from nano_tfx.speed import CallPath, DEFAULT_BUDGET_S, check_min_speedup, engine_fp32_variant, side_by_side
from nano_tfx.tuning.runner import LocalRunner, TrialJob, TrialRunner, engine_fp32, job_diagnoser
from nano_tfx.tuning.ladder import RUNGS, LadderPlan, bf16_fallback_rungs, ladder_rows, plan_ladder
from nano_tfx.tuning.paired_eval import EVALUATIONS, PairedEvaluation, TrialModel
from nano_tfx.tuning.strategies import PUBLIC_STRATEGIES, STRATEGIES
from nano_tfx.tuning.tuner import Budget, tune

log = _logging.getLogger("nano_tfx")

PRECISIONS = ("int8", "bf16", "fp16", "auto")  # auto: the precision ladder (nano_tfx.tuning.ladder)
ACCELERATORS = (None, "onnxruntime", "openvino", "auto")
APPROACHES = ("static", "dynamic")
DEFAULT_CRITERION = {"relative": 0.01, "higher_is_better": True}
DEFAULT_MAX_TRIALS = 100


@dataclass(frozen=True)
class QuantizationRequest:
    """The validated arguments of one ``quantize`` call."""

    precision: str
    accelerator: str | None
    approach: str
    criterion: AccuracyCriterion | None
    tuning_strategy: str | None
    max_trials: int | None
    timeout: float
    batch: int | None
    sample_size: int | None
    options: BackendOptions
    min_speedup: float | None = None  # FP32 ms / quantized ms the result must reach (None: no gate)
    trial_evaluation: str = "full"  # "full" | "sequential" (nano_tfx.tuning.paired_eval)
    confidence: float = 0.99  # of the sequential decision's interval

    @classmethod
    def from_kwargs(
        cls,
        *,
        has_metric: bool,
        precision: str = "int8",
        accelerator: str | None = None,
        approach: str = "static",
        accuracy_criterion: Any = None,
        tuning_strategy: str | None = None,
        max_trials: int | None = None,
        timeout: Any = 0,
        batch: int | None = None,
        sample_size: int | None = 100,
        method: str | None = None,
        thread_num: int | None = None,
        onnxruntime_session_options: Any = None,
        openvino_config: Mapping | None = None,
        min_speedup: Any = None,
        trial_evaluation: str = "full",
        confidence: Any = 0.99,
    ) -> "QuantizationRequest":
        """Check every argument before any work starts; errors name the argument.

        The one place the engine's arguments are validated and defaulted: ``quantize``, the
        ``QuantizationCallback`` (at construction, not mid-training) and the TFX ``Quantizer``
        (at pipeline construction) all call it. ``has_metric``: a metric/eval_func will measure
        accuracy (the Quantizer always has the Evaluator's)."""
        if accelerator not in ACCELERATORS:
            raise ValueError(f"accelerator: expected one of {list(ACCELERATORS)} (None = Intel Neural Compressor), "
                             f"got {accelerator!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
        if approach not in APPROACHES:
            raise ValueError(f"approach: expected 'static' or 'dynamic', got {approach!r}")
        if tuning_strategy is not None and str(tuning_strategy).lower() not in STRATEGIES:
            raise ValueError(f"tuning_strategy: expected one of {PUBLIC_STRATEGIES}, got {tuning_strategy!r}")
        criterion = AccuracyCriterion.parse(accuracy_criterion)
        if criterion is not None and not has_metric:
            raise ValueError("accuracy_criterion: needs a metric or eval_func to measure accuracy with")
        if criterion is None and has_metric:
            criterion = AccuracyCriterion.parse(DEFAULT_CRITERION)
        _check_int("max_trials", max_trials, 1)
        timeout = check_timeout(timeout)
        _check_int("batch", batch, 1)
        _check_int("sample_size", sample_size, 1)
        _check_int("thread_num", thread_num, 1)
        if method is not None and method not in ("qlinear", "integer"):
            raise ValueError(f"method: expected None, 'qlinear' or 'integer', got {method!r}")
        if method is not None and accelerator not in ("onnxruntime", "auto"):
            raise ValueError(f"method: only used with accelerator='onnxruntime', got accelerator={accelerator!r}")
        if openvino_config is not None and not isinstance(openvino_config, Mapping):
            raise ValueError(f"openvino_config: expected a dict of OpenVINO properties, got {type(openvino_config).__name__}")
        options = BackendOptions(thread_num=thread_num, method=method,
                                 onnxruntime_session_options=onnxruntime_session_options,
                                 openvino_config=openvino_config, approach=approach)
        if max_trials is None:
            max_trials = DEFAULT_MAX_TRIALS if has_metric else None
        if trial_evaluation not in EVALUATIONS:
            raise ValueError(f"trial_evaluation: expected one of {list(EVALUATIONS)}, got {trial_evaluation!r}")
        if (isinstance(confidence, bool) or not isinstance(confidence, (int, float))
                or not 0.5 <= confidence < 1):
            raise ValueError(f"confidence: expected a probability in [0.5, 1), got {confidence!r}")
        return cls(precision, accelerator, approach, criterion, tuning_strategy, max_trials, float(timeout),
                   batch, sample_size, options, check_min_speedup(min_speedup), trial_evaluation, float(confidence))


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def check_timeout(timeout: Any) -> float:
    """``timeout`` as finite seconds >= 0 (None and 0 mean no limit); NaN/inf are refused."""
    if timeout is None:
        return 0.0
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout < 0:
        raise ValueError(f"timeout: expected finite seconds >= 0 (0 = no limit), got {timeout!r}")
    return float(timeout)


def fingerprint(path: str) -> str:
    """Content hash of a SavedModel (graph + variable index): same model, same fingerprint."""
    h = hashlib.sha256()
    for rel in ("saved_model.pb", os.path.join("variables", "variables.index")):
        full = os.path.join(path, rel)
        if os.path.isfile(full):
            with open(full, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:20]


def _compile_info(model: Any) -> tuple[Any, list]:
    """The Keras model's compiled loss and metrics, so ``result.evaluate`` matches Keras'."""
    try:
        cfg = model.get_compile_config() or {}
    except Exception:
        return None, []
    import importlib

    from nano_tfx.interchange import keras_flavor

    keras = importlib.import_module("tf_keras" if keras_flavor(model) == "tf_keras" else "keras")
    loss = cfg.get("loss")
    try:
        loss = keras.losses.get(loss) if loss is not None else None
    except Exception:
        loss = None
    metrics: list = []
    raw = cfg.get("metrics") or []
    for m in (raw if isinstance(raw, (list, tuple)) else [raw]):
        try:
            metrics.append(m if isinstance(m, str) else keras.metrics.deserialize(m))
        except Exception:
            continue
    return loss, metrics


def _select_outputs(source: SavedModelSource, outputs: Sequence[str] | None) -> SavedModelSource:
    if not outputs:
        return source
    names = source.output_names
    unknown = [o for o in outputs if o not in names]
    if unknown:
        raise ValueError(f"outputs: {unknown} are not outputs of the model; it has {names}")
    return replace(source, outputs=tuple(t for t in source.outputs if t.name in outputs))


def _plan(request: QuantizationRequest, calibrated: bool) -> LadderPlan:
    """The (backend, precision) jobs to tune: one precision on one engine or on every engine
    (``accelerator='auto'``), or the precision ladder (``precision='auto'``) on those engines."""
    backends = backend_names() if request.accelerator == "auto" else [request.accelerator or "inc"]
    if request.precision == "auto":
        return plan_ladder(backends, request.options, request.approach, calibrated)
    return LadderPlan(pairs=[(name, request.precision) for name in backends
                             if request.precision in backend_class(name).precisions])


def quantize(
    model: Any,
    precision: str = "int8",
    accelerator: str | None = None,
    calib_dataset: Any = None,
    metric: Any = None,
    eval_func: Callable[[Any], float] | None = None,
    accuracy_criterion: Mapping[str, Any] | None = None,
    approach: str = "static",
    method: str | None = None,
    conf: Any = None,
    tuning_strategy: str | None = None,
    timeout: float | None = 0,
    max_trials: int | None = None,
    batch: int | None = None,
    thread_num: int | None = None,
    inputs: Sequence[str] | None = None,
    outputs: Sequence[str] | None = None,
    sample_size: int | None = 100,
    onnxruntime_session_options: Any = None,
    openvino_config: Mapping[str, Any] | None = None,
    logging: bool = False,
    x: Any = None,
    y: Any = None,
    input_spec: Any = None,
    signature_name: str = "serving_default",
    eval_dataset: Any = None,
    baseline: float | None = None,
    trial_runner: TrialRunner | None = None,
    previous_report: Report | str | None = None,
    workdir: str | None = None,
    min_speedup: float | None = None,
    verbose: int = 0,
    on_trial_end: TrialHook | Sequence[TrialHook] | None = None,
    trial_evaluation: str = "full",
    confidence: float = 0.99,
    call_path: CallPath | None = None,
) -> QuantizedModel:
    """Quantize a Keras model (Keras 3 or tf_keras) or a SavedModel directory.

    The arguments are BigDL-Nano's ``Model.quantize`` ones; ``calib_dataset`` (or ``x``/``y``)
    calibrates and, with a ``metric``/``eval_func``, also evaluates (``eval_dataset`` overrides
    that). Without a metric the model is fully quantized with no search. Raises
    ``AccuracyCriterionNotMet`` (with ``best_model`` and ``report``) when tuning cannot meet
    ``accuracy_criterion``.

    Speed is measured every time: the FP32 signature and the result are timed side by side at
    the end (``report.fp32_latency_ms``, ``report.speedup`` = FP32 ms ÷ result ms at batch 1;
    each trial's ``speedup`` is timed when it ran), beside the result's engine running its own FP32
    model (``report.engine_fp32_latency_ms``, ``report.int8_gain`` = that ms ÷ result ms).
    ``min_speedup`` (default None: no gate) is a speed bar: a trial slower than ``min_speedup`` ×
    FP32 does not pass, whatever its accuracy (with ``accelerator='auto'`` the bar applies to the
    chosen, fastest model), and the result
    is confirmed side by side; when it is missed ``SpeedupNotMet`` (an ``AccuracyCriterionNotMet``)
    is raised with the model and report.

    ``precision='auto'`` walks the precision ladder on the engine(s) asked for: INT8 (tuned, with
    its FP32 fallback layers) → INT8 with those layers in BF16 → BF16 → the engine's own FP32
    (BF16 rungs only where the CPU has native BF16; ``NANO_TFX_BF16=0|1`` forces it). Every rung
    that meets the criterion is timed side by side and the fastest is returned (within 5 %, the
    rung nearer FP32); ``report.ladder`` says which rung won and why each other did not,
    ``report.result_precision`` / ``q.precision`` what the model runs in. ``max_trials`` and
    ``timeout`` cover the whole ladder. ``precision='int8'`` never returns anything but INT8.

    ``trial_evaluation='sequential'`` decides each trial on as few evaluation examples as the criterion
    needs: FP32's outputs are computed once, examples are visited in a fixed hash order in growing
    chunks, and a trial passes (fails) as soon as the ``confidence`` interval on metric(INT8) −
    metric(FP32) lies inside (outside) the criterion; otherwise up to the whole split, where the
    decision is exact. The chosen model's metric is then computed on the whole split once.
    ``'full'`` (default) evaluates every trial on the whole split; a metric whose state does not
    merge exactly (``nano_tfx.metric_states.state_for``), a multi-output model or ``eval_func``
    is always evaluated on the whole split (``report.trial_evaluation`` says which was used).

    ``timeout`` (seconds, 0 = none) bounds the whole call: the first trial always runs; after it
    no trial starts whose expected duration (from this backend's earlier trials in the call, or
    its preparation time) would end past the deadline (see ``nano_tfx.tuning.tuner``).

    ``call_path`` (default None: the returned model's own call) is how the deployed model will be
    called: a function taking a finalist (a ``QuantizedModel``: ``.inputs``, ``.run``) and returning
    the call to time instead, given the same inputs (it may use only their batch size), e.g. a
    server's parse + tf.Transform on raw tf.Examples before the engine (the TFX ``Quantizer`` passes
    one when it gets ``raw_examples``). When several finalists are left (``accelerator='auto'``,
    ``precision='auto'``), they are timed again through it and the fastest *served* one is chosen
    (``report.served_latency_ms``); ``report.speedup`` stays the model-only ratio. A call path
    that has a ``time_side_by_side(models, budget_s) -> {name: batch-1 ms}`` method times them
    itself instead (``models``: {name: ``QuantizedModel``}), e.g. in a fresh process configured
    like the server (``components.quantizer.served_timing.ServedCallPath``).

    Progress: ``verbose=1`` writes one line per trial to stdout (backend, config, metric, speed,
    seconds); ``on_trial_end`` takes your own hook(s), called with each trial's ``TrialRecord``
    as soon as it is judged.
    """
    if isinstance(verbose, bool) or not isinstance(verbose, int) or verbose < 0:
        raise ValueError(f"verbose: expected 0 or 1, got {verbose!r}")
    hooks = ([ProgressLine(max_trials=max_trials if isinstance(max_trials, int) else None)] if verbose else [])
    hooks += as_hooks(on_trial_end)
    evaluator = make_evaluator(metric, eval_func)
    request = QuantizationRequest.from_kwargs(
        has_metric=evaluator is not None, precision=precision, accelerator=accelerator, approach=approach,
        accuracy_criterion=accuracy_criterion, tuning_strategy=tuning_strategy, max_trials=max_trials,
        timeout=timeout, batch=batch, sample_size=sample_size, method=method, thread_num=thread_num,
        onnxruntime_session_options=onnxruntime_session_options, openvino_config=openvino_config,
        min_speedup=min_speedup, trial_evaluation=trial_evaluation, confidence=confidence)
    if call_path is not None and not callable(call_path):
        raise ValueError(f"call_path: expected a function model -> run (or None), got {type(call_path).__name__}")
    if conf is not None:
        raise ValueError("conf: INC yaml/config objects are not used; pass the tuning arguments directly")
    if calib_dataset is None and x is None:
        if request.precision == "int8" and request.approach == "static":
            raise ValueError("calib_dataset: static INT8 quantization needs calibration data (calib_dataset= or x=)")
    if request.accelerator != "auto" and request.precision != "auto":  # fail fast, before exporting anything
        backend_class(request.accelerator)(request.options).validate(request.precision, request.approach)
    plan = _plan(request, calibrated=calib_dataset is not None or x is not None)
    if not plan.pairs:
        raise ValueError(f"precision: no backend supports {request.precision!r} for accelerator='auto'")

    own_workdir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="nano_tfx_")
    try:
        return _quantize(model, request, plan, calib_dataset if calib_dataset is not None else x, y,
                         evaluator, eval_dataset, inputs, outputs, input_spec, signature_name, baseline,
                         trial_runner, previous_report, workdir, own_workdir, logging, hooks, call_path)
    except BaseException as err:
        # A missed bar hands back its best model, whose trial files live in ``workdir``: that
        # model owns the folder now (removed when it is garbage-collected), so keep it.
        handed_back = isinstance(err, AccuracyCriterionNotMet) and err.best_model is not None
        if own_workdir and not handed_back:
            shutil.rmtree(workdir, ignore_errors=True)
        raise


def _quantize(model, request, plan, data, y, evaluator, eval_dataset, inputs, outputs, input_spec,
              signature_name, baseline, trial_runner, previous_report, workdir, own_workdir, logging, hooks,
              call_path=None):
    started = time.perf_counter()
    source = _select_outputs(to_saved_model(model, workdir, input_spec, signature_name, inputs), outputs)
    calib = None
    if data is not None:
        calib = make_batches(data, source.inputs, y=y, sample_size=request.sample_size,
                             argument="calib_dataset" if y is None else "x", check_finite=True)
        calib.scan()  # shape / dtype / emptiness / NaN errors before any backend work (<= sample_size rows)
    evaluation = None
    if evaluator is not None:
        eval_source, eval_y = (eval_dataset, None) if eval_dataset is not None else (data, y)
        if calib is not None and eval_source is data and isinstance(calib.source, SpooledSource):
            eval_source, eval_y = calib.source, None  # a one-shot generator: its spool serves both roles
        if eval_source is None and evaluator.needs_labels:
            raise ValueError("calib_dataset: a metric needs labelled data to evaluate on")
        if eval_source is not None:
            evaluation = make_batches(eval_source, source.inputs, y=eval_y, batch=request.batch,
                                      argument="eval_dataset" if eval_dataset is not None else "calib_dataset",
                                      check_finite=True)
            if evaluator.needs_labels and not evaluation.has_labels():
                raise ValueError(
                    f"metric: {evaluator.name!r} needs labels, but the evaluation data has none; give (x, y) data"
                )
    if isinstance(previous_report, (str, os.PathLike)):
        previous_report = Report.load(os.fspath(previous_report))
    fp = fingerprint(source.path)
    if previous_report is not None and previous_report.model_fingerprint not in (None, fp):
        previous_report = None  # another model: nothing to reuse

    from nano_tfx.backends.tf_reference import TFSignatureCandidate

    reference = QuantizedModel(TFSignatureCandidate(source), source)  # the FP32 model being replaced
    measured = evaluator is not None and baseline is None
    if measured:
        baseline = measure_baseline(evaluator, source, evaluation, reference)
    paired = None
    if request.trial_evaluation == "sequential":  # FP32 once; trials decided on as few examples as needed
        # the trial runner may bring its own evaluator of chunks (the Quantizer's sharded Beam one)
        paired = PairedEvaluation.make(evaluator, evaluation, reference.run, request.criterion, request.confidence,
                                       chunks=getattr(trial_runner, "paired_chunks", None))
    timing_inputs = _timing_inputs(calib, evaluation)
    pairs = plan.pairs
    report = Report(
        backend="auto" if request.accelerator == "auto" else pairs[0][0], precision=request.precision,
        metric_name=evaluator.name if evaluator else None, baseline=baseline,
        criterion=request.criterion.to_dict() if request.criterion else None,
        strategy=(request.tuning_strategy or "basic") if evaluator else None,
        max_trials=request.max_trials, timeout=request.timeout, model_fingerprint=fp,
        trial_evaluation="sequential" if paired is not None else "full",
    )
    ladder = request.precision == "auto"
    auto = request.accelerator == "auto" or ladder  # several finalists: the fastest is chosen
    jobs = [
        TrialJob(
            source=source, backend=backend_name, options=request.options, precision=prec,
            approach=request.approach, calibration=calib.calibration() if calib is not None else None,
            evaluation=evaluation, evaluator=evaluator, baseline=baseline, criterion=request.criterion,
            latency_batch=(request.batch or 32) if auto else None,
            workdir=os.path.join(workdir, "trials"),
            min_speedup=None if auto else request.min_speedup,  # auto: the bar is for the chosen model
            sequential=paired,
        )
        for backend_name, prec in pairs
    ]
    budget = Budget(request.max_trials, request.timeout, started=started)
    runner = trial_runner or LocalRunner()
    outcomes = tune(jobs, report, request.tuning_strategy, budget, runner, previous_report, strict=not auto,
                    hooks=hooks)
    ladder_extra: list[dict] = []
    if ladder:
        met, ladder_extra = bf16_fallback_rungs(outcomes, report, budget, runner, previous_report, hooks)
        outcomes = outcomes + met
    if logging:
        log.info("nano-tfx: trials\n%s", report.table())

    finalists = [o for o in outcomes if o.chosen is not None and o.candidate is not None]
    fallback = None if finalists else _best_of(outcomes, request.criterion)
    chosen_outcome = _fastest(finalists, fallback, report, reference, timing_inputs, request.batch or 32,
                              _timing_budget_s(budget), call_path)
    if ladder:
        report.ladder = ladder_rows(report, outcomes, chosen_outcome, plan.skipped + ladder_extra)
    if chosen_outcome is not None and paired is not None and not _confirm_on_full_split(
            chosen_outcome, report, evaluator, evaluation, reference, paired):
        fallback, chosen_outcome = chosen_outcome, None
    report.min_speedup = request.min_speedup
    too_slow = _too_slow(report, request, chosen_outcome, baseline)
    if chosen_outcome is not None and too_slow:
        report.stop_reason = f"min_speedup={request.min_speedup:g} not met ({report.speed_summary()})"
        fallback, chosen_outcome = chosen_outcome, None
    report.seconds = time.perf_counter() - started
    controlled = evaluator is not None
    report.met = (chosen_outcome is not None) if controlled or request.min_speedup else None
    if chosen_outcome is not None:
        report.chosen = chosen_outcome.chosen_index
    final = chosen_outcome or fallback
    report.metric_evaluations = int(measured) + sum(t.evaluations or 0 for t in report.trials)
    if final is not None:  # the FP32 layers of the model handed back, not of the other backends
        report.kept_fp32 = [k for k in report.kept_fp32 if k["backend"] == final.job.backend]
    if final is None:
        failed = [t for t in report.trials if t.failed]
        detail = "; ".join(f"{t.backend}/{t.precision}: {t.error}" for t in failed[-3:]) or report.stop_reason
        where = "every backend" if request.accelerator == "auto" else pairs[0][0]
        message = f"quantization failed ({where}): {detail}"
        report.seconds, report.met = time.perf_counter() - started, False
        report.stop_reason = report.stop_reason or message
        raise QuantizationFailed(message, report)
    _record_coverage(report, final)
    result = QuantizedModel(
        final.candidate, source, report=report,
        config=(final.chosen or final.best).config, backend=final.job.backend,
        workdir=workdir if own_workdir else None,
    )
    result._diagnoser = job_diagnoser(final.job)  # what QuantizedModel.diagnose needs
    loss, metrics = _compile_info(model) if not isinstance(model, (str, os.PathLike)) else (None, [])
    try:
        result.compile(loss=loss, metrics=metrics)
    except ValueError:
        result.compile(loss=loss)
    if too_slow:
        raise SpeedupNotMet(result, report, request.min_speedup)
    if controlled and chosen_outcome is None:
        raise AccuracyCriterionNotMet(result, report)
    return result


def _confirm_on_full_split(outcome: Any, report: Report, evaluator: Any, evaluation: Any,
                           reference: QuantizedModel, paired: PairedEvaluation | None = None) -> bool:
    """``trial_evaluation='sequential'``: the chosen model's metric on the whole split, once (what the
    report, the blessing and the Evaluator's bounds use), judged exactly. An early pass is a
    ``confidence`` decision: when the exact one disagrees, nothing is chosen."""
    record = report.trials[outcome.chosen_index]
    if not record.sequential or record.sequential.get("decided") != "early-pass":
        return True
    if paired is not None and paired.needs_artifact and record.artifact_dir:
        # sharded out of process (the Quantizer's Beam evaluator): one pass over the whole split
        record.metric = paired.whole_split_metric(TrialModel(
            run=outcome.candidate.run, artifact_dir=record.artifact_dir, backend=outcome.job.backend,
            options=outcome.job.options))
    else:
        model = QuantizedModel(outcome.candidate, reference)
        record.metric = evaluator.evaluate(outcome.candidate.run, evaluation, model=model)
    record.evaluations = (record.evaluations or 0) + 1
    crit = report.criterion and AccuracyCriterion.parse(report.criterion)
    record.passed = bool(crit and crit.met(report.baseline, record.metric))
    if not record.passed:
        report.stop_reason = (f"the early pass of trial {record.index} did not hold on the whole split "
                              f"({record.metric:.6g})")
    return record.passed


def _record_coverage(report: Report, final: Any) -> None:
    """The returned model's INT8 coverage and precision into the report: its trial's record
    (chosen, or the best one returned without meeting the criterion)."""
    index = final.chosen_index if final.chosen is not None else final.best_index
    trial = report.trials[index] if index is not None else None
    report.int8_ops = trial.int8_ops if trial is not None else None
    report.result_precision = trial_precision(final.job.precision, (final.chosen or final.best).config)
    report.result_backend = final.job.backend


def measure_baseline(evaluator: Any, source: SavedModelSource, evaluation: Any,
                     reference: QuantizedModel | None = None) -> float:
    """The FP32 metric, refused at once when it is not a finite number (no search is run on it)."""
    if reference is None:
        from nano_tfx.backends.tf_reference import TFSignatureCandidate

        reference = QuantizedModel(TFSignatureCandidate(source), source)
    value = evaluator.evaluate(reference.run, evaluation, model=reference)
    return check_metric_value(value, evaluator.name, "the FP32 model", evaluator.argument)


def _best_of(outcomes: list, criterion: AccuracyCriterion | None) -> Any:
    """The outcome whose best trial scores highest (what AccuracyCriterionNotMet carries)."""
    usable = [o for o in outcomes if o.best is not None and o.candidate is not None]
    if not usable:
        return None
    hib = criterion.higher_is_better if criterion else True

    def score(o):
        m = o.best.metric
        return float("-inf") if m is None else (m if hib else -m)

    return max(usable, key=score)


def _timing_inputs(calib: Any, evaluation: Any) -> list | None:
    """One batch of model inputs to time with (calibration data, else evaluation data)."""
    for batches in ((calib.calibration() if calib is not None else None), evaluation):
        if batches is not None:
            for item in batches:
                return list(item if batches is not evaluation else item[0])
    return None


MIN_TIMING_S = 0.3


def _timing_budget_s(budget: Budget) -> float:
    """The final side-by-side timing's seconds: the default, shrunk to what ``timeout`` leaves
    (never below a floor that still gives a few rounds: the returned model's speed is reported)."""
    left = budget.seconds_left()
    return DEFAULT_BUDGET_S if left is None else min(DEFAULT_BUDGET_S, max(MIN_TIMING_S, left))


def _fastest(finalists: list, fallback: Any, report: Report, reference: QuantizedModel,
             inputs: list | None, batch: int, budget_s: float = DEFAULT_BUDGET_S,
             call_path: CallPath | None = None) -> Any:
    """Time FP32 and the finalists (or, none passing, the model returned anyway) side by side;
    the fastest finalist is chosen (``accelerator='auto'``) and ``report`` gets the speed.

    Each trial timed itself right after it was built, minutes apart and under whatever load the
    machine had then, so the comparison that decides is made here, in one process through the
    returned model's call path (``nano_tfx.speed``). With a ``call_path`` (how the deployed model
    is called) and several finalists, the finalists are timed again through it, and that decides:
    engines that are this close model-only can swap places once other work runs between their
    calls (measured: OpenVINO's threads go idle through a server's tf.Transform, ONNX Runtime's
    do not, and the model-only order flipped when served).
    """
    timed = finalists or ([fallback] if fallback is not None else [])
    if inputs is None or not timed:
        return finalists[0] if finalists else None

    def index(o):
        return o.chosen_index if o.chosen is not None else o.best_index

    served = call_path is not None and len(finalists) > 1
    runs = {"fp32": reference.run}
    runs.update({f"trial {index(o)}": QuantizedModel(o.candidate, reference).run for o in timed})
    runs.update(_engine_fp32_runs(timed, reference))
    speed = side_by_side(runs, inputs, batch=batch, budget_s=budget_s / 2 if served else budget_s)
    report.side_by_side = speed.to_dict()
    report.fp32_latency_ms = speed.b1_ms["fp32"]
    if len(finalists) > 1:
        report.selection_latency_ms = {o.chosen_index: speed.b1_ms[f"trial {o.chosen_index}"]
                                       for o in finalists}
    deciding = {index(o): speed.b1_ms[f"trial {index(o)}"] for o in timed}
    if served:
        deciding = _served_ms(finalists, reference, call_path, inputs, budget_s / 2)
        report.served_latency_ms = deciding
    pick = _pick(timed, deciding)
    report.speedup = speed.speedup("fp32", f"trial {index(pick)}")
    report.result_backend = pick.job.backend
    engine = engine_fp32_variant(pick.job.backend)
    report.engine_fp32_latency_ms = speed.b1_ms.get(engine)
    report.int8_gain = speed.speedup(engine, f"trial {index(pick)}")
    return pick if finalists else None


def _served_ms(finalists: list, reference: QuantizedModel, call_path: CallPath, inputs: list,
               budget_s: float) -> dict[int, float]:
    """{trial index: batch-1 ms} of the finalists timed side by side through ``call_path``."""
    models = {o.chosen_index: QuantizedModel(o.candidate, reference) for o in finalists}
    timer = getattr(call_path, "time_side_by_side", None)
    if timer is not None:  # the call path times the finalists itself (e.g. in a server-like process)
        ms = timer({f"trial {i}": m for i, m in models.items()}, budget_s)
        bad = [i for i in models if not _positive_ms(ms.get(f"trial {i}") if isinstance(ms, Mapping) else None)]
        if bad:
            raise ValueError(f"call_path: expected time_side_by_side to return {{name: ms > 0}} for every "
                             f"finalist, got {ms!r}")
        return {i: float(ms[f"trial {i}"]) for i in models}
    runs = {i: call_path(m) for i, m in models.items()}
    for index, run in runs.items():
        if not callable(run):
            raise ValueError(f"call_path: expected it to return a callable for trial {index}, got "
                             f"{type(run).__name__}")
    speed = side_by_side({f"trial {i}": run for i, run in runs.items()}, inputs, budget_s=budget_s)
    return {i: speed.b1_ms[f"trial {i}"] for i in runs}


def _positive_ms(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


#: finalists this close to the fastest (side-by-side repeat noise on small models) count as tied
RUNG_TIE = 0.05


def _pick(timed: list, ms: dict) -> Any:
    """The fastest outcome; among those within ``RUNG_TIE`` of it, the rung nearest FP32 (the
    precision ladder: the same speed for less accuracy risk). One precision: simply the fastest."""
    def index(o):
        return o.chosen_index if o.chosen is not None else o.best_index

    fastest = min(timed, key=lambda o: ms[index(o)])
    rungs = {trial_precision(o.job.precision, (o.chosen or o.best).config) for o in timed}
    if len(rungs) < 2:
        return fastest
    near = [o for o in timed if ms[index(o)] <= ms[index(fastest)] * (1 + RUNG_TIE)]
    rank = {r: i for i, r in enumerate(RUNGS)}
    return max(near, key=lambda o: (rank.get(trial_precision(o.job.precision, (o.chosen or o.best).config), 0),
                                    -ms[index(o)]))


def _engine_fp32_runs(timed: list, reference: QuantizedModel) -> dict:
    """One "<backend> fp32" variant per engine among ``timed``: the engine's own FP32 model, timed
    in the same run as the trials so ``report.int8_gain`` (what INT8 adds over the engine) comes
    from the same timer as ``report.speedup`` (what the whole swap buys over TensorFlow)."""
    runs: dict = {}
    for o in timed:
        name = engine_fp32_variant(o.job.backend)
        if name not in runs:
            candidate = engine_fp32(o.job)
            if candidate is not None:
                runs[name] = QuantizedModel(candidate, reference).run
    return runs


def _too_slow(report: Report, request: QuantizationRequest, chosen: Any, baseline: float | None) -> bool:
    """Whether the speed gate is what fails the call: the chosen model is slower than the bar
    side by side, or nothing was chosen although some trial met the accuracy bar (per-trial gate)."""
    bar = request.min_speedup
    if not bar:
        return False
    if chosen is not None:
        return report.speedup is None or report.speedup < bar
    crit = request.criterion
    return crit is not None and baseline is not None and any(
        not t.failed and t.metric is not None and crit.met(baseline, t.metric) for t in report.trials)
