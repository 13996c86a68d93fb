"""What else the machine did while a latency was measured, and the CPU thread count to use.

A latency taken while other work competed for the cores is not the latency a user will get, and
it must not be cached as if it were. `CpuWatch` records, over a measurement, the 1-minute load
average before and after against the usable cores, and the CPU time that *other* processes used
(from /proc/stat, minus this process's own time), and the share of the time this process's
threads were runnable but had no CPU ("cpu wait", from schedstat: the load average lags by a
minute, and others' CPU time is capped by what they took from us). Where the last two were
measured, the load average is recorded but is no reason: it would still say "busy" a minute
after the other work ended. `interference(...)` turns
those and the dispersion of the runs into reasons, such as ["load", "cpu wait", "dispersion"]. The
limits are `Limits`; `$LOOPTUNE_INTERFERENCE=record` keeps the record but never flags (for a
machine that is always shared, such as CI). Measurements on one device are serialised between
processes by `looptune.store.device_lock`, so two looptune workers never time each other.

`choose_threads(...)` times a decode step with 1 and with all usable threads and keeps the
faster (two threads on a busy 2-core machine are several times slower than one).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch

from looptune.measure.timers import synchronize
from looptune.model.generate import prefill


@dataclass(frozen=True)
class Limits:
    """When a measurement counts as taken under interference."""

    load_per_core: float = 1.0  # 1-min load average / usable cores, before or after
    other_cores: float = 0.25  # CPU cores others used beyond the ones this run left free
    dispersion: float = 1.5  # p90 / p50 of the per-token latencies
    run_cv: float = 0.15  # coefficient of variation of the runs' medians (3 runs or more)
    cpu_wait: float = 0.1  # share of the time our threads were runnable but had no CPU

    @classmethod
    def never(cls) -> Limits:
        inf = float("inf")
        return cls(inf, inf, inf, inf, inf)

    @classmethod
    def from_env(cls) -> Limits:
        return cls.never() if os.environ.get("LOOPTUNE_INTERFERENCE") == "record" else cls()


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def loadavg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _busy_s() -> tuple[float, int] | None:
    """(CPU seconds all processes spent busy, CPUs counted) from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, lines[0].split()[1:9])
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3].isdigit())
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), cpus


def _wait_s() -> float | None:
    """Seconds this process's threads spent runnable, waiting for a CPU (Linux schedstat): what
    other work took from us, whatever the load average says; None elsewhere."""
    total = 0.0
    try:
        tasks = list(os.scandir("/proc/self/task"))
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"{task.path}/schedstat") as f:
                total += int(f.read().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):  # a thread that ended meanwhile
            continue
    return total


def _own_s() -> float:
    t = os.times()
    return t.user + t.system


class CpuWatch:
    """Load before, and from `read()` on: load now and the cores other processes kept busy."""

    def __init__(self):
        self.load_before = loadavg()
        self.start()

    def start(self) -> None:
        """Count other processes' CPU time from now on (the load before stays)."""
        self._start = (time.perf_counter(), _busy_s(), _own_s(), _wait_s())

    def read(self) -> dict:
        wall0, busy0, own0, wait0 = self._start
        wall, busy, own, wait = time.perf_counter() - wall0, _busy_s(), _own_s() - own0, _wait_s()
        others = waited = None
        if busy is not None and busy0 is not None and wall > 0:
            others = max(0.0, (busy[0] - busy0[0] - own) / wall)
        if wait is not None and wait0 is not None and wall > 0:
            waited = max(0.0, wait - wait0) / wall
        return {
            "load_before": self.load_before,
            "load_after": loadavg(),
            "cores": usable_cores(),
            "cpus": busy[1] if busy else None,
            "other_busy_cores": None if others is None else round(others, 3),
            "cpu_wait": None if waited is None else round(waited, 3),
        }


def dispersion(runs: list[list[float]]) -> dict:
    """p90 / p50 of the pooled per-token latencies and the CV of the runs' medians."""
    pooled = sorted(t for run in runs for t in run)
    if not pooled:
        return {}
    p50 = statistics.median(pooled)
    p90 = pooled[min(len(pooled) - 1, int(0.9 * len(pooled)))]
    medians = [statistics.median(run) for run in runs if run]
    cv = (statistics.stdev(medians) / statistics.mean(medians)) if len(medians) >= 3 else None
    return {
        "tpot_p90_over_p50": round(p90 / p50, 3) if p50 > 0 else None,
        "run_cv": None if cv is None else round(cv, 4),
    }


def interference(conditions: dict, threads: int, limits: Limits) -> list[str]:
    """The reasons a measurement taken under `conditions` (CpuWatch.read() and dispersion())
    with `threads` busy threads of its own is not to be trusted; [] when none."""
    reasons = []
    cores = conditions.get("cores") or usable_cores()
    loads = [
        x for x in (conditions.get("load_before"), conditions.get("load_after")) if x is not None
    ]
    others, cpus = conditions.get("other_busy_cores"), conditions.get("cpus") or cores
    # The load average lags a minute behind the machine: where what others took during the
    # runs was measured (Linux), it alone says "busy", and a load that has ended is no reason.
    measured = others is not None and conditions.get("cpu_wait") is not None
    if not measured and loads and max(loads) > limits.load_per_core * cores:
        reasons.append("load")
    if others is not None and others > max(cpus - threads, 0) + limits.other_cores:
        reasons.append("other processes")
    ratio, cv = conditions.get("tpot_p90_over_p50"), conditions.get("run_cv")
    if (conditions.get("cpu_wait") or 0.0) > limits.cpu_wait:
        reasons.append("cpu wait")
    if ratio is not None and ratio > limits.dispersion:
        reasons.append("dispersion")
    if cv is not None and cv > limits.run_cv:
        reasons.append("drift")  # the runs' medians differ
    return reasons


def choose_threads(model, batch: int, device, steps: int = 8) -> dict:
    """{"threads": the faster of 1 and all usable cores, "ms": {threads: median step ms}}.
    Fewer threads win unless more are 10% faster: they suffer less from a busy machine."""
    options = sorted({1, usable_cores()})
    before = torch.get_num_threads()
    timings = {}
    try:
        with torch.inference_mode():
            for n in options:
                torch.set_num_threads(n)
                cache = model.new_cache(batch, 8 + steps + 2, 1, None, None)
                prompt = torch.zeros((batch, 8), dtype=torch.long, device=device)
                token = prefill(model, prompt, cache).argmax(-1)
                times = []
                for i in range(steps + 2):
                    synchronize(device)
                    t0 = time.perf_counter()
                    token = model.decode_step(token, cache).argmax(-1)
                    synchronize(device)
                    if i >= 2:  # the first steps warm the allocator and the kernels
                        times.append((time.perf_counter() - t0) * 1e3)
                timings[n] = statistics.median(times)
    finally:
        torch.set_num_threads(before)
    best = min(options, key=lambda n: timings[n] * (1.0 if n == 1 else 1.1))
    return {"threads": best, "ms": {str(n): round(v, 4) for n, v in timings.items()}}
