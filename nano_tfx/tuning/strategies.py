"""Search strategies: given a backend's ``SearchSpace`` and what was tried, propose next configs.

All strategies start with the space's default (fully quantized, fastest settings) and never
propose a config twice. ``score`` of a finished trial is "higher is better" (the tuner flips the
sign of lower-is-better metrics, and for ``mse`` uses the negative output error).
"""
from __future__ import annotations

import itertools
import random
from typing import Iterator

import numpy as np

from nano_tfx.backends.base import SearchSpace, TrialConfig

History = list[tuple[TrialConfig, float | None]]  # (config, score or None when failed)


class Strategy:
    name = "base"

    def __init__(self, space: SearchSpace, seed: int = 0):
        self.space = space
        self.rng = random.Random(seed)
        self.tried: set[str] = set()

    def propose(self, history: History, n: int = 1) -> list[TrialConfig]:
        out: list[TrialConfig] = []
        for cfg in self._candidates(history):
            key = cfg.key()
            if key in self.tried:
                continue
            self.tried.add(key)
            out.append(cfg)
            if len(out) >= n:
                break
        return out

    def _candidates(self, history: History) -> Iterator[TrialConfig]:
        raise NotImplementedError

    # helpers
    def _knob_variants(self) -> Iterator[TrialConfig]:
        """Default, then each knob moved to each other value, one knob at a time."""
        base = dict(self.space.default().knobs)
        yield TrialConfig.make(base)
        for knob, values in self.space.knobs.items():
            for v in values[1:]:
                yield TrialConfig.make({**base, knob: v})

    @staticmethod
    def _best(history: History) -> tuple[TrialConfig, float] | None:
        scored = [(c, s) for c, s in history if s is not None]
        return max(scored, key=lambda cs: cs[1]) if scored else None


