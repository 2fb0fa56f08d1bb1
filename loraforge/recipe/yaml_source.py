"""Safe YAML parsing that remembers where every key and list item is.

PyYAML's ``SafeLoader`` constructs only plain data (no Python objects). On top
of it this module:

* composes the node tree and builds the data itself while walking it, recording
  the 1-based (line, column) of every mapping key and sequence item under its
  field path, e.g. ``("targets", "neon-noir", "loras", 0, "blocks")``;
* rejects aliases (``*name``): a recipe is small and written by hand, aliases
  only buy "billion laughs" expansion bombs and make one value sit at two
  places in the file, which breaks error positions. Merge keys (``<<:``) go
  with them;
* rejects duplicate keys, which PyYAML would silently resolve to the last one;
* rejects nesting deeper than :data:`MAX_DEPTH` (deep ``[[[[...`` would
  otherwise exhaust Python's recursion limit);
* rejects non-standard tags on mappings and lists.

Problems are raised as :class:`YamlProblem` with a position; the loader turns
them into ``RecipeError``.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_DEPTH = 32
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"

Positions = dict[tuple, tuple[int, int]]


class YamlProblem(Exception):
    """A YAML-level problem at a 1-based position."""

    def __init__(self, line: int, column: int, message: str, hint: str, path: tuple | None = None):
        super().__init__(message)
        self.line = line
        self.column = column
        self.message = message
        self.hint = hint
        self.path = path


def _position(mark: yaml.Mark) -> tuple[int, int]:
    return mark.line + 1, mark.column + 1


class _RecipeYamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases and deep nesting while composing."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(yaml.AliasEvent):
            line, column = _position(self.peek_event().start_mark)
            raise YamlProblem(
                line,
                column,
                "YAML aliases (*name) are not allowed in recipes",
                "write the value out in full at each place it is used "
                "(aliases are refused so a small file cannot expand into a huge one)",
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                line, column = _position(self.peek_event().start_mark)
                raise YamlProblem(line, column, f"the YAML is nested more than {MAX_DEPTH} levels deep", "a recipe needs only a few levels; check for runaway brackets")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# YAML 1.1 (PyYAML) reads 1e-3 as text: its floats need a dot ("1.0e-3"). YAML 1.2 and every other reader
# say float, and so does whoever writes `strength: 1e-3`; only plain (unquoted) scalars are affected.
_RecipeYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> tuple[Any, Positions]:
    """Parse one YAML document into plain data plus the position of each key/item."""
    try:
        loader = _RecipeYamlLoader(text)
    except yaml.reader.ReaderError as error:  # a NUL byte or another character YAML does not allow
        before = text[: error.position]
        raise YamlProblem(
            before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1,
            f"the recipe contains the character U+{error.character:04X}, which YAML does not allow",
            "remove it (a NUL byte or another control character usually comes from a binary file or a bad paste)",
        ) from None
    try:
        root = loader.get_single_node()
        if root is None:
            return None, {(): (1, 1)}
        positions: Positions = {(): _position(root.start_mark)}
        return _build(loader, root, (), positions), positions
    except yaml.MarkedYAMLError as error:
        raise _syntax_problem(error) from None
    except yaml.YAMLError as error:  # unmarked: e.g. an undecodable stream
        raise YamlProblem(1, 1, f"the file is not valid YAML: {error}", "check that the file is a UTF-8 text file") from None
    finally:
        loader.dispose()


def _build(loader: yaml.SafeLoader, node: Node, path: tuple, positions: Positions) -> Any:
    if isinstance(node, MappingNode):
        return _build_mapping(loader, node, path, positions)
    if isinstance(node, SequenceNode):
        _require_standard_tag(node, _SEQ_TAG, "list", path)
        items = []
        for index, item in enumerate(node.value):
            positions[path + (index,)] = _position(item.start_mark)
            items.append(_build(loader, item, path + (index,), positions))
        return items
    return loader.construct_object(node)  # a scalar: str, int, float, bool, None, date


def _build_mapping(loader: yaml.SafeLoader, node: MappingNode, path: tuple, positions: Positions) -> dict:
    _require_standard_tag(node, _MAP_TAG, "mapping", path)
    result: dict = {}
    for key_node, value_node in node.value:
        line, column = _position(key_node.start_mark)
        if key_node.tag == _MERGE_TAG:
            raise YamlProblem(line, column, "YAML merge keys (<<) are not allowed in recipes", "write the fields out in full", path)
        if not isinstance(key_node, ScalarNode):
            raise YamlProblem(line, column, "a mapping key must be a plain name, not a list or mapping", "write the key as plain text", path)
        key = loader.construct_object(key_node)
        if key in result:
            first_line, first_column = positions[path + (key,)]
            raise YamlProblem(
                line,
                column,
                f"the key {key!r} appears twice in this mapping (first at line {first_line}, column {first_column})",
                "keep one of them; YAML would otherwise silently use the last one",
                path + (key,),
            )
        positions[path + (key,)] = (line, column)
        result[key] = _build(loader, value_node, path + (key,), positions)
    return result


def _require_standard_tag(node: Node, tag: str, what: str, path: tuple) -> None:
    if node.tag != tag:
        line, column = _position(node.start_mark)
        raise YamlProblem(line, column, f"the YAML tag {node.tag!r} is not allowed on a {what}", "remove the tag (the ! or !! word)", path)


def _syntax_problem(error: yaml.MarkedYAMLError) -> YamlProblem:
    mark = error.problem_mark or error.context_mark
    line, column = _position(mark) if mark else (1, 1)
    problem = error.problem or "invalid YAML"
    if error.context:
        problem = f"{error.context}, {problem}"
        if error.context_mark and error.problem_mark and error.context_mark.line != error.problem_mark.line:
            started_line, started_column = _position(error.context_mark)
            problem += f" (that part started at line {started_line}, column {started_column})"
    return YamlProblem(line, column, f"YAML syntax error: {problem}", _syntax_hint(problem))


def _syntax_hint(problem: str) -> str:
    if "'\\t'" in problem:
        return "indent with spaces, not tabs"
    if "single document" in problem:
        return "a recipe is one YAML document; remove the extra '---' line and what follows, or merge the two"
    if "could not determine a constructor" in problem:
        return "remove the tag (the ! or !! word); recipes contain plain values only"
    return "check the indentation and quoting on this line and the one before it; quote values that contain ': ' or start with a special character"
