"""The plain side of the study: candidates, their measured outcomes, budgets, the Pareto filter
and the recommendation. Nothing here imports Optuna."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from looptune.errors import LooptuneError

OBJECTIVES = ("quality", "latency_ms", "kv_bytes")  # all minimised


@dataclass(frozen=True)
class Knobs:
    """One deployable setting: which member, and how to run it."""

    checkpoint: str
    loops: int
    window: int
    dtype: str
    compile: bool = False


@dataclass
class Outcome:
    """What the study measured for one setting (`quality` lower is better, e.g. bits per byte)."""

    knobs: Knobs
    quality: float
    quality_ci: tuple[float, float]
    latency_ms: float  # the --metric (tpot p50 or p90)
    latency_ci: tuple[float, float]
    ttft_ms: float
    kv_bytes: int
    trial: int | None = None
    extra: dict = field(default_factory=dict)
    interference: str | None = None  # why its latency may be inflated (measure's flag), or None

    @property
    def values(self) -> tuple[float, float, float]:
        return (self.quality, self.latency_ms, float(self.kv_bytes))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["quality_ci"], d["latency_ci"] = list(self.quality_ci), list(self.latency_ci)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Outcome:
        d = dict(d)
        d["knobs"] = Knobs(**d["knobs"])
        d["quality_ci"], d["latency_ci"] = tuple(d["quality_ci"]), tuple(d["latency_ci"])
        return cls(**d)


BUDGET_NAMES = {"latency_ms": "latency_ms", "kv_mib": "kv_mib", "ttft_ms": "ttft_ms"}


def check_budgets(latency_ms, kv_mib=None, ttft_ms=None, names: dict = BUDGET_NAMES) -> None:
    """Raise LooptuneError unless every given budget is a finite number > 0; `names` says
    how the message calls each one (the CLI passes its flags)."""
    for key, value in (("latency_ms", latency_ms), ("kv_mib", kv_mib), ("ttft_ms", ttft_ms)):
        if value is None and key != "latency_ms":
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value <= 0:
            raise LooptuneError(f"{names[key]} must be a number > 0, got {value!r}")


@dataclass(frozen=True)
class Budgets:
    latency_ms: float
    kv_mib: float | None = None
    ttft_ms: float | None = None

    def __post_init__(self):
        check_budgets(self.latency_ms, self.kv_mib, self.ttft_ms)

    def overshoot(self, o: Outcome) -> dict[str, float]:
        """Value minus budget per constraint: <= 0 fits. Optuna's constraint convention."""
        over = {"latency_ms": o.latency_ms - self.latency_ms}
        if self.kv_mib is not None:
            over["kv_mib"] = o.kv_bytes / 2**20 - self.kv_mib
        if self.ttft_ms is not None:
            over["ttft_ms"] = o.ttft_ms - self.ttft_ms
        return over

    def relative_overshoot(self, o: Outcome) -> float:
        """The largest overshoot as a fraction of its budget (0 when everything fits)."""
        limits = {"latency_ms": self.latency_ms, "kv_mib": self.kv_mib, "ttft_ms": self.ttft_ms}
        return max(max(v / limits[k], 0.0) for k, v in self.overshoot(o).items())

    def fits(self, o: Outcome) -> bool:
        return all(v <= 0 for v in self.overshoot(o).values())


def dominates(a, b) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(outcomes: list[Outcome]) -> list[Outcome]:
    """The non-dominated outcomes over (quality, latency, KV bytes); all three minimised."""
    return [o for o in outcomes if not any(dominates(p.values, o.values) for p in outcomes)]


def quality_latency_front(outcomes: list[Outcome]) -> list[Outcome]:
    """The outcomes no other one beats on both quality and latency (the plot's front)."""

    def pair(o):
        return (o.quality, o.latency_ms)

    return [o for o in outcomes if not any(dominates(pair(p), pair(o)) for p in outcomes)]


def rank_key(o: Outcome):
    """Best quality, ties broken by lower latency, then lower memory."""
    return (o.quality, o.latency_ms, o.kv_bytes)


@dataclass
class Choice:
    best: Outcome | None  # the recommendation; None when nothing fits
    nearest_miss: Outcome | None  # when nothing fits: the smallest relative overshoot
    overshoot: dict[str, float]  # of the nearest miss, per constraint (value - budget)


def choose(outcomes: list[Outcome], budgets: Budgets) -> Choice:
    fitting = [o for o in outcomes if budgets.fits(o)]
    if fitting:
        return Choice(min(fitting, key=rank_key), None, {})
    if not outcomes:
        return Choice(None, None, {})
    miss = min(outcomes, key=lambda o: (budgets.relative_overshoot(o), rank_key(o)))
    return Choice(None, miss, {k: v for k, v in budgets.overshoot(miss).items() if v > 0})
