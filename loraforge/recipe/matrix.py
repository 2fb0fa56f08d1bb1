"""Recipe matrices: one target written with ``matrix:`` becomes one target per combination of values.

A model maker rarely publishes the first merge: they build a grid of
variants, compare them and release one. ``matrix:`` names axes, each a
field path inside the target and the values to try::

    styled:
      kind: checkpoint
      base: base
      loras: [{use: neon, strength: 0.8}]
      matrix:
        loras.neon.strength: [0.6, 0.8, 1.0]
        precision.save: [float16, bfloat16]

The expansion happens on the raw YAML data, before validation, so every
variant is an ordinary target of its kind: validated, planned, locked, built
and verified on its own, with its own action key (an incremental build
rebuilds only the variants whose inputs or values changed). Nothing after
the loader knows about matrices except for messages (``LoadedRecipe.matrices``).

Names and files (docs/recipes.md, "Matrices"):

- a variant is called ``styled@strength=0.6,save=float16``: each axis is
  labelled by the last name in its path (where two axes would share it, by
  the name before it, e.g. the LoRA's in loras.neon.strength, else by the
  whole path), each value by its YAML text when it is a plain
  number, boolean or word, else ``v<N>`` (its 1-based position in the list).
  The name is also the file stem: no brackets (shell globs, terminal
  markup), nothing to quote on a command line;
- its output is the target's output with ``@strength=0.6,save=float16``
  added to the file's stem (by default dist/<variant name>.safetensors);
- variants come in the order of the axes as written, the last axis fastest.

A path segment of a list is a 0-based index or, for ``loras``, the
``use:`` name of the entry. Errors point at the matrix line that caused them.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from loraforge.recipe.problems import Problem
from loraforge.recipe.schema import VARIANT_NAME

MAX_VARIANTS = 256  # per target: a grid is for comparing by eye, and each variant is a full build
# The characters a value may keep in a variant's name; anything else is shown as v<N>.
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9._+-]{1,40}")
_AXIS_PATH = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
# Fields an axis may not vary: they say what the target is, or where it goes.
_FIXED_FIELDS = frozenset({"kind", "matrix", "output"})


class MatrixProblems(Exception):
    """The problems found in the recipe's matrices (the loader positions them)."""

    def __init__(self, problems: Sequence[Problem]):
        super().__init__("; ".join(p.message for p in problems))
        self.problems = tuple(problems)


@dataclass(frozen=True)
class Axis:
    key: str  # as written under matrix:, e.g. "loras.neon.strength"
    path: tuple  # the raw-data path inside the target, e.g. ("loras", 0, "strength")
    label: str  # how the variant's name shows it, e.g. "strength"
    values: tuple  # as YAML read them
    texts: tuple[str, ...]  # each value as its name shows it


@dataclass(frozen=True)
class Matrix:
    """One target's grid: its axes and its variants' names, in recipe order."""

    target: str
    axes: tuple[Axis, ...]
    variants: tuple[str, ...]

    @property
    def shape(self) -> str:
        """e.g. "3 × 2 (strength × save)"."""
        sizes = " × ".join(str(len(axis.values)) for axis in self.axes)
        return f"{sizes} ({' × '.join(axis.label for axis in self.axes)})"


def expand_matrices(data: object, positions: Mapping[tuple, tuple[int, int]]):
    """(data, positions, matrices) with every ``matrix:`` target replaced by its variants.

    ``data`` is the parsed YAML (unchanged when it has no matrix); positions
    gain the variants' paths, pointing at the lines they come from. Raises
    MatrixProblems for a malformed matrix.
    """
    targets = data.get("targets") if isinstance(data, Mapping) else None
    if not isinstance(targets, Mapping) or not any(_has_matrix(spec) for spec in targets.values()):
        _refuse_bracket_names(targets)
        return data, positions, {}
    _refuse_bracket_names(targets)
    expanded: dict = {}
    new_positions = dict(positions)
    matrices: dict[str, Matrix] = {}
    problems: list[Problem] = []
    for name, spec in targets.items():
        if not _has_matrix(spec):
            expanded[name] = spec
            continue
        try:
            matrix, variants = _expand_one(name, spec)
        except MatrixProblems as error:
            problems.extend(error.problems)
            continue
        matrices[name] = matrix
        for variant, (variant_spec, sources) in variants.items():
            if variant in targets:
                problems.append(Problem(("targets", name, "matrix"), f"the variant {variant!r} has the name of another target",
                                        "rename that target"))
            expanded[variant] = variant_spec
            _position_variant(new_positions, positions, name, variant, sources)
    problems.extend(_releases_naming_a_matrix(expanded, matrices))
    if problems:
        raise MatrixProblems(problems)
    return {**data, "targets": expanded}, new_positions, matrices


