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
    """INC's 'basic': global knobs one at a time, then each op alone in FP32 on top of the best
    global setting, then accumulate the ops whose fallback helped most, most helpful first."""

    name = "basic"

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


class MSEStrategy(BasicStrategy):
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
    "mse": MSEStrategy,
    "exhaustive": ExhaustiveStrategy,
    "random": RandomStrategy,
    "bayesian": BayesianStrategy,
}


def make_strategy(name: str | None, space: SearchSpace, seed: int = 0) -> Strategy:
    key = (name or "basic").lower()
    if key not in STRATEGIES:
        raise ValueError(f"tuning_strategy: expected one of {sorted(STRATEGIES)}, got {name!r}")
    return STRATEGIES[key](space, seed)
