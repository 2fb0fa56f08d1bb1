"""What a run may use: the device and CPU threads, chosen by the executor and passed down.

ops/ owns no thread pools: a runner opens the pool its Resources allow for
the length of one run and hands it to the tensor math, which uses it only for
elementwise or independent work (so the bytes never depend on it).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class Resources:
    """The device one run computes on and how many CPU threads it may keep busy."""

    device: torch.device
    cpu_threads: int

    @classmethod
    def local(cls, device: torch.device) -> Resources:
        """This machine's share for one run: every core (the local scheduler runs one heavy target at a time)."""
        return cls(device, max(1, os.cpu_count() or 1))

    @contextmanager
    def worker_pool(self, workers: int, name: str) -> Iterator[ThreadPoolExecutor | None]:
        """A pool of at most ``workers`` threads (within cpu_threads) for the run; None when one would do."""
        count = max(1, min(workers, self.cpu_threads))
        if count == 1:
            yield None
            return
        pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix=name)
        try:
            yield pool
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