def _releases_naming_a_matrix(targets: Mapping, matrices: Mapping[str, Matrix]) -> list[Problem]:
    """A release lists variants, never a whole grid: publishing every variant by accident is not undone."""
    problems = []
    for name, spec in targets.items():
        include = spec.get("include") if isinstance(spec, Mapping) and spec.get("kind") == "release" else None
        for index, used in enumerate(include if isinstance(include, list) else ()):
            if isinstance(used, str) and used in matrices:
                variants = matrices[used].variants
                problems.append(Problem(("targets", name, "include", index),
                                        f"{used!r} is a matrix of {len(variants)} variants; a release lists the variants it bundles",
                                        f"name the chosen one(s), e.g. {variants[0]}"))
    return problems


def _has_matrix(spec: object) -> bool:
    return isinstance(spec, Mapping) and "matrix" in spec


def _refuse_bracket_names(targets: object) -> None:
    if not isinstance(targets, Mapping):
        return
    problems = [
        Problem(("targets", name), f"the target name {name!r} has the form of a matrix variant's name",
                "names with @label=value are made by matrix:; give the target a plain name")
        for name in targets if isinstance(name, str) and VARIANT_NAME.fullmatch(name)
    ]
    if problems:
        raise MatrixProblems(problems)


def _expand_one(name: str, spec: Mapping) -> tuple[Matrix, dict[str, tuple[dict, dict]]]:
    axes = _axes(name, spec)
    count = math.prod(len(axis.values) for axis in axes)
    if count > MAX_VARIANTS:
        raise MatrixProblems([Problem(("targets", name, "matrix"), f"the matrix has {count} variants, more than {MAX_VARIANTS}",
                                      "split it into several targets or fewer values; each variant is a full build")])
    base = {key: value for key, value in spec.items() if key != "matrix"}
    variants: dict[str, tuple[dict, dict]] = {}
    for combination in itertools.product(*(range(len(axis.values)) for axis in axes)):
        label = ",".join(f"{axis.label}={axis.texts[i]}" for axis, i in zip(axes, combination))
        variant = f"{name}@{label}"
        variant_spec = copy.deepcopy(base)
        sources = {}
        for axis, i in zip(axes, combination):
            _set(variant_spec, axis.path, copy.deepcopy(axis.values[i]))
            sources[axis.path] = ("matrix", axis.key, i)
        if isinstance(base.get("output"), str):
            variant_spec["output"] = _variant_output(base["output"], label)
        variants[variant] = (variant_spec, sources)
    return Matrix(name, axes, tuple(variants)), variants


def _variant_output(output: str, label: str) -> str:
    """``dist/styled.safetensors`` -> ``dist/styled@strength=0.6.safetensors``."""
    head, slash, file = output.rpartition("/")
    stem, dot, suffix = file.rpartition(".")
    file = f"{stem}@{label}.{suffix}" if dot and stem else f"{file}@{label}"
    return f"{head}{slash}{file}"


def _axes(name: str, spec: Mapping) -> tuple[Axis, ...]:
    matrix = spec["matrix"]
    where = ("targets", name, "matrix")
    if not isinstance(matrix, Mapping) or not matrix:
        raise MatrixProblems([Problem(where, "matrix: must map field paths to lists of values",
                                      "write e.g. matrix: {loras.neon.strength: [0.6, 0.8]}")])
    if spec.get("kind") == "release":
        raise MatrixProblems([Problem(where, "a release cannot have a matrix",
                                      "put the matrix on the targets the release bundles, and list the variants it should include")])
    problems, found = [], []
    for key, values in matrix.items():
        try:
            found.append(_axis(name, spec, key, values))
        except MatrixProblems as error:
            problems.extend(error.problems)
    if problems:
        raise MatrixProblems(problems)
    return _labelled(found)


