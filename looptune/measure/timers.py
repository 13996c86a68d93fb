"""Timers as context managers: CUDA events on a GPU, a device sync and `perf_counter` elsewhere.

    with Timer(device) as t:          with LapTimer(device) as laps:
        prefill(...)                      for _ in range(n):
    t.ms                                      step(); laps.lap()
                                      laps.ms  # one duration per lap

On a GPU the events are recorded on the current stream and read only after the last one has
completed, so the timed region itself never waits for the device; each time is what the stream
took from one event to the next. Elsewhere the device is synchronised at every mark (a no-op on
the CPU, whose kernels run to completion before returning).
"""

from __future__ import annotations

import time
from itertools import pairwise

import torch


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class LapTimer:
    """Marks a start on entry and one mark per `lap()`; `ms` is the list of lap durations."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._marks: list = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            synchronize(self.device)
            self._marks.append(time.perf_counter())

    def __enter__(self):
        self._marks = []
        self._mark()
        return self

    def lap(self) -> None:
        self._mark()

    def __exit__(self, *exc):
        return False

    @property
    def ms(self) -> list[float]:
        marks = self._marks
        if self.cuda:
            marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in pairwise(marks)]
        return [(b - a) * 1e3 for a, b in pairwise(marks)]


class Timer(LapTimer):
    """One region: `with Timer(device) as t: ...`, then `t.ms` (a float)."""

    def __exit__(self, *exc):
        self._mark()
        return False

    @property
    def ms(self) -> float:
        return super().ms[0]
