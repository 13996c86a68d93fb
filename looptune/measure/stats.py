"""Percentiles and bootstrap confidence intervals for latency samples (numpy).

Per-token latencies from one run are correlated (the same cache, the same moment of the
machine), so the bootstrap resamples whole runs, not single tokens: a run is the unit that
repeats independently. With a single run it falls back to resampling tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def bootstrap_ci(
    runs: Sequence[Sequence[float]],
    q: float = 50.0,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval for the `q`-th percentile of the pooled samples of `runs`."""
    runs = [np.asarray(r, dtype=float) for r in runs if len(r)]
    if not runs:
        raise ValueError("no samples")
    rng = np.random.default_rng(seed)
    if len(runs) == 1:  # nothing to resample but the tokens themselves
        runs = [np.asarray([v]) for v in runs[0]]
    if len(runs) == 1:
        v = float(runs[0][0])
        return v, v
    if len({len(r) for r in runs}) == 1:  # equal runs: one vectorised draw
        table = np.stack(runs)  # [n_runs, steps]
        picks = rng.integers(0, len(runs), size=(n_boot, len(runs)))
        stats = np.percentile(table[picks].reshape(n_boot, -1), q, axis=1)
    else:
        stats = np.array(
            [
                np.percentile(np.concatenate([runs[i] for i in pick]), q)
                for pick in rng.integers(0, len(runs), size=(n_boot, len(runs)))
            ]
        )
    tail = (1 - level) / 2 * 100
    return float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail))


def summarize(runs: Sequence[Sequence[float]], qs=(50, 90, 99), seed: int = 0) -> dict:
    """{"p50": .., "p50_ci95": (lo, hi), "p90": .., ...} over the pooled samples of `runs`."""
    pooled = np.concatenate([np.asarray(r, dtype=float) for r in runs])
    out = {}
    for q in qs:
        out[f"p{q}"] = percentile(pooled, q)
        out[f"p{q}_ci95"] = bootstrap_ci(runs, q, seed=seed)
    return out
