"""The contract every merge method fulfils."""

from __future__ import annotations

from typing import ClassVar


class MergeMethod:
    """A merge method: its declared parameters and behaviour (subclasses set the class attributes).

    ``parameters``: the target fields the method reads; ``required`` maps those
    that must be given to the hint shown when one is missing; any other
    method-specific field given in the recipe is refused with ``unused_reason``.
    ``device_dependent``: the output bytes depend on the numeric environment
    (SVD steps), so the action key names the device class and the lock records
    the environment; otherwise they are correctly rounded and the same
    everywhere. ``seeded``: the method draws random numbers (from the recipe
    seed and the module name).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    parameters: ClassVar[tuple[str, ...]] = ()
    required: ClassVar[dict[str, str]] = {}
    unused_reason: ClassVar[str] = ""
    device_dependent: ClassVar[bool] = False
    seeded: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"<merge method {self.name}>"