class BasicStrategy(Strategy):
    """Sensitivity-guided fallback (the default). The fully quantized default first; when it
    misses, the tuner diagnoses it (``Backend.diagnose``) and hands the ranking over with
    ``set_ranking``; then the worst layer goes to FP32, then the next one on top, cumulatively.
    Unless a step won back half of the remaining loss (the criterion's bound: ``set_target``),
    the tuner re-diagnoses it and the remaining layers are re-ranked. The next step takes
    twice as many layers after a step that did not help or won back less than a quarter of the
    remaining loss (1, 2, 4...: error spread over many layers, or culprits that only count
    together, are not found one layer per trial), one again after a step that won back half.
    Without a ranking (a backend that can't diagnose) the space's own fallback order is used.

    Once the steps have won back half of what full INT8 lost, what is left is the error every
    layer adds a little of, which a finer setting (8-bit weights, exact activation ranges)
    removes everywhere at once and a further FP32 layer only locally: the space's
    ``refinements`` are then tried on top of the best config, one per trial; one that helps is
    kept (later steps build on the best config), one that does not is dropped. Not before: with
    the culprit still quantized, exact ranges can wipe a whole layer (1000x outlier channel).
    The remaining single-knob variants come last.

    SmoothQuant before fallback: when the fully quantized trial misses and its diagnosis shows
    activation outlier channels (a MatMul input whose largest per-channel max |x| is
    ``OUTLIER_CHANNEL_RATIO`` times the median channel's), the space's ``smoothing`` changes
    (SmoothQuant alphas) are tried on the fully quantized config first, the next one only after
    one that helped without meeting the criterion: smoothing fixes every outlier-fed layer at
    once, where fallback takes them to FP32 one by one. A smoothing that helped is kept (later
    steps build on the best config); without outlier channels smoothing is left to the knob
    variants at the end (it costs an FP32 Mul per smoothed tensor where it can't be folded).

    ``SearchSpace.guided`` knob values replace the defaults for this strategy (OpenVINO turns
    NNCF's in-trial accuracy control off: the shared ranking replaces it)."""

    name = "basic"

    def __init__(self, space: SearchSpace, seed: int = 0):
        super().__init__(space, seed)
        self.ranking: list[str] | None = None
        self.diagnosed: set[str] = set()
        self.reasons: dict[str, dict] = {}
        self.groups: dict[str, list[str]] = {}  # layer -> fallback names that remove its error
        self.refined: set[str] = set()  # keys of refinement trials (never diagnosed)
        # fallback names in the order the ranking of the day chose them: within one step (which
        # the tuner credits as a whole) the diagnosis that picked it tells its layers apart
        self.picked: list[str] = []
        self._refinements_left = [dict(r) for r in space.refinements]
        self.outliers = False  # the first diagnosis saw activation outlier channels
        self.smoothing: set[str] = set()  # keys of smoothing trials (never diagnosed)
        self.target: float | None = None  # the criterion's bound, in score units
        self.noise = 0.0  # a gain at or below it is not evidence that a step helped

    def set_target(self, target: float, noise: float) -> None:
        """The score that meets the criterion, and the gain below which a step did not help."""
        self.target, self.noise = float(target), max(float(noise), 0.0)

    def base_knobs(self) -> dict:
        return {**dict(self.space.default().knobs), **dict(self.space.guided)}

    def wants_diagnosis(self, history: History) -> TrialConfig | None:
        """The config whose candidate should be (re-)diagnosed now, or None."""
        if not history:
            return None
        last, score = history[-1]
        if last.key() in self.diagnosed or last.key() in self.refined or last.key() in self.smoothing:
            # a refinement changes every layer a little, a smoothing every smoothed layer's input
            # (no longer comparable with FP32's): the ranking stands
            return None
        if self.ranking is None:
            return last
        # A step that won back half the loss leaves a ranking worth following. After a smaller
        # one the ranking is stale: behind a layer that wrecks the signal every later layer
        # looks bad, and only a fresh diagnosis shows which one is next.
        return None if self._won_back(history) >= 0.5 else last

    @staticmethod
    def _best_before(history: History) -> float | None:
        """The best score before the latest trial (None: nothing scored before it)."""
        return max((s for _, s in history[:-1] if s is not None), default=None)

    def _improved(self, history: History) -> bool:
        """The latest trial raised the best score by more than noise (the first trial, or the
        first one that scored at all, has nothing to beat)."""
        score, before = history[-1][1], self._best_before(history)
        return score is not None and (before is None or score > before + self.noise)

    def _recovered(self, history: History, best: float) -> bool:
        """The best score has won back at least half of what the first trial lost."""
        first = history[0][1]
        if first is None or self.target is None:
            return True  # full INT8 failed or collapsed: anything that scores is a recovery
        return best - first >= 0.5 * (self.target - first)

    def set_ranking(self, config: TrialConfig, layers: list[dict] | None) -> None:
        """Layers of ``config``'s candidate, worst first (None: diagnosis unavailable)."""
        self.diagnosed.add(config.key())
        if layers is None:
            if self.ranking is None:
                self.ranking = list(self.space.fallback_candidates)
            return
        allowed = set(self.space.fallback_candidates)
        if len(self.diagnosed) == 1:
            self.outliers = has_outlier_channels(layers)
        for row in layers:
            self.reasons.setdefault(row["name"], row)
            self.groups.setdefault(row["name"], [n for n in row.get("fallback") or [row["name"]]])
        ranked = [r["name"] for r in layers if r["name"] in allowed]
        self.ranking = ranked + [n for n in self.space.fallback_candidates if n not in ranked]

    def _refinement(self, history: History, best: tuple[TrialConfig, float]) -> TrialConfig | None:
        """The next refinement on top of the best config, when its time has come."""
        if len(history) < 2 or not self._refinements_left or not self._recovered(history, best[1]):
            return None
        if history[-1][0].key() not in self.refined and not self._improved(history):
            return None  # after a fallback step, only one that paid off
        knobs = dict(best[0].knobs)
        while self._refinements_left:
            change = self._refinements_left.pop(0)
            if all(knobs.get(k) == v for k, v in change.items()):
                continue  # already in effect
            cfg = TrialConfig.make({**knobs, **change}, best[0].fallback)
            if cfg.key() not in self.tried:
                self.refined.add(cfg.key())
                return cfg
        return None

    def _smoothing(self, history: History, base: dict) -> Iterator[TrialConfig]:
        """The space's smoothing changes on the fully quantized config, in order, while each one
        tried helped (see the class doc); nothing without outlier channels."""
        if not self.outliers:
            return
        scores = {c.key(): s for c, s in history}
        first = history[0][1] if history else None
        for change in self.space.smoothing:
            cfg = TrialConfig.make({**base, **change})
            key = cfg.key()
            if key not in self.tried:
                self.smoothing.add(key)
                yield cfg
                return
            score = scores.get(key)
            if key in scores and (score is None or first is not None and score <= first + self.noise):
                return  # it did not help: a stronger alpha won't either

    def _step_size(self, history: History) -> int:
        """Layers the next fallback step takes, replayed from the history's fallback steps:
        doubled after a step that did not help or won back less than a quarter of the remaining
        loss (slow progress: the error is spread over many layers), back to 1 after one that won
        back half or more."""
        step = 1
        for i in range(1, len(history)):
            cfg = history[i][0]
            if cfg.fallback and cfg.key() not in self.refined:
                won_back = self._won_back(history[:i + 1])
                step = 1 if won_back >= 0.5 else step * 2 if won_back < 0.25 else step
        return step

    def _won_back(self, history: History) -> float:
        """Share of the remaining loss (best before it -> target) the latest trial won back: 0
        when it did not help beyond noise, 1 when nothing tells (no target, nothing before)."""
        if not self._improved(history):
            return 0.0
        before = self._best_before(history)
        if self.target is None or before is None or self.target <= before:
            return 1.0
        return (history[-1][1] - before) / (self.target - before)

    def _candidates(self, history: History) -> Iterator[TrialConfig]:
        base = self.base_knobs()
        yield TrialConfig.make(base)
        if self.ranking is not None:
            yield from self._smoothing(history, base)
        allowed = set(self.space.fallback_candidates)
        while self.ranking is not None:
            scored = self._best(history)
            best = scored[0] if scored else TrialConfig.make(base)
            refined = self._refinement(history, scored) if scored else None
            if refined is not None:
                yield refined
                continue
            current = set(best.fallback)
            if history:
                current |= set(history[-1][0].fallback)
            size, step = self._step_size(history), []
            for name in self.ranking:
                if len(step) >= size:
                    break
                if name not in current and name not in step:
                    group = [n for n in self.groups.get(name, [name]) if n in allowed and n != name]
                    step += [name] + [n for n in group if n not in step]
            if not step:
                break
            cfg = TrialConfig.make(dict(best.knobs), sorted(current | set(step)))
            if cfg.key() in self.tried:
                break
            self.picked += [n for n in step if n not in self.picked]
            yield cfg
        scored = self._best(history)
        for cfg in self._knob_variants():
            yield TrialConfig.make(dict(cfg.knobs), scored[0].fallback if scored else ())


