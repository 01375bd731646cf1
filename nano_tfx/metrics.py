"""Every way a user can say "how good is this model" → one ``Evaluator``.

Supported: a Keras metric object (Keras 3 or tf_keras; reset before each evaluation, called as
``update_state(y_true, y_pred)``), a Keras metric name, a torchmetrics-style object
(``update(preds, target)``/``compute()``/``reset()``, duck-typed), a plain callable
``f(y_true, y_pred) -> float`` (called once over all predictions), or ``eval_func(model) -> float``.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Sequence

import numpy as np

RunFn = Callable[[Sequence[np.ndarray]], list]


def _outputs(outs: list) -> Any:
    return outs[0] if len(outs) == 1 else outs


def check_metric_value(value: Any, name: str, what: str, argument: str = "metric") -> float:
    """``value`` as a finite float, or a ``ValueError`` naming the argument that produced it."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes)):
        raise ValueError(f"{argument}: {name!r} must return a number for {what}, got {value!r}")
    try:
        number = float(np.asarray(value).reshape(()))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{argument}: {name!r} must return a scalar number for {what}, got {value!r}") from err
    if not np.isfinite(number):
        raise ValueError(f"{argument}: {name!r} is {number} for {what}; it must be a finite number")
    return number


class Evaluator(abc.ABC):
    name: str = "metric"
    needs_labels: bool = True
    argument: str = "metric"  # the user's argument this evaluator came from (for messages)

    @abc.abstractmethod
    def evaluate(self, run: RunFn, data: Any, model: Any = None) -> float:
        """Metric of ``run`` over ``data`` (``ModelBatches``); ``model`` is the user-facing object."""


class _BatchMetric(Evaluator):
    """Shared loop for stateful metrics: reset, update per batch, read the result."""

    def evaluate(self, run: RunFn, data: Any, model: Any = None) -> float:
        self.reset()
        seen = False
        for xs, y in data:
            if y is None:
                raise ValueError(
                    f"metric: {self.name!r} needs labels, but the evaluation data has none; "
                    "give (x, y) elements"
                )
            self.update(y, _outputs(run(xs)))
            seen = True
        if not seen:
            raise ValueError("calib_dataset: the evaluation data is empty")
        return float(np.asarray(self.result()))

    @abc.abstractmethod
    def reset(self) -> None: ...

    @abc.abstractmethod
    def update(self, y_true: Any, y_pred: Any) -> None: ...

    @abc.abstractmethod
    def result(self) -> Any: ...


class KerasMetric(_BatchMetric):
    """A Keras metric object. Pickles by config so trials can run on Beam workers."""

    def __init__(self, metric: Any):
        self.metric = metric
        self.name = getattr(metric, "name", type(metric).__name__)

    def reset(self) -> None:
        (getattr(self.metric, "reset_state", None) or self.metric.reset_states)()

    def update(self, y_true: Any, y_pred: Any) -> None:
        self.metric.update_state(y_true, y_pred)

    def result(self) -> Any:
        value = self.metric.result()
        return value.numpy() if hasattr(value, "numpy") else value

    def __getstate__(self):
        module = type(self.metric).__module__
        flavor = "tf_keras" if module.startswith("tf_keras") else "keras"
        return {"flavor": flavor, "cls": type(self.metric).__name__, "config": self.metric.get_config(), "name": self.name}

    def __setstate__(self, state):
        import importlib

        keras = importlib.import_module(state["flavor"])
        cls = getattr(keras.metrics, state["cls"])
        self.metric = cls.from_config(state["config"])
        self.name = state["name"]


class TorchStyleMetric(_BatchMetric):
    """``update(preds, target)`` / ``compute()`` / ``reset()`` — torchmetrics' protocol. Arrays
    are handed over as numpy, or as torch tensors when the object is a torchmetrics metric."""

    def __init__(self, metric: Any):
        self.metric = metric
        self.name = type(metric).__name__.lower()
        self._torch = type(metric).__module__.startswith("torchmetrics")

    def _convert(self, value: Any) -> Any:
        if not self._torch:
            return value
        import torch  # only when the user's own metric is a torchmetrics object

        if isinstance(value, (list, tuple)):
            return [torch.as_tensor(np.asarray(v)) for v in value]
        return torch.as_tensor(np.asarray(value))

    def reset(self) -> None:
        self.metric.reset()

    def update(self, y_true: Any, y_pred: Any) -> None:
        target = np.asarray(y_true)
        if self._torch and target.ndim > 1 and target.shape[-1] == 1:
            target = target.reshape(target.shape[:-1])
        self.metric.update(self._convert(y_pred), self._convert(target))

    def result(self) -> Any:
        value = self.metric.compute()
        return value.detach().cpu().numpy() if hasattr(value, "detach") else value


