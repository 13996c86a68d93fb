"""A candidate's result: the `Measurement` dataclass, what makes one trustworthy enough to
cache (`check_measurement`), and the `--json` document of a `profile` run.

The measuring is in `latency.py` (candidates, cache, threads) and `bench.py` (the runs).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

STATUSES = ("ok", "not-measured", "infeasible")
STEPS = ("eager", "compile", "graphs")


@dataclass
class Measurement:
    """One candidate's result. Times in ms over measured runs only (warm-up apart).

    `tpot_ms_*` are percentiles of the per-token decode latencies pooled over runs, with 95%
    bootstrap intervals that resample whole runs. `tokens_per_s` is the decode throughput at this
    batch, batch / tpot_ms_p50. `kv_bytes` is what the cache's tensors hold at prompt + generated
    length, `kv_bytes_analytic` the formula's figure (`looptune.model.kv_bytes`); they must be
    equal. `peak_mem_bytes`: on a GPU the weights plus the peak of `torch.cuda` allocations a run
    adds; on the CPU the peak growth of resident memory during a run (a lower bound, see
    `looptune.measure.memory`). `status` is one of STATUSES; `error` says why when not "ok".
    `step`: eager, compile or graphs; `setup_ms` what building that step took (compile_ms too
    when compiled); `load_ms` loading the weights. `threads`: torch CPU threads of the runs.
    `conditions`: load before/after against cores, other processes' busy cores, dispersion of
    the runs, the wait for the device lock; `interference`: why the result is not to be trusted
    ([] when it is), and such a result is not cached.
    """

    checkpoint: str
    model_hash: str
    mode: str
    loops: int
    batch: int
    window: int
    prompt_len: int
    gen_len: int
    dtype: str
    device: str
    compile: bool
    step: str = "eager"
    threads: int | None = None
    status: str = "not-measured"
    error: str | None = None
    cached: bool = False
    ttft_ms: float | None = None
    ttft_ms_ci95: tuple[float, float] | None = None
    tpot_ms_p50: float | None = None
    tpot_ms_p50_ci95: tuple[float, float] | None = None
    tpot_ms_p90: float | None = None
    tpot_ms_p90_ci95: tuple[float, float] | None = None
    tpot_ms_p99: float | None = None
    tpot_ms_p99_ci95: tuple[float, float] | None = None
    tokens_per_s: float | None = None
    kv_bytes: int | None = None
    kv_bytes_analytic: int | None = None
    peak_mem_bytes: int | None = None
    peak_mem_method: str | None = None
    weights_bytes: int | None = None
    repeats: int = 0
    decode_steps: int = 0
    measured_s: float = 0.0
    warmup_ms: list[float] = field(default_factory=list)
    compile_ms: float | None = None
    setup_ms: float | None = None
    load_ms: float | None = None
    interference: list[str] = field(default_factory=list)
    conditions: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return self.status != "infeasible"

    @property
    def kv_match(self) -> bool | None:
        return None if self.kv_bytes is None else self.kv_bytes == self.kv_bytes_analytic

    @property
    def label(self) -> str:
        return f"{Path(self.checkpoint).name} {self.mode} R={self.loops} B={self.batch}"

    def to_dict(self) -> dict:
        return {**asdict(self), "feasible": self.feasible, "kv_match": self.kv_match}

    @classmethod
    def from_dict(cls, d: dict) -> Measurement:
        values = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        for name, v in values.items():
            if name.endswith("_ci95") and v is not None:
                values[name] = tuple(v)
        return cls(**values)


MIN_MS = 0.005  # no decode step or prefill of a real model on any device is faster


def check_measurement(d: dict) -> None:
    """Raise ValueError unless `d` is a finished, trusted Measurement (the result cache's check:
    an edited or corrupted entry is measured again rather than believed)."""
    m = Measurement.from_dict(d)
    if m.status != "ok" or m.interference:
        raise ValueError(f"status {m.status!r}, interference {m.interference!r}")
    times = [m.ttft_ms, m.tpot_ms_p50, m.tpot_ms_p90, m.tpot_ms_p99, m.tokens_per_s]
    if not all(isinstance(t, (int, float)) and math.isfinite(t) and t >= MIN_MS for t in times):
        raise ValueError(f"a time is missing, non-finite or below {MIN_MS} ms")
    if not m.tpot_ms_p50 <= m.tpot_ms_p90 <= m.tpot_ms_p99:
        raise ValueError("percentiles out of order")
    if not math.isclose(m.tokens_per_s, m.batch * 1e3 / m.tpot_ms_p50, rel_tol=1e-6):
        raise ValueError("tokens_per_s does not match tpot_ms_p50")
    for name in ("ttft_ms", "tpot_ms_p50", "tpot_ms_p90", "tpot_ms_p99"):
        lo, hi = getattr(m, f"{name}_ci95")
        if not lo <= getattr(m, name) <= hi:
            raise ValueError(f"{name} lies outside its interval")
    if not (
        isinstance(m.kv_bytes, int)
        and m.kv_bytes > 0
        and m.repeats >= 1
        and m.decode_steps == m.repeats * m.gen_len
        and m.measured_s > 0
    ):
        raise ValueError("kv_bytes, repeats or decode_steps impossible")


def document(measurements: list[Measurement], settings: dict, env: dict) -> dict:
    """The `--json` document: settings, the environment, one record per candidate."""
    return {
        "command": "profile",
        "settings": settings,
        "environment": env,
        "interference": sum(bool(m.interference) for m in measurements),
        "measurements": [m.to_dict() for m in measurements],
    }


def dumps(doc: dict) -> str:
    return json.dumps(doc, indent=2, default=str) + "\n"
