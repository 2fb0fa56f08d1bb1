"""Read ahead: load the next items on a background thread while the caller works on this one.

Runners read tensors from disk and compute on them; reading the next few on
a thread (file reads release the GIL) hides most of the read time behind the
computation. At most ``depth`` items are loaded beyond the one being
returned, so memory stays bounded; items come back in their order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")


def prefetched(items: Iterable[Item], load: Callable[[Item], Loaded], depth: int) -> Iterator[tuple[Item, Loaded]]:
    """(item, load(item)) for each item in order, loading up to ``depth`` items ahead on one thread."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraforge-read") as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.submit(load, item)))
            if len(pending) > depth:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
