"""Peak memory of one scoring run: GPU `max_memory_allocated`, or on the CPU the growth of the resident set (RSS).

The CPU number is a delta (peak RSS during the run minus RSS at its start), sampled by a background thread, so it
counts what the run added, not the weights and libraries already loaded. Other threads of the process (another
user's run in the app) add to it.
"""

from __future__ import annotations

import os
import resource
import threading

import torch

SAMPLE_EVERY_S = 0.01  # RSS sampling period of the CPU meter


def rss_mb() -> float:
    """The process's current resident set in MiB (Linux /proc; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux/BSD: KiB


class PeakMemory:
    """`with PeakMemory(device) as meter: ...` then `meter.peak_mb`: GPU peak allocated, or CPU peak RSS delta."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_mb: float | None = None
        self._start_mb = 0.0
        self._max_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._start_mb = self._max_mb = rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self._max_mb = max(self._max_mb, rss_mb())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self._max_mb, rss_mb()) - self._start_mb
