"""The deterministic stand-in for measurements that the study tests use: light to import (no
torch), so the shared-study workers in test_search.py start quickly."""

from pathlib import Path

from looptune.search.choice import Knobs, Outcome
from looptune.search.study import Space

SPACE = Space(("a", "b"), (1, 2, 3, 4), (8, 16, 32), ("float32",))
SMALL = Space(("a", "b"), (1, 2), (8, 16), ("float32",))  # for studies in SQLite (slower)


def synthetic(knobs: Knobs) -> Outcome:
    """Quality best at R=2 (as LoopCoder-v2), worse with a small window; latency grows with R."""
    member = 0.05 if Path(knobs.checkpoint).name[-1] in "b2" else 0.0
    quality = 2.0 + 0.3 * abs(knobs.loops - 2) + 4.0 / knobs.window + member
    latency = 1.0 + 0.25 * knobs.loops + 0.002 * knobs.window + 2 * member
    kv = 1000 * (100 + (knobs.loops - 1) * knobs.window)
    return Outcome(
        knobs,
        quality,
        (quality - 0.01, quality + 0.01),
        latency,
        (latency * 0.99, latency * 1.01),
        10.0 * knobs.loops,
        kv,
    )
