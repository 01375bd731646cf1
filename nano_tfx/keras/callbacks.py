"""``QuantizationCallback``: quantize during ``fit``, log INT8 quality, keep the best INT8 model.

Works with Keras 3 and tf_keras ``fit`` alike (it speaks both callback protocols) and calls the
same ``nano_tfx.quantize`` as everything else.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Mapping

import keras

from nano_tfx.api import quantize as _quantize
from nano_tfx.criterion import AccuracyCriterion
from nano_tfx.errors import AccuracyCriterionNotMet
from nano_tfx.progress import ProgressLine, as_hooks
from nano_tfx.result import QuantizedModel
from nano_tfx.timing import latency_ms, rows

log = logging.getLogger("nano_tfx")

_QUANTIZE_KWARGS = set(inspect.signature(_quantize).parameters) - {
    "model", "calib_dataset", "metric", "accuracy_criterion", "eval_dataset", "x", "y"}


def _has_labels(data: Any) -> bool:
    """Whether data carries labels, judged from its structure (no iteration)."""
    spec = getattr(data, "element_spec", None)
    if spec is not None:
        return isinstance(spec, tuple) and len(spec) >= 2
    return isinstance(data, tuple) and len(data) == 2


class QuantizationCallback(keras.callbacks.Callback):
    """Quantize the model being trained at chosen epochs.

    Args:
        calib_dataset: calibration data (any form ``nano_tfx.quantize`` accepts).
        validation_data: labelled data for the INT8 metric (default: ``calib_dataset``).
        metric: metric to track; default: the model's compiled loss/metrics.
        accuracy_criterion: the seed's criterion dict; with it, tuning is accuracy-controlled and
            ``int8_criterion_met`` is logged.
        every_n_epochs: None = once, at the end of training; k = every k-th epoch and at the end.
        save_path: where the kept model is saved (atomically replaced; ``nano_tfx.load``-able).
        save_best_only: keep the best INT8 metric instead of the latest.
        **quantize_kwargs: any other ``nano_tfx.quantize`` argument (accelerator, precision, ...).
            ``verbose`` (default 1 here) writes one line per trial and one per quantization
            point, through the same ``on_trial_end`` hook as ``quantize(verbose=1)``; 0 is silent.

    Logs, at each quantization point, ``int8_<metric>`` (``int8_loss``/``int8_<compiled metric>``
    without ``metric``), ``int8_criterion_met`` (1.0/0.0, with a criterion) and
    ``int8_latency_ms``, ``int8_speedup`` (FP32 ms ÷ INT8 ms at batch 1, timed side by side;
    with ``min_speedup=`` in ``quantize_kwargs`` a slower model counts as not meeting the bar,
    ``int8_criterion_met`` = 0.0) and ``int8_gain`` (the same engine's FP32 ms ÷ INT8 ms, timed
    in the same run; NaN when not timed). After ``fit``: ``quantized_model``, ``best_epoch``, ``history``.
    """

    def __init__(self, calib_dataset: Any, validation_data: Any = None, metric: Any = None,
                 accuracy_criterion: Mapping[str, Any] | None = None, every_n_epochs: int | None = None,
                 save_path: str | None = None, save_best_only: bool = False, **quantize_kwargs: Any):
        super().__init__()
        if calib_dataset is None:
            raise ValueError("calib_dataset: QuantizationCallback needs calibration data")
        if every_n_epochs is not None and (
            isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1
        ):
            raise ValueError(f"every_n_epochs: expected None or an int >= 1, got {every_n_epochs!r}")
        self.criterion = AccuracyCriterion.parse(accuracy_criterion)
        if self.criterion is not None and metric is None and quantize_kwargs.get("eval_func") is None:
            raise ValueError("accuracy_criterion: needs a metric (or eval_func) to measure accuracy with")
        labelled = validation_data if validation_data is not None else calib_dataset
        if metric is not None and not _has_labels(labelled):
            raise ValueError(
                "validation_data: a metric needs labelled data; pass validation_data=(x, y) or a "
                "calib_dataset with (x, y) elements"
            )
        unknown = set(quantize_kwargs) - _QUANTIZE_KWARGS
        if unknown:
            raise ValueError(f"quantize_kwargs: unknown quantize() arguments {sorted(unknown)}")
        if save_best_only and save_path is None:
            log.info("QuantizationCallback: save_best_only without save_path keeps the best model in memory")
        # check accelerator/precision/... now, not mid-training: the engine's own validation
        from nano_tfx.api import QuantizationRequest

        shared = set(inspect.signature(QuantizationRequest.from_kwargs).parameters)
        QuantizationRequest.from_kwargs(
            has_metric=metric is not None or quantize_kwargs.get("eval_func") is not None,
            accuracy_criterion=accuracy_criterion,
            **{k: v for k, v in quantize_kwargs.items() if k in shared},
        )
        self.calib_dataset = calib_dataset
        self.validation_data = validation_data
        self.metric = metric
        self.every_n_epochs = every_n_epochs
        self.save_path = save_path
        self.save_best_only = save_best_only
        self.verbose = quantize_kwargs.pop("verbose", 1)
        self._user_hooks = as_hooks(quantize_kwargs.pop("on_trial_end", None))
        self.quantize_kwargs = quantize_kwargs
        self.quantized_model: QuantizedModel | None = None
        self.best_epoch: int | None = None
        self.best_value: float | None = None
        self.history: list[dict] = []
        self._last_done_epoch: int | None = None
        self._last_epoch: int | None = None

    # -- tf_keras' CallbackList asks these of every callback --------------------------------
    _supports_tf_logs = False

    def _implements_train_batch_hooks(self) -> bool:
        return False

    def _implements_test_batch_hooks(self) -> bool:
        return False

    def _implements_predict_batch_hooks(self) -> bool:
        return False

    def set_model(self, model: Any) -> None:  # tf_keras models are not Keras 3 models
        self._nano_model = model

    @property
    def model(self) -> Any:
        return getattr(self, "_nano_model", None)

    # -- the work ---------------------------------------------------------------------------
    def _due(self, epoch: int) -> bool:
        last = (self.params or {}).get("epochs")
        is_last = last is not None and epoch + 1 >= last
        return is_last or (self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._last_epoch = epoch
        if self._due(epoch):
            self._quantize_now(epoch, logs if logs is not None else {})

    def on_train_end(self, logs: dict | None = None) -> None:
        # Training stopped early (EarlyStopping, …): still deliver a model of the final weights.
        if self._last_epoch is not None and self._last_done_epoch != self._last_epoch:
            self._quantize_now(self._last_epoch, {})

    def _better(self, value: float | None) -> bool:
        if value is None:
            return self.best_value is None
        if self.best_value is None:
            return True
        hib = self.criterion.higher_is_better if self.criterion else _higher_is_better(self._metric_key)
        return value > self.best_value if hib else value < self.best_value

    def _quantize_now(self, epoch: int, logs: dict) -> None:
        accel = self.quantize_kwargs.get("accelerator") or "inc"
        prec = self.quantize_kwargs.get("precision", "int8")
        progress = ProgressLine(prefix=f"QuantizationCallback: epoch {epoch + 1}: ",
                                max_trials=self.quantize_kwargs.get("max_trials"))
        hooks = ([progress] if self.verbose else []) + self._user_hooks
        if self.verbose:
            progress.say(f"{progress.prefix}quantizing to {prec} with {accel} ...")
        met = None
        try:
            q = _quantize(self.model, calib_dataset=self.calib_dataset, metric=self.metric,
                          accuracy_criterion=self.criterion.to_dict() if self.criterion else None,
                          eval_dataset=self.validation_data, on_trial_end=hooks, **self.quantize_kwargs)
            met = True if self.criterion or self.quantize_kwargs.get("min_speedup") else None
        except AccuracyCriterionNotMet as err:
            q, met = err.best_model, False
        values = self._int8_metrics(q)
        rep = q.report
        lat = rep.fp32_latency_ms / rep.speedup if rep and rep.fp32_latency_ms and rep.speedup else None
        if lat is None:  # not timed side by side (no inputs to time with at quantize time)
            lat = rep.chosen_trial.latency_ms if rep and rep.chosen_trial else None
        if lat is None:
            first = next(iter(_first_inputs(q, self.calib_dataset)))
            lat = latency_ms(q.run, rows(first, 1))
        entry = {f"int8_{k}": v for k, v in values.items()}
        if met is not None:
            entry["int8_criterion_met"] = 1.0 if met else 0.0
        entry["int8_latency_ms"] = lat
        entry["int8_speedup"] = rep.speedup if rep and rep.speedup is not None else float("nan")
        # vs the same engine's FP32 (int8_speedup also counts the engine's gain over TensorFlow)
        entry["int8_gain"] = rep.int8_gain if rep and rep.int8_gain is not None else float("nan")
        logs.update(entry)
        # what the model runs in (precision='auto' picks a rung): in the history, not in Keras'
        # numeric logs; the int8_* keys keep their names whatever the rung
        self.history.append({"epoch": epoch + 1, **entry, "precision": q.precision})
        self._last_done_epoch = epoch
        key_value = values.get(self._metric_key) if values else None
        keep = not self.save_best_only or self._better(key_value)
        if keep:
            self.quantized_model = q
            self.best_epoch, self.best_value = epoch + 1, key_value
            if self.save_path:
                q.save(self.save_path)
        if self.verbose:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in entry.items())
            progress.say(f"{progress.prefix}{shown}" + (" (kept)" if keep else ""))

    @property
    def _metric_key(self) -> str | None:
        return getattr(self, "_key", None)

    def _int8_metrics(self, q: QuantizedModel) -> dict[str, float]:
        data = self.validation_data if self.validation_data is not None else self.calib_dataset
        if self.metric is not None:
            from nano_tfx.metrics import make_evaluator

            name = make_evaluator(self.metric).name
            values = q.evaluate(data, metric=self.metric, return_dict=True)
            self._key = name
            return {name: float(values[name])}
        if not _has_labels(data):
            return {}
        try:
            values = q.evaluate(data, return_dict=True)
        except ValueError:
            return {}
        # A compiled metric tracks quality better than the loss when there is one.
        self._key = next((k for k in values if k != "loss"), "loss")
        return {k: float(v) for k, v in values.items()}


def _higher_is_better(name: str | None) -> bool:
    return not (name and ("loss" in name or "error" in name))


def _first_inputs(q: QuantizedModel, data: Any):
    from nano_tfx.data import make_batches

    for xs, _ in make_batches(data, q.inputs, sample_size=1):
        yield xs
