"""The seed's ``accuracy_criterion`` dict → an ``AccuracyCriterion`` that judges a trial."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

_KEYS = {"relative", "absolute", "higher_is_better"}


@dataclass(frozen=True)
class AccuracyCriterion:
    """Allowed drop of a metric from its FP32 baseline, relative or absolute."""

    drop_type: str = "relative"  # "relative" | "absolute"
    max_drop: float = 0.01
    higher_is_better: bool = True

    @staticmethod
    def parse(value: Mapping[str, Any] | "AccuracyCriterion" | None) -> "AccuracyCriterion | None":
        """Validate the user's dict; ``None`` stays ``None`` (no accuracy control)."""
        if value is None or isinstance(value, AccuracyCriterion):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(
                "accuracy_criterion: expected a dict like {'relative': 0.01, 'higher_is_better': True}, "
                f"got {type(value).__name__}"
            )
        unknown = set(value) - _KEYS
        if unknown:
            raise ValueError(
                f"accuracy_criterion: unknown keys {sorted(unknown)}; expected 'relative' or 'absolute' "
                "and optionally 'higher_is_better'"
            )
        kinds = [k for k in ("relative", "absolute") if k in value]
        if len(kinds) != 1:
            raise ValueError(
                "accuracy_criterion: expected exactly one of 'relative' or 'absolute', "
                f"got {sorted(value)}"
            )
        kind = kinds[0]
        drop = value[kind]
        if isinstance(drop, bool) or not isinstance(drop, (int, float)):
            raise ValueError(f"accuracy_criterion: '{kind}' must be a number, got {drop!r}")
        if not math.isfinite(drop):
            raise ValueError(f"accuracy_criterion: '{kind}' must be a finite number, got {drop!r}")
        if drop < 0:
            raise ValueError(f"accuracy_criterion: '{kind}' must be >= 0, got {drop}")
        if kind == "relative" and drop >= 1:
            raise ValueError(f"accuracy_criterion: 'relative' must be < 1 (a fraction), got {drop}")
        hib = value.get("higher_is_better", True)
        if not isinstance(hib, bool):
            raise ValueError(f"accuracy_criterion: 'higher_is_better' must be a bool, got {hib!r}")
        return AccuracyCriterion(kind, float(drop), hib)

    def bound(self, baseline: float) -> float:
        """The worst metric value that still meets the criterion."""
        delta = self.max_drop * abs(baseline) if self.drop_type == "relative" else self.max_drop
        return baseline - delta if self.higher_is_better else baseline + delta

    def met(self, baseline: float, value: float) -> bool:
        bound = self.bound(baseline)
        # Float round-off must not turn a drop of exactly the allowed size into a miss. Keras
        # metrics are float32 (0.98 - 0.95 = 0.0300000310 there), so the tolerance sits above
        # float32 resolution; it is far below one example in any eval set.
        eps = 1e-6 * max(1.0, abs(baseline))
        return value >= bound - eps if self.higher_is_better else value <= bound + eps

    def to_dict(self) -> dict:
        return {self.drop_type: self.max_drop, "higher_is_better": self.higher_is_better}

    def describe(self) -> str:
        """What a person reads: "≤ 1 % relative drop", "≤ 0.03 absolute drop" ("rise" when lower
        is better: the allowed move is then upwards)."""
        if self.drop_type == "relative":
            amount = f"{self.max_drop * 100:.4g} % relative"
        else:
            amount = f"{self.max_drop:.4g} absolute"
        return f"≤ {amount} {'drop' if self.higher_is_better else 'rise'}"


def describe_criterion(value: Mapping[str, Any] | AccuracyCriterion | None) -> str:
    """``AccuracyCriterion.describe`` of a criterion dict (as reports store it); never raises,
    since it only words what a report already holds."""
    if value is None:
        return "no accuracy criterion"
    try:
        return AccuracyCriterion.parse(value).describe()
    except ValueError:
        return str(value)
