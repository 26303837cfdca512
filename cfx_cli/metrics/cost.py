"""Cost accounting shared by every method: peak memory while a batch is explained.

UNet and explained-model calls are counted by the methods themselves (CFResult.nfe_*);
seconds are timed by the job loop.
"""
from __future__ import annotations

import resource
import sys

import torch


class PeakMemory:
    """Peak memory, in MiB, while the ``with`` block runs.

    CUDA: the peak of the caching allocator's allocated tensors during the block (reset on entry),
    i.e. the memory the batch really needed on the GPU, weights included.
    CPU: the process's peak resident set size (``ru_maxrss``). The OS offers no per-block
    reset, so this is a high-water mark of the whole process (Python, torch and the models
    included): it can only grow from one batch to the next.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.mib = float("nan")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            self.mib = peak / 2**20 if sys.platform == "darwin" else peak / 2**10
