"""SIGTERM as a clean abort, the same way Ctrl-C (SIGINT, KeyboardInterrupt) is one.

By default SIGTERM (what `kill`, systemd, Docker and CI runners send) ends
Python at once, with no `finally` blocks run, so a writer's temporary file
would stay behind. Once :func:`install_terminate_handler` has run (the CLI
calls it before each command) the signal raises :class:`Terminated`, a
KeyboardInterrupt, in the main thread instead: every context manager unwinds
(the safetensors writer deletes its temp file, the previous output stays as
it was) and the CLI exits with 128 + the signal number.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; unwinds like Ctrl-C."""

    exit_code = 128 + signal.SIGTERM


def exit_code_of(interrupt: KeyboardInterrupt) -> int:
    """143 for SIGTERM, 130 for Ctrl-C."""
    return getattr(interrupt, "exit_code", 128 + signal.SIGINT)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def install_terminate_handler() -> None:
    """From now on SIGTERM raises Terminated in the main thread (the CLI calls this once per command)."""
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        signal.signal(signal.SIGTERM, _raise_terminated)


@contextmanager
def interruptions_kept() -> Iterator[None]:
    """Inside: an error raised while a KeyboardInterrupt was unwinding is reported as that interrupt.

    Python delivers Ctrl-C (and Terminated) between any two bytecodes of the
    main thread, including inside ``threading.Condition.wait``; landing
    between its lock release and reacquire turns the interrupt into
    "RuntimeError: cannot release un-acquired lock" (observed in a bake
    waiting on its writer thread). The cleanup has run either way; what the
    user asked for was an interruption, so that is what they get.
    """
    try:
        yield
    except KeyboardInterrupt:
        raise
    except Exception as error:
        interrupt = _interrupt_behind(error)
        if interrupt is None:
            raise
        raise interrupt from None


def _interrupt_behind(error: BaseException) -> KeyboardInterrupt | None:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        current = current.__context__
    return None