#: a MatMul input whose largest per-channel max |x| is this many times the median channel's has
#: activation outlier channels (LLM/BERT LayerNorm outputs: 20-100x; the diagnosis'
#: ``channel_ratio``)
OUTLIER_CHANNEL_RATIO = 20.0
_LINEAR_OPS = ("MatMul", "Gemm", "FullyConnected")


def has_outlier_channels(layers: list[dict] | None) -> bool:
    """Whether a diagnosis shows activation outlier channels at the input of a linear layer."""
    return any(
        any(k in str(row.get("op") or "") for k in _LINEAR_OPS)
        and (row.get("channel_ratio") or 0.0) >= OUTLIER_CHANNEL_RATIO
        for row in layers or ())


class OneByOneStrategy(Strategy):
    """The pre-0.2 ``basic`` (INC's): global knobs one at a time, then each op alone in FP32 on
    top of the best global setting, then accumulate the ops whose fallback helped most. One trial
    per op before accumulating; kept as ``_one_by_one`` for comparisons (benchmarks)."""

    name = "_one_by_one"

    def _candidates(self, history: History) -> Iterator[TrialConfig]:
        yield from self._knob_variants()
        best = self._best(history)
        base = dict((best[0] if best else self.space.default()).knobs)
        base_fb = tuple(best[0].fallback) if best else ()
        singles = [TrialConfig.make(base, base_fb + (op,)) for op in self.space.fallback_candidates]
        yield from singles
        # rank ops by the score their single fallback reached (unknown ones last, in space order)
        scores = {c.key(): s for c, s in history}
        ranked = sorted(
            self.space.fallback_candidates,
            key=lambda op: -(scores.get(TrialConfig.make(base, base_fb + (op,)).key()) or float("-inf")),
        )
        for k in range(2, len(ranked) + 1):
            yield TrialConfig.make(base, base_fb + tuple(ranked[:k]))


class MSEStrategy(OneByOneStrategy):
    """INC's 'mse': like basic, but ops are ranked by how much keeping them in FP32 reduces the
    model output's mean squared error against FP32 (the tuner scores trials by -MSE)."""

    name = "mse"


