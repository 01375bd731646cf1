"""Calibration / evaluation data → a re-iterable stream of numpy batches fitted to the model.

Accepted: ``tf.data.Dataset`` (batched or not, ``x`` or ``(x, y[, w])`` elements), numpy arrays
or tensors (``x`` or an ``(x, y)`` tuple, or the ``x=``/``y=`` pair), generator functions, one-shot
generators/iterators (spooled to disk on the first pass, never held in memory) and ready
``BatchSource`` objects (e.g. the TFX component's TFRecord reader). Every batch comes out as
``(inputs, labels)``: ``inputs`` a list in the model's input order, cast to the model's dtypes
and shape-checked; ``labels`` whatever the data carried (or None).
"""
from __future__ import annotations

import abc
import os
import shutil
import tempfile
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from nano_tfx.backends.base import CalibrationData
from nano_tfx.interchange import TensorInfo

Batch = tuple[list, Any]  # (inputs as a list or raw structure, labels or None)


class BatchSource(abc.ABC):
    """A re-iterable source of ``(x, y)`` batches. Subclass it for custom readers (picklable
    subclasses let trials run on Beam workers). ``x`` may be an array, a list/tuple of arrays
    in input order, or a dict keyed by input name; ``y`` may be None."""

    #: whether batches already have a batch dimension
    batched: bool = True

    @abc.abstractmethod
    def batches(self) -> Iterator[Batch]:
        ...


def _to_numpy(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_numpy(v) for v in value)
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        return value.numpy()
    return np.asarray(value)


def _split_element(element: Any) -> Batch:
    """Keras' convention: a tuple is ``(x, y[, sample_weight])``; anything else is ``x``."""
    if isinstance(element, tuple):
        if len(element) == 1:
            return element[0], None
        if len(element) in (2, 3):
            return element[0], element[1]
        raise ValueError(
            f"calib_dataset: elements must be x, (x,), (x, y) or (x, y, sample_weight); "
            f"got a tuple of {len(element)}"
        )
    return element, None


class _DatasetSource(BatchSource):
    def __init__(self, dataset: Any, batched: bool):
        self.dataset = dataset
        self.batched = batched

    def batches(self) -> Iterator[Batch]:
        for element in self.dataset.as_numpy_iterator():
            yield _split_element(element)


class _ArraySource(BatchSource):
    """In-memory arrays sliced lazily (views, no copies) into batches."""

    batched = True

    def __init__(self, x: Any, y: Any, batch: int):
        self.x, self.y, self.batch = _to_numpy(x), _to_numpy(y), batch
        first = _flat(self.x)
        if not first:
            raise ValueError("calib_dataset: no input arrays given")
        self.n = len(first[0])

    def batches(self) -> Iterator[Batch]:
        for i in range(0, self.n, self.batch):
            sl = slice(i, i + self.batch)
            yield _map_struct(lambda a: a[sl], self.x), _map_struct(lambda a: a[sl], self.y)


class _CallableSource(BatchSource):
    """A generator *function*: called again for every pass."""

    def __init__(self, fn: Callable[[], Iterable], batched: bool | None):
        self.fn = fn
        self.batched = True if batched is None else batched

    def batches(self) -> Iterator[Batch]:
        for element in self.fn():
            yield _split_element(element)


