"""Turn pydantic validation errors into plain-language recipe problems.

A :class:`Problem` is "at this field path, this is wrong, do this". The loader
adds the file position and formats it. Field paths are cleaned of pydantic's
internals (the discriminator tag of a target, the ``[key]`` marker of a bad
mapping key) so they read like the YAML the user wrote.
"""

from __future__ import annotations

import difflib
import re
import types
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from loraforge.recipe.schema import CUSTOM_ERROR, SCHEMA_VERSION, TARGET_KINDS, Recipe, describe_value


@dataclass(frozen=True)
class Problem:
    path: tuple  # field path, e.g. ("targets", "neon-noir", "loras", 0, "strength")
    message: str  # what is wrong
    hint: str = ""  # how to fix it


# What to write for a missing required field.
_MISSING_HINTS = {
    "loraforge": f"add the line `loraforge: {SCHEMA_VERSION}` at the top of the recipe (the schema version)",
    "name": "add e.g. `name: my-model` (lowercase letters, digits, '-', '_', '.')",
    "inputs": "add an `inputs:` section naming the files the recipe reads, e.g. base: {source: models/base.safetensors}",
    "targets": "add a `targets:` section naming what to build, e.g. my-model: {kind: checkpoint, base: base}",
    "source": "add e.g. `source: models/base.safetensors` (a path, https://, hf://, civitai: or urn:air: source)",
    "use": "add `use: <name>` naming the input or target that provides the LoRA",
    "base": "add `base: <name>` naming the input or target that provides the base checkpoint",
    "tuned": "add `tuned: <name>` naming the input or target that provides the fine-tuned checkpoint",
}


def format_path(path: tuple) -> str:
    """``("targets", "a.b", "loras", 0)`` -> ``targets["a.b"].loras[0]``."""
    text = ""
    for element in path:
        if isinstance(element, int) and not isinstance(element, bool):
            text += f"[{element}]"
        elif isinstance(element, str) and re.fullmatch(r"[A-Za-z0-9_-]+", element):
            text += f".{element}" if text else element
        else:
            text += f"[{element!r}]" if isinstance(element, str) else f"[{element}]"
    return text or "(top level)"


def problems_from_validation_error(error: ValidationError) -> list[Problem]:
    problems: list[Problem] = []
    for item in error.errors(include_url=False):
        problems.extend(_problems_from_item(item))
    return problems


def _problems_from_item(item: dict) -> list[Problem]:
    path, parent_model = _clean_loc(item["loc"])
    kind, ctx, value = item["type"], item.get("ctx") or {}, item.get("input")
    if kind == CUSTOM_ERROR:
        if ctx.get("problems"):
            return [Problem(path + tuple(at), reason, hint) for at, reason, hint in ctx["problems"]]
        return [Problem(path, ctx["reason"], ctx.get("hint", ""))]
    if kind == "extra_forbidden":
        return [_unknown_field(path, parent_model)]
    if kind == "missing":
        field = path[-1]
        return [Problem(path[:-1], f"the required field {field!r} is missing", _MISSING_HINTS.get(field, f"add `{field}: ...`"))]
    if kind == "union_tag_invalid":
        return [Problem(path + ("kind",), f"unknown target kind {ctx.get('tag')!r}", "supported kinds: " + ", ".join(TARGET_KINDS))]
    if kind == "union_tag_not_found":
        return [Problem(path, "the target has no 'kind'", f"add `kind: {TARGET_KINDS[0]}` (supported kinds: {', '.join(TARGET_KINDS)})")]
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return [Problem(path, f"expected a mapping of fields, got {describe_value(value)}", "write `key: value` lines indented under this one, or {key: value, ...}")]
    if kind in ("tuple_type", "list_type"):
        return [Problem(path, f"expected a list, got {describe_value(value)}", "write one `- item` line per entry, or [item, item]")]
    if kind == "too_short":
        return [Problem(path, "this section is empty", "list at least one entry")]
    return [Problem(path, f"{item['msg']} (got {describe_value(value)})", "")]


def _unknown_field(path: tuple, model: type[BaseModel] | None) -> Problem:
    field = path[-1]
    allowed = _field_names(model) if model else []
    close = difflib.get_close_matches(str(field), allowed, n=1, cutoff=0.6)
    listing = "allowed fields here: " + ", ".join(allowed)
    hint = f"did you mean {close[0]!r}? ({listing})" if close else f"remove it or rename it ({listing})"
    return Problem(path, f"unknown field {field!r}", hint)


def _field_names(model: type[BaseModel]) -> list[str]:
    names: list[str] = []
    for name, info in model.model_fields.items():
        choices = getattr(info.validation_alias, "choices", None)
        names.extend(choices if choices else [name])
    return names


def _clean_loc(loc: tuple) -> tuple[tuple, type[BaseModel] | None]:
    """Drop pydantic's internal loc elements; also return the model holding the last field."""
    path: list = []
    current: Any = Recipe
    parent_model: type[BaseModel] | None = None
    elements = list(loc)
    while elements:
        element = elements.pop(0)
        if element == "[key]":
            break  # the error is about the mapping key itself, already the last element
        current, discriminated = _unwrap(current)
        if discriminated and _is_tag_of(current, element):
            current = _member_for_tag(current, element)
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            parent_model = current
            current = _field_annotation(current, element)
        else:
            current = _item_type(current)
        path.append(element)
    return tuple(path), parent_model


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """Strip Annotated and Optional; report whether a discriminator was seen."""
    discriminated = False
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            args = get_args(annotation)
            discriminated |= any(isinstance(meta, FieldInfo) and meta.discriminator for meta in args[1:])
            annotation = args[0]
        elif origin in (Union, types.UnionType):
            members = tuple(arg for arg in get_args(annotation) if arg is not type(None))
            if len(members) != 1:
                return members, discriminated
            annotation = members[0]
        else:
            return annotation, discriminated


def _union_members(current: Any) -> tuple:
    return current if isinstance(current, tuple) else (current,)


def _kind_of(model: Any) -> Any:
    field = getattr(model, "model_fields", {}).get("kind")
    return get_args(field.annotation)[0] if field is not None and get_args(field.annotation) else None


def _is_tag_of(current: Any, element: Any) -> bool:
    return any(_kind_of(member) == element for member in _union_members(current))


def _member_for_tag(current: Any, element: Any) -> Any:
    return next(member for member in _union_members(current) if _kind_of(member) == element)


def _field_annotation(model: type[BaseModel], element: Any) -> Any:
    for name, info in model.model_fields.items():
        choices = getattr(info.validation_alias, "choices", None) or ()
        if element == name or element in choices:
            return info.annotation
    return None


def _item_type(annotation: Any) -> Any:
    """The value type of a dict, or the item type of a list/tuple."""
    args = get_args(annotation)
    origin = get_origin(annotation)
    if origin is dict and len(args) == 2:
        return args[1]
    if origin in (list, tuple) and args:
        return args[0]
    return None
