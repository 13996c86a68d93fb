"""What the decode benchmarks share: timed runs of a step runner and their summary.

Imported by `decode_latency.py` and `decode_context.py` (run as scripts, so this folder is on
the path).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from looptune.measure.timers import LapTimer


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def time_runs(step, start, batch, device, gen, min_repeats, min_time) -> tuple[list, object]:
    """Runs of `gen` greedy steps, each after `start()` puts the cache back, until
    `min_repeats` runs after the warm-up and `min_time` seconds: (per-step ms of every run, the
    warm-up's first; the last token)."""
    token = torch.zeros(batch, dtype=torch.long, device=device)
    runs, spent, t0 = [], 0.0, time.perf_counter()
    while len(runs) < min_repeats + 1 or spent < min_time:
        start()
        with LapTimer(device) as laps:
            for _ in range(gen):
                token = step(token).argmax(-1)
                laps.lap()
        runs.append(laps.ms)
        spent = time.perf_counter() - t0
        if len(runs) > 50 * (min_repeats + 1):  # a cap for very fast steps
            break
    return runs, token


def summary(runs) -> dict:
    """TPOT p50 (p10, p90) over the timed runs; the warm-up (runs[0]) kept apart."""
    steps = sorted(ms for run in runs[1:] for ms in run)
    q = statistics.quantiles(steps, n=10)
    return {
        "status": "ok",
        "tpot_ms_p50": statistics.median(steps),
        "tpot_ms_p10": q[0],
        "tpot_ms_p90": q[-1],
        "runs": len(runs) - 1,
        "warmup_ms": sum(runs[0]),
    }


def failure(e: Exception) -> dict:
    """A result that ran out of memory or failed: recorded, and the next one runs."""
    oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)
    return {"status": "oom" if oom else "error", "error": str(e).strip()[:300]}


def outcome(row: dict) -> str:
    """A result in a few words for the progress line: its TPOT and set-up, or its status."""
    if row["status"] != "ok":
        return row["status"]
    return f"{row['tpot_ms_p50']:.3f} ms/step, setup {row['setup_ms']:.0f} ms"
