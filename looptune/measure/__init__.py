"""Measurement: timers, peak memory, the environment fingerprint, statistics, interference, and
the latency benchmark.

`profile_candidates(...) -> list[Measurement]` is the benchmark's API (`latency.py`, its loop in
`bench.py`, its result in `measurement.py`); `environment(device, dtype)` is the fingerprint
every result carries; `Limits` says when a measurement counts as taken under interference.
Heavy imports happen on first use."""

from importlib import import_module

_EXPORTS = {
    "Measurement": "looptune.measure.measurement",
    "profile_candidates": "looptune.measure.latency",
    "check_measurement": "looptune.measure.measurement",
    "Limits": "looptune.measure.interference",
    "environment": "looptune.measure.env",
    "fingerprint": "looptune.measure.env",
    "gpu_state": "looptune.measure.env",
    "Timer": "looptune.measure.timers",
    "LapTimer": "looptune.measure.timers",
    "PeakMemory": "looptune.measure.memory",
    "bootstrap_ci": "looptune.measure.stats",
    "summarize": "looptune.measure.stats",
}

__all__ = list(_EXPORTS)  # the lazily imported names above


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'looptune.measure' has no attribute {name!r}")