class SpooledSource(BatchSource):
    """A one-shot iterator, teed to disk: every element read from it is written to a spool
    folder, and each pass first replays the spooled elements, then goes on pulling from the live
    iterator. A pass that stops early (the first-batch check, a ``sample_size`` cap) loses
    nothing, an endless generator is only read as far as needed, and memory stays at one element.
    The folder is removed with the source (or at interpreter exit)."""

    def __init__(self, iterator: Iterator, batched: bool | None):
        self.iterator = iterator
        self.batched = True if batched is None else batched
        self.dir: str | None = None
        self.count = 0
        self.exhausted = False

    def _spool(self, x: Any, y: Any) -> None:
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="nano_tfx_spool_")
            weakref.finalize(self, shutil.rmtree, self.dir, True)
        xs = np.empty((), dtype=object)
        xs[()] = x
        ys = np.empty((), dtype=object)
        ys[()] = y
        np.savez(os.path.join(self.dir, f"{self.count}.npz"), x=xs, y=ys)
        self.count += 1

    def batches(self) -> Iterator[Batch]:
        i = 0
        while True:
            if i < self.count:
                with np.load(os.path.join(self.dir, f"{i}.npz"), allow_pickle=True) as f:  # our own files
                    yield f["x"][()], f["y"][()]
            elif self.exhausted:
                return
            else:
                try:
                    element = next(self.iterator)
                except StopIteration:
                    self.exhausted = True
                    return
                x, y = _split_element(element)
                x, y = _to_numpy(x), _to_numpy(y)
                self._spool(x, y)
                yield x, y
            i += 1


