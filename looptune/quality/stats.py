"""Bootstrap intervals over items (numpy, seeded).

Every score is a pooled ratio over items, sum(num) / sum(den): bits over bytes, nats over bytes,
passes over problems (den = 1). Resampling whole items, not tokens, keeps the correlation of the
tokens within one file or solution in the interval. The paired version resamples the same items
for both scores, so the interval of their difference excludes the variation between items that
both share.
"""

from __future__ import annotations

import numpy as np

N_BOOT = 2000
ALPHA = 0.05  # 95% intervals
_CHUNK = 256  # resamples drawn at once, to bound memory on large sets


def _resampled_sums(arrays: list[np.ndarray], n_boot: int, seed: int):
    """Sums of each array over the same `n_boot` resamples of its items: `[n_boot]` per array."""
    n = len(arrays[0])
    rng = np.random.default_rng(seed)
    out = [np.empty(n_boot) for _ in arrays]
    for lo in range(0, n_boot, _CHUNK):
        hi = min(lo + _CHUNK, n_boot)
        idx = rng.integers(0, n, size=(hi - lo, n))
        for a, o in zip(arrays, out):
            o[lo:hi] = a[idx].sum(1)
    return out


def _interval(samples: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def ratio_ci(
    num, den, n_boot: int = N_BOOT, seed: int = 0, alpha: float = ALPHA
) -> tuple[float, float, float]:
    """(sum(num) / sum(den), low, high): percentile bootstrap interval over items."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if len(num) == 0 or den.sum() <= 0:
        return float("nan"), float("nan"), float("nan")
    s_num, s_den = _resampled_sums([num, den], n_boot, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = s_num / s_den
    ratios = ratios[np.isfinite(ratios)]  # a resample of only empty items has no ratio
    return float(num.sum() / den.sum()), *_interval(ratios, alpha)


def paired_ratio_diff_ci(
    num_a, den_a, num_b, den_b, n_boot: int = N_BOOT, seed: int = 0, alpha: float = ALPHA
) -> tuple[float, float, float]:
    """(ratio_a - ratio_b, low, high) over the same resampled items for both."""
    arrays = [np.asarray(x, dtype=float) for x in (num_a, den_a, num_b, den_b)]
    if len(arrays[0]) == 0 or arrays[1].sum() <= 0 or arrays[3].sum() <= 0:
        return float("nan"), float("nan"), float("nan")
    diff = arrays[0].sum() / arrays[1].sum() - arrays[2].sum() / arrays[3].sum()
    sa, da, sb, db = _resampled_sums(arrays, n_boot, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        diffs = sa / da - sb / db
    diffs = diffs[np.isfinite(diffs)]
    return float(diff), *_interval(diffs, alpha)
