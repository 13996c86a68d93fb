"""Peak memory of one measured region.

    with PeakMemory(device) as mem:
        run()
    mem.peak_bytes   # growth over what was allocated on entry, at the region's peak
    mem.method       # how it was measured

- CUDA: `torch.cuda` peak statistics, reset on entry: max_memory_allocated - memory_allocated
  on entry. The caching allocator's reserve is not counted, only tensors.
- CPU (Linux): peak resident set growth, VmHWM - VmRSS on entry, with VmHWM reset on entry by
  writing 5 to /proc/self/clear_refs, and glibc's free memory handed back first (malloc_trim),
  so that memory freed by an earlier run and reused without asking the kernel still shows.
  Where VmHWM cannot be reset, getrusage's ru_maxrss (never reset, so a region that stays below
  an earlier peak reads 0). A lower bound either way: other allocators may keep freed memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from pathlib import Path

import torch

from looptune.measure.timers import synchronize

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Make VmHWM start again from the current RSS; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def trim_heap() -> None:
    """Return the C heap's free memory to the kernel (glibc's malloc_trim; elsewhere nothing)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class PeakMemory:
    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self.method = ""

    def __enter__(self):
        synchronize(self.device)
        if self.device.type == "cuda":
            self.method = "cuda max_memory_allocated"
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        trim_heap()
        if reset_peak_rss():
            self.method = "rss growth (VmHWM)"
            self._base = rss_bytes()
        else:
            self.method = "rss growth (ru_maxrss)"
            self._base = max(_maxrss_bytes(), rss_bytes() or 0)
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "rss growth (VmHWM)":
            peak = _status_kib("VmHWM") * 1024
        else:
            peak = _maxrss_bytes()
        self.peak_bytes = max(0, peak - self._base)
        return False
