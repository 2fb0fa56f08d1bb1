"""Load a recipe file: read it safely, validate it, point errors at lines.

Every problem the user can cause comes out as one
:class:`loraforge.errors.RecipeError` listing all problems found, one line
each, sorted by position::

    recipe.yaml:12:9: targets.neon-noir.loras[0].strength: expected a number, got the text '0.8'. Fix: remove the quotes: write 0.8 instead of '0.8'.

The error also carries the problems as data in ``error.problems`` (a tuple of
:class:`RecipeProblem`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from pydantic import ValidationError

from loraforge.errors import RecipeError
from loraforge.recipe.matrix import Matrix, MatrixProblems, expand_matrices
from loraforge.recipe.problems import Problem, format_path, problems_from_validation_error
from loraforge.recipe.schema import Recipe
from loraforge.recipe.yaml_source import YamlProblem, parse_yaml

MAX_RECIPE_BYTES = 1024 * 1024  # a hand-written recipe is a few KiB


@dataclass(frozen=True)
class RecipeProblem:
    """One positioned problem of a recipe."""

    file: str
    line: int
    column: int
    path: tuple | None  # field path; None for problems of the file itself (YAML syntax, size)
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}: "
        if self.path is not None:
            where += f"{format_path(self.path)}: "
        text = f"{where}{self.message.rstrip('.')}."
        if self.hint:
            text += f" Fix: {self.hint.rstrip('.')}."
        return text


def recipe_error(problems: Iterable[RecipeProblem]) -> RecipeError:
    """One RecipeError reporting every problem, sorted by position."""
    ordered = tuple(sorted(problems, key=lambda p: (p.line, p.column, format_path(p.path or ()), p.message)))
    if len(ordered) == 1:
        text = str(ordered[0])
    else:
        text = f"{ordered[0].file}: the recipe has {len(ordered)} problems:\n" + "\n".join(str(p) for p in ordered)
    error = RecipeError(text)
    error.problems = ordered
    return error


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe plus where it came from and where each field is."""

    recipe: Recipe
    path: Path  # absolute path of the recipe file
    root: Path  # the recipe's directory: relative paths in the recipe start here
    positions: Mapping[tuple, tuple[int, int]] = field(default_factory=dict)
    display_name: str = ""  # the file name as the user gave it, for messages
    matrices: Mapping[str, Matrix] = field(default_factory=dict)  # target written with matrix: -> its grid

    def position(self, field_path: tuple) -> tuple[int, int]:
        """(line, column) of the field, or of its nearest parent that has one."""
        return position_of(self.positions, field_path)

    def problem(self, field_path: tuple, message: str, hint: str = "") -> RecipeProblem:
        return _problem_at(self.display_name or str(self.path), self.positions, Problem(tuple(field_path), message, hint))

    def error(self, field_path: tuple, message: str, hint: str = "") -> RecipeError:
        """A RecipeError pointing at ``field_path`` (for checks after loading)."""
        return recipe_error([self.problem(field_path, message, hint)])

    def errors(self, items: Iterable[tuple[tuple, str, str]]) -> RecipeError:
        """One RecipeError for several ``(field_path, message, hint)`` problems."""
        return recipe_error([self.problem(path, message, hint) for path, message, hint in items])


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read, parse and validate a recipe file, or raise one RecipeError."""
    display_name = str(path)
    absolute = Path(path).expanduser().resolve()
    text = _read_text(absolute, display_name)
    try:
        data, positions = parse_yaml(text)
    except YamlProblem as problem:
        raise recipe_error([RecipeProblem(display_name, problem.line, problem.column, problem.path, problem.message, problem.hint)]) from None
    if data is None:
        raise recipe_error([RecipeProblem(display_name, 1, 1, None, "the recipe is empty", "start from an example in docs/recipes.md")])
    try:
        data, positions, matrices = expand_matrices(data, positions)
    except MatrixProblems as error:
        raise recipe_error(_problem_at(display_name, positions, problem) for problem in error.problems) from None
    frozen_positions = MappingProxyType(dict(positions))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        problems = problems_from_validation_error(error)
        raise recipe_error(_problem_at(display_name, positions, problem) for problem in problems) from None
    return LoadedRecipe(
        recipe=recipe, path=absolute, root=absolute.parent, positions=frozen_positions, display_name=display_name,
        matrices=MappingProxyType(matrices),
    )


def position_of(positions: Mapping[tuple, tuple[int, int]], field_path: tuple) -> tuple[int, int]:
    """(line, column) of ``field_path``, or of its nearest parent that has one."""
    path = tuple(field_path)
    while path and path not in positions:
        path = path[:-1]
    return positions.get(path, (1, 1))


def _problem_at(file: str, positions: Mapping[tuple, tuple[int, int]], problem: Problem) -> RecipeProblem:
    line, column = position_of(positions, problem.path)
    return RecipeProblem(file, line, column, problem.path, problem.message, problem.hint)


def _read_text(path: Path, display_name: str) -> str:
    def fail(message: str, hint: str) -> RecipeError:
        return recipe_error([RecipeProblem(display_name, 1, 1, None, message, hint)])

    try:
        with path.open("rb") as handle:
            # Read one byte past the limit so a file that grows (or a pipe) is caught too.
            raw = handle.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise fail("the recipe file does not exist", "check the path; it is resolved against the current directory") from None
    except IsADirectoryError:
        raise fail("this is a directory, not a recipe file", "give the path of the .yaml file") from None
    except OSError as error:
        raise fail(f"the recipe file cannot be read ({error.strerror})", "check its permissions") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise fail(
            f"the recipe file is larger than {MAX_RECIPE_BYTES // 1024} KiB",
            "a recipe is a short YAML file; check that this is the right file",
        )
    return _decode(raw, display_name)


def _decode(raw: bytes, display_name: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        before = raw[: error.start]
        line = before.count(b"\n") + 1
        column = len(before) - (before.rfind(b"\n") + 1) + 1
        raise recipe_error(
            [RecipeProblem(display_name, line, column, None, "the recipe is not UTF-8 text", "save the file as UTF-8")]
        ) from None