def _axis(name: str, spec: Mapping, key: object, values: object) -> tuple[str, tuple, tuple, tuple[str, ...]]:
    where = ("targets", name, "matrix", key)
    if not isinstance(key, str) or not _AXIS_PATH.fullmatch(key):
        raise MatrixProblems([Problem(where, f"{key!r} is not a field path", "write the field's path with dots, e.g. loras.neon.strength or rank")])
    if not isinstance(values, list) or not values:
        raise MatrixProblems([Problem(where, f"the axis {key} needs a non-empty list of values", f"write e.g. {key}: [0.6, 0.8]")])
    path = _resolve(spec, key.split("."), where)
    texts = tuple(_value_text(value, index) for index, value in enumerate(values))
    for index, text in enumerate(texts):
        if text in texts[:index]:
            raise MatrixProblems([Problem((*where, index), f"the value {values[index]!r} is listed twice", "list each value once")])
    return key, path, tuple(values), texts


def _resolve(spec: Mapping, segments: list[str], where: tuple) -> tuple:
    """The raw path of ``segments`` inside ``spec`` (list entries by index or ``use:`` name)."""
    if segments[0] in _FIXED_FIELDS:
        raise MatrixProblems([Problem(where, f"a matrix cannot vary {segments[0]!r}",
                                      "vary the fields that change what is built; each variant gets its own output automatically")])
    node, path = spec, []
    for depth, segment in enumerate(segments):
        if isinstance(node, list):
            index = _list_index(node, segment)
            if index is None:
                names = ", ".join(str(i) for i in range(len(node)))
                uses = [item["use"] for item in node if isinstance(item, Mapping) and isinstance(item.get("use"), str)]
                raise MatrixProblems([Problem(where, f"{'.'.join(segments[:depth + 1])} names no entry of the list",
                                              f"use an index ({names}){' or a use: name (' + ', '.join(uses) + ')' if uses else ''}")])
            path.append(index)
            node = node[index]
        elif isinstance(node, Mapping):
            if segment not in node:  # a field the target leaves at its default, e.g. precision.save
                return (*path, *segments[depth:])
            path.append(segment)
            node = node[segment]
        else:
            raise MatrixProblems([Problem(where, f"{'.'.join(segments[:depth])} is a single value, it has no field {segment!r}",
                                          f"vary {'.'.join(segments[:depth])} itself")])
    return tuple(path)


def _list_index(items: list, segment: str) -> int | None:
    if segment.isdigit():
        return int(segment) if int(segment) < len(items) else None
    for index, item in enumerate(items):
        if isinstance(item, Mapping) and item.get("use") == segment or item == segment:
            return index
    return None


def _labelled(found: list[tuple[str, tuple, tuple, tuple[str, ...]]]) -> tuple[Axis, ...]:
    """Each axis labelled by its last field name; where two would share it, by the name before it (the
    LoRA's ``use:`` name in loras.neon.strength), and where that is shared too, by the whole path."""
    labels = [_label_choices(key)[0] for key, *_ in found]
    for level in (1, 2):
        shared = {label for label in labels if labels.count(label) > 1}
        for index, (key, *_rest) in enumerate(found):
            if labels[index] in shared:
                choices = _label_choices(key)
                labels[index] = choices[min(level, len(choices) - 1)]
    return tuple(Axis(key, path, label, values, texts) for (key, path, values, texts), label in zip(found, labels))


def _label_choices(key: str) -> list[str]:
    """From short to long: the last field name, the name before it (when not an index), the whole path."""
    names = [segment for segment in key.split(".") if not segment.isdigit()]
    choices = [names[-1]] if names else [key]
    if len(names) > 1 and not key.split(".")[-2].isdigit():
        choices.append(key.split(".")[-2])
    return [*choices, key]


def _value_text(value: object, index: int) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = repr(value)
    else:
        text = value if isinstance(value, str) else ""
    return text if _PLAIN_VALUE.fullmatch(text) else f"v{index + 1}"


def _set(spec: dict, path: tuple, value: object) -> None:
    node = spec
    for step in path[:-1]:
        node = node.setdefault(step, {}) if isinstance(node, dict) else node[step]
    node[path[-1]] = value


def _position_variant(new: dict, old: Mapping, name: str, variant: str, sources: Mapping[tuple, tuple]) -> None:
    """The variant's fields sit where the target's do; the varied ones where their matrix value does."""
    prefix = ("targets", name)
    for path, position in old.items():
        if path[:2] == prefix and (len(path) < 3 or path[2] != "matrix"):
            new[("targets", variant, *path[2:])] = position
    for path, source in sources.items():
        at = old.get((*prefix, *source)) or old.get((*prefix, *source[:2])) or old.get(prefix)
        if at is not None:
            for known in [p for p in new if p[:2 + len(path)] == ("targets", variant, *path)]:
                del new[known]
            new[("targets", variant, *path)] = at