class CallableMetric(Evaluator):
    """``f(y_true, y_pred) -> float`` over the whole evaluation set (exact for any metric;
    holds only labels and predictions, not inputs)."""

    def __init__(self, fn: Callable[[Any, Any], float]):
        self.fn = fn
        self.name = getattr(fn, "__name__", "metric")

    def evaluate(self, run: RunFn, data: Any, model: Any = None) -> float:
        ys, preds = [], []
        for xs, y in data:
            if y is None:
                raise ValueError(f"metric: {self.name!r} needs labels, but the evaluation data has none")
            ys.append(y)
            preds.append(run(xs))
        if not ys:
            raise ValueError("calib_dataset: the evaluation data is empty")
        from nano_tfx.data import _concat

        y_true = _concat(ys)
        outs = [np.concatenate([p[i] for p in preds]) for i in range(len(preds[0]))]
        return float(self.fn(y_true, _outputs(outs)))


class AccuracyMetric(_BatchMetric):
    """``'accuracy'`` decided per batch like Keras' compile does: categorical when labels are
    one-hot, sparse when they are class ids, binary for a single output column."""

    def __init__(self, name: str = "accuracy"):
        self.name = name
        self.correct = 0
        self.total = 0

    def reset(self) -> None:
        self.correct, self.total = 0, 0

    def update(self, y_true: Any, y_pred: Any) -> None:
        y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
        if y_pred.ndim >= 2 and y_pred.shape[-1] > 1:
            pred = y_pred.argmax(-1)
            true = y_true.argmax(-1) if y_true.shape == y_pred.shape else y_true.reshape(pred.shape)
        else:
            pred = (y_pred.reshape(-1) > 0.5).astype(np.int64)
            true = y_true.reshape(-1)
        self.correct += int(np.sum(pred == true))
        self.total += int(pred.size)

    def result(self) -> Any:
        return self.correct / max(self.total, 1)


class EvalFunc(Evaluator):
    """``eval_func(model) -> float``: the user runs their own evaluation on our model object."""

    needs_labels = False
    argument = "eval_func"

    def __init__(self, fn: Callable[[Any], float]):
        self.fn = fn
        self.name = getattr(fn, "__name__", "eval_func")

    def evaluate(self, run: RunFn, data: Any, model: Any = None) -> float:
        value = self.fn(model)
        if isinstance(value, bool) or value is None or isinstance(value, (str, bytes)):
            raise ValueError(f"eval_func: {self.name!r} must return a number, got {value!r}")
        try:
            return float(np.asarray(value).reshape(()))
        except (TypeError, ValueError) as err:
            raise ValueError(f"eval_func: {self.name!r} must return a scalar number, got {value!r}") from err


def make_evaluator(metric: Any = None, eval_func: Callable | None = None, flavor: str | None = None) -> Evaluator | None:
    """Turn the user's ``metric`` / ``eval_func`` into an ``Evaluator`` (None when neither)."""
    if metric is not None and eval_func is not None:
        raise ValueError("metric: give either metric or eval_func, not both")
    if eval_func is not None:
        if not callable(eval_func):
            raise ValueError(f"eval_func: expected a callable eval_func(model) -> float, got {eval_func!r}")
        return EvalFunc(eval_func)
    if metric is None:
        return None
    if isinstance(metric, Evaluator):
        return metric
    if isinstance(metric, str):
        if metric.lower() in ("accuracy", "acc"):
            return AccuracyMetric(metric)
        import importlib

        keras = importlib.import_module("tf_keras" if flavor == "tf_keras" else "keras")
        try:
            obj = keras.metrics.get(metric)
        except ValueError as err:
            raise ValueError(f"metric: unknown Keras metric name {metric!r}") from err
        if isinstance(obj, type):
            obj = obj()
        if not hasattr(obj, "update_state"):
            obj = keras.metrics.MeanMetricWrapper(obj, name=metric)
        return KerasMetric(obj)
    if hasattr(metric, "update_state") and hasattr(metric, "result"):
        return KerasMetric(metric)
    if all(hasattr(metric, a) for a in ("update", "compute", "reset")):
        return TorchStyleMetric(metric)
    if callable(metric):
        return CallableMetric(metric)
    raise ValueError(
        "metric: expected a Keras metric, a metric name, an object with update/compute/reset, "
        f"or a callable f(y_true, y_pred) -> float; got {type(metric).__name__}"
    )
