"""How fetching reports progress: a small protocol the CLI implements with rich."""

from __future__ import annotations

from typing import Protocol


class FetchProgress(Protocol):
    def start(self, name: str, total: int | None, done: int = 0) -> None:
        """A transfer (or a verification pass) of input ``name`` begins; ``done`` bytes are already here."""

    def advance(self, name: str, nbytes: int) -> None:
        """``nbytes`` more bytes of ``name`` arrived (or were hashed)."""

    def finish(self, name: str) -> None:
        """The transfer of ``name`` ended (successfully or not)."""


class NoProgress:
    def start(self, name: str, total: int | None, done: int = 0) -> None:
        pass

    def advance(self, name: str, nbytes: int) -> None:
        pass

    def finish(self, name: str) -> None:
        pass
