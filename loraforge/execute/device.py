"""Choosing the torch device a target runs on."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

from loraforge.errors import BuildError


def select_device(requested: str) -> torch.device:
    """Map a recipe/CLI device string to a torch device, failing clearly if it is absent."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BuildError(
                f"device '{requested}' was requested but this torch build sees no CUDA GPU "
                f"(torch {torch.__version__}). Use `--device cpu` or `device: auto`, or install a CUDA build of torch."
            )
        device = torch.device(requested)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BuildError(
                f"device '{requested}' does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
        return device
    raise BuildError(f"unknown device '{requested}': use auto, cpu, cuda or cuda:N.")


_threads_lock = threading.Lock()
_single_threaded_users = 0
_threads_before = 1


@contextmanager
def single_threaded_torch() -> Iterator[int]:
    """torch's CPU ops on one thread while inside; yields the thread count from before.

    torch's thread count is process-wide, so when several targets run side by
    side (--jobs) the first to enter saves it and the last to leave restores it.
    """
    global _single_threaded_users, _threads_before
    with _threads_lock:
        if _single_threaded_users == 0:
            _threads_before = torch.get_num_threads()
            torch.set_num_threads(1)
        _single_threaded_users += 1
        before = _threads_before
    try:
        yield before
    finally:
        with _threads_lock:
            _single_threaded_users -= 1
            if _single_threaded_users == 0:
                torch.set_num_threads(_threads_before)


@contextmanager
def one_thread_per_module(device: torch.device) -> Iterator[int]:
    """On the CPU, torch (and its BLAS/LAPACK) on one thread while inside; yields how many modules to run side by side.

    For per-module SVD work (SVD merges, resizes, extractions): a
    single-threaded LAPACK/BLAS call, and a single-threaded torch reduction,
    give bytes that do not depend on OMP_NUM_THREADS, MKL_NUM_THREADS or the
    number of cores, while several modules computed side by side in Python
    threads (torch releases the GIL) keep the cores busy. The worker count is
    the torch thread count from before (at least 1); on a GPU it is 1 and
    nothing changes.
    """
    if device.type != "cpu":
        yield 1
        return
    with single_threaded_torch() as previous:
        yield max(1, previous)
