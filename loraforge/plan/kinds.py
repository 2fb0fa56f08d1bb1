"""The target-kind contract, and the registry that the planner, the executor, `plan`, `verify`,
releases and the lock are driven from.

A target kind (the recipe's `kind:`) is one class in ``loraforge/targets/``
implementing ``TargetKind``; ``loraforge/targets/registry.py`` lists them in
one ``TargetKinds``. Nothing below that layer names a kind: the planner is
handed the registry (``plan_build(..., kinds=...)``), keeps it on the plan,
and every later stage asks the plan's registry.

The contract (what a kind declares and does):

- ``name`` and ``spec``: the recipe's `kind:` value and its pydantic model
  (in recipe/schema.py, a member of the ``Target`` union, so positioned recipe
  errors work for every kind);
- ``operation`` and ``numeric_policy``: the name under which the lock records
  the numeric policy of what it computes, and that policy (None for kinds that
  compute nothing, such as releases). Two kinds may share an operation only
  with the same policy;
- ``plan(context, name)``: a frozen ``PlannedTarget`` (plan/target.py), from
  headers only; it says what the output is (``produces``), whether its bytes
  depend on the device class (``device_class``), its action key, bytes and
  memory estimate;
- ``run(target, run)``: build it (``run`` carries the plan, the Resources the
  executor chose, the progress callback and the lock as it stands); returns a
  result whose ``written`` says what was written;
- ``report(target)``: the kind's fields for `plan --json`, ``describe(report)``
  the lines under the target in `plan`'s tree, ``built_lines(result)`` the lines
  `build` prints for it, ``operation_label(target)`` the words `verify` uses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Iterator, Mapping, Sequence

from loraforge.plan.target import PlannedTarget


class TargetKind(ABC):
    name: ClassVar[str]  # the recipe's `kind:` value
    spec: ClassVar[type]  # its recipe model (recipe/schema.py)
    summary: ClassVar[str]  # one line for docs and `loraforge new`
    operation: ClassVar[str | None] = None  # the lock's numeric_policy key; None: computes nothing
    numeric_policy: ClassVar[str | None] = None

    @abstractmethod
    def plan(self, context, name: str) -> PlannedTarget:
        """Plan target ``name`` from the PlanContext (plan/context.py): headers only, nothing computed."""

    @abstractmethod
    def run(self, target: PlannedTarget, run) -> Any:
        """Build ``target`` (``run``: execute/run.py's TargetRun); the result's ``written`` is its output."""

    @abstractmethod
    def report(self, target: PlannedTarget) -> dict:
        """The kind's own fields of `plan --json` (the common ones come from plan/report.py)."""

    @abstractmethod
    def describe(self, report: Mapping) -> list[str]:
        """The lines under the target in `plan`'s tree, from its report (rich markup allowed)."""

    def heading(self, report: Mapping) -> str:
        """What follows the target's name in `plan`'s tree."""
        architecture = report.get("architecture")
        return f"{self.name}, {architecture}" if architecture else self.name

    @abstractmethod
    def built_lines(self, result) -> list[str]:
        """What `build` prints under "built <target> -> <path>" (sizes, counts, hashes)."""

    def operation_label(self, target: PlannedTarget) -> str:
        """How `verify` names what rebuilt the target."""
        return self.name


class TargetKinds:
    """The registered target kinds, in a fixed order (the order docs and errors list them in)."""

    def __init__(self, kinds: Sequence[TargetKind]):
        self._kinds = {kind.name: kind for kind in kinds}
        if len(self._kinds) != len(kinds):
            raise ValueError("two target kinds share a name")
        policies: dict[str, str] = {}
        for kind in kinds:
            if kind.operation is None:
                continue
            if policies.setdefault(kind.operation, kind.numeric_policy) != kind.numeric_policy:
                raise ValueError(f"target kinds disagree on the numeric policy of operation {kind.operation!r}")
        self._policies = dict(sorted(policies.items()))

    def __iter__(self) -> Iterator[TargetKind]:
        return iter(self._kinds.values())

    def names(self) -> tuple[str, ...]:
        return tuple(self._kinds)

    def get(self, name: str) -> TargetKind:
        return self._kinds[name]

    def of(self, target: PlannedTarget) -> TargetKind:
        return self._kinds[target.kind]

    def numeric_policies(self) -> dict[str, str]:
        """Operation -> numeric policy: what the lock records and `--locked` / `verify` compare."""
        return dict(self._policies)