def _flat(x: Any) -> list:
    if x is None:
        return []
    if isinstance(x, Mapping):
        return [v for v in x.values()]
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def _map_struct(fn: Callable, x: Any) -> Any:
    if x is None:
        return None
    if isinstance(x, Mapping):
        return {k: fn(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(fn(v) for v in x)
    return fn(x)


def _concat(parts: list) -> Any:
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, Mapping):
        return {k: np.concatenate([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(np.concatenate([p[i] for p in parts]) for i in range(len(first)))
    return np.concatenate(parts)


def _num_rows(x: Any) -> int:
    return len(_flat(x)[0])


class ModelBatches:
    """The user's data fitted to one model: ordered, cast, shape-checked, re-batched, capped."""

    def __init__(
        self,
        source: BatchSource,
        inputs: Sequence[TensorInfo],
        batch: int | None = None,
        sample_size: int | None = None,
        argument: str = "calib_dataset",
        check_finite: bool = False,
    ):
        self.source = source
        self.inputs = tuple(inputs)
        self.batch = batch
        self.sample_size = sample_size
        self.argument = argument
        #: refuse NaN/inf inputs (calibration and evaluation data; not predict/evaluate)
        self.check_finite = check_finite
        self._tally: dict[str, int] | None = None  # scan(): count over the whole stream first

    def _nonfinite_error(self, counts: Mapping[str, int]) -> ValueError:
        where = ", ".join(f"input {name!r} holds {n} non-finite value(s)" for name, n in counts.items())
        return ValueError(
            f"{self.argument}: {where} (NaN/inf); quantization would calibrate or evaluate on them - "
            "drop or clean those samples first"
        )

    # -- fitting one element ---------------------------------------------------------------
    def _order(self, x: Any) -> list[np.ndarray]:
        names = [t.name for t in self.inputs]
        if isinstance(x, Mapping):
            missing = [n for n in names if n not in x]
            if missing and len(x) == len(names):
                return [np.asarray(v) for v in x.values()]  # names differ, order matches
            if missing:
                raise ValueError(
                    f"{self.argument}: inputs {missing} missing from the data's dict keys {sorted(x)}"
                )
            return [np.asarray(x[n]) for n in names]
        arrays = [np.asarray(a) for a in _flat(x)]
        if len(arrays) != len(names):
            raise ValueError(
                f"{self.argument}: the model takes {len(names)} input(s) {names}, "
                f"the data gives {len(arrays)}"
            )
        return arrays

    def _fit(self, x: Any, batched: bool) -> list[np.ndarray]:
        out = []
        for info, a in zip(self.inputs, self._order(x)):
            if not batched:
                a = a[None, ...]
            want = info.shape
            if a.ndim != len(want) or any(
                w is not None and w != g for w, g in zip(want[1:], a.shape[1:])
            ):
                got = a.shape if batched else a.shape[1:]
                raise ValueError(
                    f"{self.argument}: input {info.name!r} expects shape {tuple(want)} (batch first), "
                    f"got data of shape {tuple(got)}"
                )
            if info.dtype != "object" and a.dtype != np.dtype(info.dtype):
                if a.dtype.kind in "OUSV" or (np.dtype(info.dtype).kind in "iub" and a.dtype.kind == "f"):
                    raise ValueError(
                        f"{self.argument}: input {info.name!r} expects dtype {info.dtype}, got {a.dtype}"
                    )
                a = a.astype(info.dtype)
            # tf.data and np.frombuffer hand out read-only arrays; engines that borrow the buffer
            # (OpenVINO's shared tensors) need it writeable and C-contiguous: copy only then.
            a = np.require(a, requirements=("C", "W")) if a.dtype != object else a
            if self.check_finite and a.dtype.kind == "f":
                bad = a.size - int(np.count_nonzero(np.isfinite(a)))
                if bad and self._tally is not None:
                    self._tally[info.name] = self._tally.get(info.name, 0) + bad
                elif bad:
                    raise self._nonfinite_error({info.name: bad})
            out.append(a)
        return out

    # -- iteration -------------------------------------------------------------------------
    def _raw(self) -> Iterator[tuple[list[np.ndarray], Any]]:
        batched = self.source.batched
        for x, y in self.source.batches():
            yield self._fit(x, batched), (y if batched or y is None else _map_struct(lambda a: np.asarray(a)[None], y))

    def __iter__(self) -> Iterator[tuple[list[np.ndarray], Any]]:
        """Yield ``(inputs, labels)`` batches, re-batched to ``batch`` and capped at ``sample_size``."""
        target = self.batch or (None if self.source.batched else 1)
        remaining = self.sample_size
        pending_x: list[list[np.ndarray]] = []
        pending_y: list[Any] = []
        pending = 0
        seen = False

        def emit(xs, ys):
            return [np.concatenate([p[i] for p in xs]) for i in range(len(xs[0]))], (
                None if ys[0] is None else _concat(ys)
            )

        for xs, y in self._raw():
            seen = True
            n = len(xs[0])
            if remaining is not None:
                if remaining <= 0:
                    break
                if n > remaining:
                    xs = [a[:remaining] for a in xs]
                    y = _map_struct(lambda a: a[:remaining], y)
                    n = remaining
                remaining -= n
            if target is None or (n == target and not pending):
                yield xs, y
                continue
            # re-batch: accumulate rows and cut exact ``target``-sized batches
            pending_x.append(xs)
            pending_y.append(y)
            pending += n
            while pending >= target:
                bx, by = emit(pending_x, pending_y)
                yield [a[:target] for a in bx], _map_struct(lambda a: a[:target], by)
                rest = pending - target
                pending_x = [[a[target:] for a in bx]] if rest else []
                pending_y = [_map_struct(lambda a: a[target:], by)] if rest else []
                pending = rest
        if pending:
            yield emit(pending_x, pending_y)
        if not seen:
            raise ValueError(f"{self.argument}: the data is empty")

    def check(self) -> tuple[list[np.ndarray], Any]:
        """Read the first batch (raises the shape/dtype/empty ``ValueError`` early)."""
        for batch in self:
            return batch
        raise ValueError(f"{self.argument}: the data is empty")

    def has_labels(self) -> bool:
        return self.check()[1] is not None

    def with_options(self, batch: int | None = None, sample_size: int | None = None) -> "ModelBatches":
        return ModelBatches(self.source, self.inputs, batch, sample_size, self.argument, self.check_finite)

    def scan(self) -> int:
        """Read every batch once (shape, dtype and, with ``check_finite``, NaN/inf errors up
        front, before any backend work); returns the number of samples."""
        self._tally = {} if self.check_finite else None
        try:
            total = sum(len(xs[0]) for xs, _ in self)
            tally = self._tally
        finally:
            self._tally = None
        if tally:
            raise self._nonfinite_error(tally)
        if total == 0:
            raise ValueError(f"{self.argument}: the data is empty")
        return total

    def calibration(self, batch: int = 32) -> "InputBatches":
        """Inputs only, for calibration. Unbatched data is grouped ``batch`` at a time: the
        statistics are the same, the passes are far fewer."""
        if self.source.batched or self.batch:
            return InputBatches(self)
        size = min(batch, self.sample_size or batch)
        return InputBatches(ModelBatches(self.source, self.inputs, size, self.sample_size, self.argument,
                                         self.check_finite))


class InputBatches(CalibrationData):
    """What backends calibrate on: inputs only, already capped at ``sample_size``."""

    def __init__(self, batches: ModelBatches):
        self._batches = batches
        self.num_samples = batches.sample_size
        self.batch_size = batches.batch or len(batches.check()[0][0])

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        for xs, _ in self._batches:
            yield xs


def _is_dataset(value: Any) -> bool:
    return type(value).__module__.startswith("tensorflow") and hasattr(value, "element_spec")


def _dataset_batched(dataset: Any, inputs: Sequence[TensorInfo], argument: str) -> bool:
    import tensorflow as tf

    x_spec, _ = _split_element(dataset.element_spec)
    flat = tf.nest.flatten(x_spec)
    if not flat:
        raise ValueError(f"{argument}: the dataset's elements carry no input tensors")
    rank = flat[0].shape.rank
    want = len(inputs[0].shape)
    if rank == want:
        return True
    if rank == want - 1:
        return False
    raise ValueError(
        f"{argument}: input {inputs[0].name!r} expects shape {tuple(inputs[0].shape)} (batch first), "
        f"the dataset's elements have shape {tuple(flat[0].shape)}"
    )


def make_batches(
    data: Any,
    inputs: Sequence[TensorInfo],
    y: Any = None,
    batch: int | None = None,
    sample_size: int | None = None,
    argument: str = "calib_dataset",
    check_finite: bool = False,
) -> ModelBatches:
    """Adapt any supported data object to ``ModelBatches`` for a model with ``inputs``."""
    if data is None:
        raise ValueError(f"{argument}: calibration data is required (a tf.data.Dataset, arrays or a generator)")
    if isinstance(data, ModelBatches):
        return ModelBatches(data.source, inputs, batch or data.batch, sample_size, argument, check_finite)
    if isinstance(data, BatchSource):
        source = data
    elif _is_dataset(data):
        if y is not None:
            raise ValueError(f"y: not allowed when {argument} is a tf.data.Dataset (it carries its labels)")
        source = _DatasetSource(data, _dataset_batched(data, inputs, argument))
    elif callable(data) and not hasattr(data, "shape"):
        source = _CallableSource(data, None)
    elif isinstance(data, Iterator):
        source = SpooledSource(data, None)
    else:
        x = data
        if y is None and isinstance(data, tuple) and len(data) == 2 and (
            len(inputs) == 1 or isinstance(data[0], (Mapping, list, tuple))
        ):
            x, y = data  # (x, y); a multi-input model's x is a dict or a list of arrays
        try:
            source = _ArraySource(x, y, batch or 1)
        except (TypeError, IndexError) as err:
            raise ValueError(
                f"{argument}: expected a tf.data.Dataset, numpy arrays/tensors, (x, y), or a generator; "
                f"got {type(data).__name__}"
            ) from err
        if source.n == 0:
            raise ValueError(f"{argument}: the data is empty")
        if y is not None and _num_rows(_to_numpy(y)) != source.n:
            raise ValueError(f"y: has {_num_rows(_to_numpy(y))} rows but x has {source.n}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch: expected a positive int, got {batch!r}")
    if sample_size is not None and (isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1):
        raise ValueError(f"sample_size: expected a positive int, got {sample_size!r}")
    return ModelBatches(source, inputs, batch, sample_size, argument, check_finite)