class ExhaustiveStrategy(Strategy):
    """Every knob combination × every fallback subset, smallest subsets first."""

    name = "exhaustive"

    def _candidates(self, history: History) -> Iterator[TrialConfig]:
        yield self.space.default()
        names = list(self.space.knobs)
        combos = list(itertools.product(*[self.space.knobs[k] for k in names])) or [()]
        ops = list(self.space.fallback_candidates)
        for size in range(0, len(ops) + 1):
            for subset in itertools.combinations(ops, size):
                for combo in combos:
                    yield TrialConfig.make(dict(zip(names, combo)), subset)


class RandomStrategy(Strategy):
    """Uniform samples of knobs, each op falling back with probability 1/4 (seeded)."""

    name = "random"

    def _sample(self) -> TrialConfig:
        knobs = {k: self.rng.choice(list(v)) for k, v in self.space.knobs.items() if v}
        fb = [op for op in self.space.fallback_candidates if self.rng.random() < 0.25]
        return TrialConfig.make(knobs, fb)

    def _space_size(self) -> int:
        size = 2 ** len(self.space.fallback_candidates)
        for v in self.space.knobs.values():
            size *= max(1, len(v))
        return size

    def _candidates(self, history: History) -> Iterator[TrialConfig]:
        yield self.space.default()
        misses = 0
        while misses < 50 * self._space_size() + 100:
            cfg = self._sample()
            if cfg.key() in self.tried:
                misses += 1
                continue
            yield cfg


class BayesianStrategy(RandomStrategy):
    """Gaussian-process expected improvement over a one-hot encoding of knobs and fallbacks,
    after a few random starts."""

    name = "bayesian"
    warmup = 3
    pool = 256

    def _encode(self, cfg: TrialConfig) -> list[float]:
        vec: list[float] = []
        for k, values in self.space.knobs.items():
            current = cfg.knob(k)
            vec.extend(1.0 if v == current else 0.0 for v in values)
        fb = set(cfg.fallback)
        vec.extend(1.0 if op in fb else 0.0 for op in self.space.fallback_candidates)
        return vec

    def _candidates(self, history: History) -> Iterator[TrialConfig]:
        scored = [(c, s) for c, s in history if s is not None]
        if len(scored) < self.warmup:
            yield from super()._candidates(history)
            return
        from scipy.stats import norm
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import Matern, WhiteKernel

        X = np.array([self._encode(c) for c, _ in scored])
        y = np.array([s for _, s in scored])
        std = y.std() or 1.0
        gp = GaussianProcessRegressor(Matern(nu=2.5) + WhiteKernel(1e-3), normalize_y=False, random_state=0)
        gp.fit(X, (y - y.mean()) / std)
        pool, keys = [], set()
        for _ in range(self.pool * 4):
            cfg = self._sample()
            if cfg.key() not in self.tried and cfg.key() not in keys:
                keys.add(cfg.key())
                pool.append(cfg)
            if len(pool) >= self.pool:
                break
        if not pool:
            return
        mu, sigma = gp.predict(np.array([self._encode(c) for c in pool]), return_std=True)
        best = (y.max() - y.mean()) / std
        z = (mu - best) / np.maximum(sigma, 1e-9)
        ei = (mu - best) * norm.cdf(z) + sigma * norm.pdf(z)
        for i in np.argsort(-ei):
            yield pool[int(i)]


STRATEGIES = {
    "basic": BasicStrategy,
    "auto": BasicStrategy,  # INC's name for its default strategy
    "_one_by_one": OneByOneStrategy,  # the pre-0.2 basic (benchmarks compare against it)
    "mse": MSEStrategy,
    "exhaustive": ExhaustiveStrategy,
    "random": RandomStrategy,
    "bayesian": BayesianStrategy,
}


#: the names users may pass (private ones, e.g. ``_one_by_one``, stay reachable by name)
PUBLIC_STRATEGIES = sorted(k for k in STRATEGIES if not k.startswith("_"))


def make_strategy(name: str | None, space: SearchSpace, seed: int = 0) -> Strategy:
    key = (name or "basic").lower()
    if key not in STRATEGIES:
        raise ValueError(f"tuning_strategy: expected one of {PUBLIC_STRATEGIES}, got {name!r}")
    return STRATEGIES[key](space, seed)
