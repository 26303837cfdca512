"""Cost accounting shared by every method: peak memory while a batch is explained.

UNet and explained-model calls are counted by the wrappers of ``cfx_cli.models.counting``;
seconds are timed by the job loop.
"""
from __future__ import annotations

import os
import resource
import sys
import threading

import torch


class PeakMemory:
    """Peak memory, in MiB, while the ``with`` block runs.

    CUDA: the peak of the caching allocator's allocated tensors during the block (reset on entry),
    i.e. the memory the batch really needed on the GPU, weights included.
    CPU (Linux): the peak resident set size of the process during the block, read from
    /proc/self/statm every ``interval`` seconds by a watcher thread (weights, Python and torch
    included, so the number is the process's, but it is this batch's peak, not a high-water
    mark of the whole job). Elsewhere: the process's ``ru_maxrss`` high-water mark.
    """

    def __init__(self, device: torch.device | str, interval: float = 0.01):
        self.device = torch.device(device)
        self.interval = interval
        self.mib = float("nan")
        self._stop = threading.Event()
        self._thread = None
        self._peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _rss_bytes() is not None:
            self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes() or 0)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.mib = max(self._peak, _rss_bytes() or 0) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            self.mib = peak / 2**20 if sys.platform == "darwin" else peak / 2**10


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int | None:
    """The process's resident set size now (Linux), else None."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None
