"""The recipe v1 schema (pydantic v2).

Every model forbids unknown fields and is frozen. Validators raise
``PydanticCustomError`` of type :data:`CUSTOM_ERROR` whose context carries a
``hint`` (how to fix it) and, for checks that span several fields, ``problems``:
a tuple of ``(path suffix, reason, hint)`` so the loader can point at the exact
key. The loader turns these into positioned :class:`loraforge.errors.RecipeError`.

What is *not* checked here (the planner does it, with positions from the
loader): that ``use:``/``base:`` name an existing input or target, that the
graph has no cycles, and what a block-weight spec means for an architecture.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from loraforge.canonical import canonical_json
from loraforge.methods.checkpoint import CHECKPOINT_METHODS, ParameterError
from loraforge.methods.lora import LORA_METHODS
from loraforge.recipe.destination import DestinationSyntaxError, parse_destination
from loraforge.recipe.sources import SourceSyntaxError, parse_source

SCHEMA_VERSION = 1
CUSTOM_ERROR = "loraforge"

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
NAME_MAX_LENGTH = 100
# A matrix variant's name (recipe/matrix.py): the target's name, then @label=value,... It is also
# the variant's file stem, so it avoids brackets (shell globs, rich markup) and needs no quoting.
VARIANT_NAME = re.compile(r"(?P<target>[a-z0-9][a-z0-9._-]*)@(?P<values>[A-Za-z0-9._-]+=[A-Za-z0-9._+-]+(,[A-Za-z0-9._-]+=[A-Za-z0-9._+-]+)*)")
VARIANT_NAME_MAX_LENGTH = 200
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda|cuda:[0-9]+")
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a signed 64-bit seed

COMPUTE_DTYPES = ("float32", "float64")
SAVE_DTYPES = ("float16", "bfloat16", "float32", "same")
# Spellings people use elsewhere (kohya, A1111) mapped to ours, for hints.
DTYPE_ALIASES = {
    "fp16": "float16", "half": "float16", "f16": "float16",
    "bf16": "bfloat16",
    "fp32": "float32", "float": "float32", "f32": "float32", "single": "float32",
    "fp64": "float64", "double": "float64", "f64": "float64",
}


def custom_error(reason: str, hint: str = "", problems: tuple = ()) -> PydanticCustomError:
    """A validation error with a fix-it hint (and optional per-key sub-problems)."""
    return PydanticCustomError(CUSTOM_ERROR, "{reason}", {"reason": reason, "hint": hint, "problems": problems})


def describe_value(value: Any) -> str:
    """How a YAML value reads to the user: 'the text "0.8"', 'true', 'a list'."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the text {value!r}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if value is None:
        return "an empty value (null)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


# --- field validators (run before pydantic's own type check) ---------------


# Names Windows reserves for devices, with any extension ("con", "nul.safetensors", "com1.txt"): a file so
# named cannot be created or copied there, so a recipe that would write one is refused (docs/security.md).
WINDOWS_RESERVED = frozenset(
    ("con", "prn", "aux", "nul", *(f"com{digit}" for digit in "123456789"), *(f"lpt{digit}" for digit in "123456789"))
)


def windows_reserved(component: str) -> bool:
    """Whether a file or folder name is a Windows device name (the part before the first '.', any case)."""
    return component.split(".", 1)[0].rstrip(" ").casefold() in WINDOWS_RESERVED


def _path_problem(value: str) -> tuple[str, str] | None:
    """Why an output path would break on another system (a control character, a Windows device name), or None."""
    control = next((char for char in value if ord(char) < 32 or ord(char) == 127), None)
    if control is not None:
        return (
            f"the output {value!r} contains the control character U+{ord(control):04X}",
            "file names with newlines or control characters break shells, listings and other systems; write a path of printable characters",
        )
    reserved = next((part for part in re.split(r"[/\\]", value) if part and windows_reserved(part)), None)
    if reserved is not None:
        return (
            f"the output {value!r} uses {reserved!r}, a device name Windows reserves (con, prn, aux, nul, com1-com9, lpt1-lpt9, with any extension)",
            "such a file cannot be created or copied on Windows; choose another name for that part of the path",
        )
    return None


def _check_name(value: Any) -> str:
    if not isinstance(value, str):
        raise custom_error(
            f"a name must be text, got {describe_value(value)}",
            "use lowercase letters, digits, '-', '_' and '.', e.g. neon-noir; quote it if YAML reads it as a number or boolean",
        )
    if VARIANT_NAME.fullmatch(value) and len(value) <= VARIANT_NAME_MAX_LENGTH:
        value, variant = VARIANT_NAME.fullmatch(value)["target"], value  # a matrix variant (recipe/matrix.py)
    else:
        variant = None
    if "=" in value and not variant:
        raise custom_error(
            f"the name {value!r} is not allowed; it looks like part of a matrix variant's name",
            "a variant's name has commas (name@a=1,b=2): in a [..., ...] list YAML splits it there, so quote it "
            "or write the list one '- item' per line",
        )
    if len(value) > NAME_MAX_LENGTH or not NAME_PATTERN.fullmatch(value):
        suggestion = re.sub(r"[^a-z0-9._-]+", "-", value.lower()).strip("-._") or "my-name"
        raise custom_error(
            f"the name {value!r} is not allowed",
            f"names start with a lowercase letter or digit and contain only a-z, 0-9, '-', '_' and '.' "
            f"(at most {NAME_MAX_LENGTH} characters); for example {suggestion!r}",
        )
    if windows_reserved(value):
        raise custom_error(
            f"the name {value!r} is a device name Windows reserves (con, prn, aux, nul, com1-com9, lpt1-lpt9, with any extension)",
            f"names become file names (a target's default output is dist/<name>.safetensors), which cannot be created or copied on Windows; choose another name, e.g. {value.split('.', 1)[0] + '-1'!r}",
        )
    return variant or value


def _check_real(value: Any) -> float:
    if isinstance(value, bool):
        raise custom_error(f"expected a number, got {describe_value(value)}", "write a number such as 0.8 (YAML reads yes/no/on/off as booleans)")
    if isinstance(value, str):
        hint = "write a number such as 0.8"
        try:
            float(value)
            hint = f"remove the quotes: write {value.strip()} instead of {value!r}"
        except ValueError:
            pass
        raise custom_error(f"expected a number, got {describe_value(value)}", hint)
    if not isinstance(value, (int, float)):
        raise custom_error(f"expected a number, got {describe_value(value)}", "write a number such as 0.8")
    if not math.isfinite(value):
        raise custom_error(f"expected a finite number, got {value!r}", "write an ordinary number such as 0.8")
    return float(value)


def _check_schema_version(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise custom_error(f"the schema version must be the number {SCHEMA_VERSION}, got {describe_value(value)}", f"write loraforge: {SCHEMA_VERSION}")
    if value != SCHEMA_VERSION:
        raise custom_error(
            f"unsupported recipe schema version {value}; this loraforge reads version {SCHEMA_VERSION}",
            f"write loraforge: {SCHEMA_VERSION}, or use the loraforge release that introduced version {value}",
        )
    return value


def _check_seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise custom_error(f"the seed must be a whole number, got {describe_value(value)}", "write e.g. seed: 0")
    if not 0 <= value < SEED_LIMIT:
        raise custom_error(f"the seed {value} is out of range", f"use a whole number from 0 to {SEED_LIMIT - 1}")
    return value


def _check_device(value: Any) -> str:
    if not isinstance(value, str) or not DEVICE_PATTERN.fullmatch(value):
        raise custom_error(
            f"unknown device {value!r}" if isinstance(value, str) else f"the device must be text, got {describe_value(value)}",
            "use one of: auto, cpu, cuda, cuda:N (N = GPU index, e.g. cuda:0)",
        )
    return value


def _choice_checker(allowed: tuple[str, ...], what: str):
    def check(value: Any) -> str:
        if isinstance(value, str) and value in allowed:
            return value
        hint = "use one of: " + ", ".join(allowed)
        alias = DTYPE_ALIASES.get(value.lower()) if isinstance(value, str) else None
        if alias in allowed:
            hint = f"write {alias} instead of {value!r} ({hint})"
        shown = repr(value) if isinstance(value, str) else describe_value(value)
        raise custom_error(f"unknown {what} {shown}", hint)

    return check


def _check_sha256(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        shown = f"{len(value)} characters" if isinstance(value, str) else describe_value(value)
        raise custom_error(
            f"a sha256 must be 64 hexadecimal digits, got {shown}",
            "copy the full SHA256 of the file (e.g. from `sha256sum` or the Civitai/Hugging Face file page), quoted",
        )
    return value.lower()


def _check_source(value: Any) -> str:
    if not isinstance(value, str):
        raise custom_error(f"the source must be text, got {describe_value(value)}", "give a file path or a URL such as hf://org/repo@main/file.safetensors")
    try:
        parse_source(value)
    except SourceSyntaxError as error:
        raise custom_error(str(error), error.hint) from None
    return value


def _check_date(value: Any) -> str:
    # YAML reads an unquoted 2026-11-01 as a date; accept it and keep the ISO text.
    if isinstance(value, _dt.date) and not isinstance(value, _dt.datetime):
        return value.isoformat()
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        try:
            return _dt.date.fromisoformat(value).isoformat()
        except ValueError:
            pass
    raise custom_error(f"the date must be a calendar date YYYY-MM-DD, got {describe_value(value)}", 'write e.g. date: "2026-11-01"')


def _check_text(value: Any) -> str:
    if not isinstance(value, str):
        raise custom_error(f"expected text, got {describe_value(value)}", "quote the value")
    return value


def _check_output(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise custom_error(f"the output must be a file path, got {describe_value(value)}", "write e.g. output: dist/model.safetensors")
    if not value.endswith(".safetensors"):
        raise custom_error(f"the output {value!r} does not end in .safetensors", "loraforge writes safetensors only; name the file <something>.safetensors")
    if problem := _path_problem(value):
        raise custom_error(*problem)
    return value


def _check_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise custom_error(f"expected true or false, got {describe_value(value)}", "write true or false without quotes")
    return value


def _check_blocks(value: Any) -> str | tuple[float, ...] | dict[str, float]:
    """Check the *shape* of a block-weight spec; its meaning needs the architecture."""
    hint = 'give a preset name (e.g. OUTD), a list of numbers, or a mapping such as {default: 0, IN04: 0.5, "OUT03-OUT06": 1}'
    if isinstance(value, str):
        if not value.strip():
            raise custom_error("the block weights are empty", hint)
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise custom_error("the block-weight list is empty", hint)
        return tuple(_block_number(item, index) for index, item in enumerate(value))
    if isinstance(value, Mapping):
        if not value:
            raise custom_error("the block-weight mapping is empty", hint)
        return {_block_key(key): _block_number(number, key) for key, number in value.items()}
    raise custom_error(f"block weights must be a preset, a list or a mapping, got {describe_value(value)}", hint)


def _block_key(key: Any) -> str:
    if not isinstance(key, str):
        reason = f"block ids are text such as IN04 or OUT03-OUT06, got {describe_value(key)}"
        hint = "write the block id, e.g. IN04: 0.5"
        raise custom_error(reason, hint, problems=(((key,), reason, hint),))
    return key


def _block_number(value: Any, at: int | str) -> float:
    """A weight of a list item or mapping entry; errors point at that item."""
    try:
        return _check_real(value)
    except PydanticCustomError as error:
        reason, hint = f"block weight: {error.context['reason']}", error.context["hint"]
        raise custom_error(reason, hint, problems=(((at,), reason, hint),)) from None


Name = Annotated[str, BeforeValidator(_check_name)]
RealNumber = Annotated[float, BeforeValidator(_check_real)]
Device = Annotated[str, BeforeValidator(_check_device)]
Text = Annotated[str, BeforeValidator(_check_text)]
StrictFlag = Annotated[bool, BeforeValidator(_check_bool)]
ComputeDtype = Annotated[Literal["float32", "float64"], BeforeValidator(_choice_checker(COMPUTE_DTYPES, "compute precision"))]
SaveDtype = Annotated[Literal["float16", "bfloat16", "float32", "same"], BeforeValidator(_choice_checker(SAVE_DTYPES, "save precision"))]
# The raw spec, normalised only in form (numbers become floats, lists tuples).
BlockSpec = Annotated[Union[str, tuple[float, ...], dict[str, float]], BeforeValidator(_check_blocks)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- models ------------------------------------------------------------------


class PrecisionOverride(_Strict):
    """A per-target precision: each field left out inherits the recipe's."""

    compute: ComputeDtype | None = None
    save: SaveDtype | None = None


class Precision(_Strict):
    """Numeric policy. ``save: same`` keeps each base tensor's dtype."""

    compute: ComputeDtype = "float32"
    save: SaveDtype = "same"

    def merged_with(self, override: PrecisionOverride | Precision | None) -> Precision:
        """This precision with every field the override sets replaced."""
        if override is None:
            return self
        changes = {name: getattr(override, name) for name in override.model_fields_set if getattr(override, name) is not None}
        return self.model_copy(update=changes)


class InputSpec(_Strict):
    """A file the recipe reads. ``source`` is kept exactly as written."""

    source: Annotated[str, BeforeValidator(_check_source)]
    sha256: Annotated[str, BeforeValidator(_check_sha256)] | None = None
    # Opt-in to read a .ckpt/.pt/.bin pickle with torch.load(weights_only=True); see docs/security.md.
    allow_pickle: StrictFlag = False


class LoraUse(_Strict):
    """One adapter applied by a target, with its strengths and block weights."""

    use: Name
    strength: RealNumber = Field(1.0, validation_alias=AliasChoices("strength", "ratio"))
    te: RealNumber | None = None
    blocks: BlockSpec | None = None
    # How strength ≠ 1 enters a DoRA module (docs/adapters.md, "DoRA"): LyCORIS's multiplier or
    # PEFT/diffusers' lora_scale. None: the file's producer's (peft for lora_magnitude_vector, else lycoris).
    dora: Annotated[Literal["lycoris", "peft"], BeforeValidator(_choice_checker(("lycoris", "peft"), "DoRA convention"))] | None = None

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return _without_unset(handler(self), "dora")

    @model_validator(mode="before")
    @classmethod
    def _strength_xor_ratio(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "strength" in data and "ratio" in data:
            reason = "both 'strength' and its alias 'ratio' are given"
            hint = "keep only one of them (ratio is another name for strength)"
            raise custom_error(reason, hint, problems=((("ratio",), reason, hint),))
        return data

    @property
    def te_strength(self) -> float:
        """The text-encoder strength: ``te`` if given, else ``strength``."""
        return self.strength if self.te is None else self.te


class _TargetSpec(_Strict):
    """What every target kind's recipe model declares (the kind itself: loraforge/targets/)."""

    produces: ClassVar[str] = "checkpoint"  # what the output is: "checkpoint", "lora" or "bundle" (a folder)

    def dependencies(self) -> tuple[str, ...]:
        raise NotImplementedError

    def default_output(self, name: str) -> str:
        """The output path when the recipe gives none."""
        return f"dist/{name}.safetensors"

    def reference_path(self, ref: str) -> tuple:
        """The field (under the target) that names input or target ``ref``, for error positions."""
        for field in type(self).model_fields:
            value = getattr(self, field)
            if value == ref:
                return (field,)
            if isinstance(value, tuple):
                for i, item in enumerate(value):
                    if item == ref or getattr(item, "use", None) == ref:
                        return (field, i, "use") if isinstance(item, LoraUse) else (field, i)
        return ()


class _TargetBase(_TargetSpec):
    """Fields every target kind that computes has."""

    output: Annotated[str, BeforeValidator(_check_output)] | None = None
    precision: PrecisionOverride | None = None
    device: Device | None = None


COMPONENT_SOURCES = ("merge", "first")


class MergeComponents(_Strict):
    """Where the text encoders and the VAE of a merge come from: merged, the first model's, or a named model's."""

    te: Name | None = None  # default: merge
    vae: Name | None = None  # default: first


class MergeSpec(_Strict):
    """A checkpoint merge (docs/merging-checkpoints.md): a method of loraforge/methods/checkpoint.py,
    its models, its base, and the method's own declared parameters (validated by the method's model)."""

    _OWN: ClassVar[tuple[str, ...]] = ("method", "models", "base", "components")

    method: Annotated[str, BeforeValidator(_choice_checker(tuple(CHECKPOINT_METHODS), "checkpoint merge method"))]
    models: tuple[Name, ...] = Field(min_length=1)
    base: Name | None = None
    components: MergeComponents | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)  # the method's, defaults filled in

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = _without_unset(handler(self), "base", "components")
        return {**data, **data.pop("parameters")}  # written back flat, as in the recipe

    @model_validator(mode="before")
    @classmethod
    def _method_parameters(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or "parameters" in data and set(data) <= {*cls._OWN, "parameters"}:
            return data
        own = {key: data[key] for key in cls._OWN if key in data}
        method = CHECKPOINT_METHODS.get(data.get("method")) if isinstance(data.get("method"), str) else None
        if method is None:
            return own  # the method field reports the unknown name; its parameters cannot be judged
        given = {key: value for key, value in data.items() if key not in cls._OWN}
        try:
            validated = method.parameters_model().model_validate(given)
        except ValidationError as error:
            problems = tuple(_parameter_problem(method, item) for item in error.errors(include_url=False))
            raise custom_error("; ".join(p[1] for p in problems), problems[0][2], problems=problems) from None
        models = own.get("models")
        count = len(models) if isinstance(models, (list, tuple)) else 1
        values = {k: v for k, v in validated.model_dump().items() if v is not None}
        return {**own, "parameters": {**method.defaults(count), **values}}

    @model_validator(mode="after")
    def _fits_the_method(self) -> MergeSpec:
        method = CHECKPOINT_METHODS[self.method]
        problems = []
        n = len(self.models)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            wanted = (f"exactly {method.min_models}" if method.max_models == method.min_models
                      else f"at least {method.min_models}" if method.max_models is None
                      else f"{method.min_models} to {method.max_models}")
            problems.append((("models",), f"method {method.name} takes {wanted} models, got {n}",
                             f"list {wanted} models ({method.formula})"))
        if len(set(self.models)) != n:
            problems.append((("models",), "a model is listed twice", "list each model once; weights say how much of each"))
        if method.base == "required" and self.base is None:
            problems.append(((), f"method {method.name} needs a base (task vectors are Wᵢ − base)",
                             "add `base: <name>` under merge: naming the model the others were fine-tuned from"))
        if method.base == "refused" and self.base is not None:
            problems.append((("base",), f"method {method.name} takes no base", f"remove base, or list it under models ({method.formula})"))
        if self.base is not None and self.base in self.models:
            problems.append((("base",), f"{self.base!r} is both the base and one of the models", "list it only as the base"))
        for parameter in method.declared:
            value = self.parameters.get(parameter.name)
            if parameter.per_model and value is not None and len(value) != n:
                problems.append(((parameter.name,), f"{parameter.name} has {len(value)} values for {n} models",
                                 "give one value per model, in the order of models:"))
        for field in ("te", "vae"):
            chosen = getattr(self.components, field, None) if self.components else None
            if chosen is not None and chosen not in (*COMPONENT_SOURCES, *self.models, *((self.base,) if self.base else ())):
                problems.append((("components", field), f"{chosen!r} is neither merge, first nor a model of this merge",
                                 "write merge, first, or one of: " + ", ".join((*self.models, *((self.base,) if self.base else ())))))
        if problems:
            raise custom_error("; ".join(p[1] for p in problems), problems[0][2], problems=tuple(problems))
        return self

    @property
    def method_class(self):
        return CHECKPOINT_METHODS[self.method]

    def sources(self) -> tuple[str, ...]:
        """Every model the merge reads: the models, then the base."""
        return (*self.models, *((self.base,) if self.base else ()))


def _parameter_problem(method, item: dict) -> tuple:
    """A pydantic error of a method's parameter model as a (path, reason, hint) problem under merge:."""
    loc, kind = tuple(item["loc"]), item["type"]
    listing = ", ".join(method.parameters) or "none"
    if kind == "extra_forbidden":
        return (loc, f"method {method.name} has no parameter {loc[-1]!r}", f"its parameters: {listing}")
    if kind == "missing":
        hint = method.required.get(str(loc[-1])) or f"add {loc[-1]}: ..."
        return ((), f"method {method.name} needs {loc[-1]!r}", hint)
    error = (item.get("ctx") or {}).get("error")
    if isinstance(error, ParameterError):
        return ((*loc, *error.at), error.reason, error.hint)
    return (loc, item["msg"], "")


class CheckpointTarget(_TargetBase):
    """Bake LoRAs into a base checkpoint, or into a merge of checkpoints (``merge:`` instead of ``base:``)."""

    kind: Literal["checkpoint"]
    base: Name | None = None
    merge: MergeSpec | None = None
    loras: tuple[LoraUse, ...] = ()
    allow_unmatched: StrictFlag = False

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return _without_unset(handler(self), "base", "merge")  # recipes without merge keep their canonical bytes

    @model_validator(mode="after")
    def _base_or_merge(self) -> CheckpointTarget:
        if (self.base is None) == (self.merge is None):
            reason = ("the target has both base and merge" if self.base is not None
                      else "the target has neither base nor merge")
            hint = "give `base: <name>` to bake into one checkpoint, or `merge:` to start from a merge of several"
            raise custom_error(reason, hint, problems=(((), reason, hint),))
        return self

    def dependencies(self) -> tuple[str, ...]:
        starts = self.merge.sources() if self.merge is not None else (self.base,)
        return _unique((*starts, *(lora.use for lora in self.loras)))

    def reference_path(self, ref: str) -> tuple:
        if self.merge is not None:
            if ref in self.merge.models:
                return ("merge", "models", self.merge.models.index(ref))
            if ref == self.merge.base:
                return ("merge", "base")
        return super().reference_path(ref)


class RankSpec(_Strict):
    """How many singular values to keep: exactly one of rank/energy/ratio, optionally capped by max.

    Written in a recipe as a whole number (``rank: 32``) or a mapping
    (``{energy: 0.95, max: 128}``, ``{ratio: 20, max: 128}``).
    """

    rank: int | None = None  # keep this many
    energy: float | None = None  # smallest rank whose Frobenius energy fraction reaches this (0 < e <= 1)
    ratio: float | None = None  # keep sigma_k with sigma_max / sigma_k <= ratio (ratio >= 1)
    max: int | None = None  # never more than this


def _check_rank(value: Any) -> RankSpec | None:
    """A rank spec; 0 means "none" (returned as None) where the field allows it."""
    hint = "write a whole number such as 32, or a mapping such as {energy: 0.95, max: 128} or {ratio: 20, max: 128}"
    if isinstance(value, RankSpec):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise custom_error(f"a rank cannot be negative, got {value}", hint)
        return RankSpec(rank=value) if value else None
    if not isinstance(value, Mapping):
        raise custom_error(f"expected a rank, got {describe_value(value)}", hint)
    unknown = sorted(str(key) for key in value if key not in ("rank", "energy", "ratio", "max"))
    chosen = [key for key in ("rank", "energy", "ratio") if key in value]
    if unknown or len(chosen) != 1:
        what = f"unknown key(s) {', '.join(unknown)}" if unknown else f"{len(chosen)} of rank/energy/ratio given"
        raise custom_error(f"a rank mapping needs exactly one of rank, energy, ratio (plus optional max): {what}", hint)
    spec = {key: value[key] for key in ("rank", "energy", "ratio", "max") if key in value}
    for key in ("rank", "max"):
        if key in spec and (isinstance(spec[key], bool) or not isinstance(spec[key], int) or spec[key] < 1):
            raise custom_error(f"'{key}' must be a whole number of at least 1, got {describe_value(spec[key])}", hint)
    if "energy" in spec:
        energy = _check_real(spec["energy"])
        if not 0.0 < energy <= 1.0:
            raise custom_error(f"'energy' is a fraction in (0, 1], got {energy!r}", "write e.g. energy: 0.95 (95 % of the Frobenius energy)")
        spec["energy"] = energy
    if "ratio" in spec:
        ratio = _check_real(spec["ratio"])
        if ratio < 1.0:
            raise custom_error(f"'ratio' is sigma_max / sigma_k and at least 1, got {ratio!r}", "write e.g. ratio: 20")
        spec["ratio"] = ratio
    return RankSpec(**spec)


def _check_positive_rank(value: Any) -> RankSpec:
    spec = _check_rank(value)
    if spec is None:
        raise custom_error("the rank must be at least 1", "write a whole number such as 32, or {energy: 0.95, max: 128}")
    return spec


def _check_quantile(value: Any) -> float:
    number = _check_real(value)
    if not 0.5 < number < 1.0:
        raise custom_error(f"clamp_quantile is a quantile between 0.5 and 1 (exclusive), got {number!r}", "write e.g. clamp_quantile: 0.99, or leave it out (no clamping)")
    return number


def _check_text_encoder_choice(value: Any) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    raise custom_error(f"text_encoder must be auto, true or false, got {describe_value(value)}", "write text_encoder: auto (include it when it differs), true or false")


def _check_min_diff(value: Any) -> float:
    number = _check_real(value)
    if number < 0:
        raise custom_error(f"min_diff cannot be negative, got {number!r}", "write e.g. min_diff: 0.0001, or 0 to skip only modules that are exactly equal")
    return number


PositiveRank = Annotated[RankSpec, BeforeValidator(_check_positive_rank)]
OptionalRank = Annotated[Union[RankSpec, None], BeforeValidator(_check_rank)]
# Which modules a LoRA output keeps: all, or those every common loader applies (kohya: docs/adapters.md,
# "What loaders skip"). Unset and "all" are the same and leave the field out of the canonical form.
ModuleSet = Annotated[Literal["all", "kohya"], BeforeValidator(_choice_checker(("all", "kohya"), "module set"))] | None


# The names a LoRA output is written by (formats/lora_output.py): kohya (the default; unset and "kohya" are
# the same and leave the field out of the canonical form) or diffusers/PEFT (docs/adapters.md).
LoraFormat = Annotated[Literal["kohya", "diffusers"], BeforeValidator(_choice_checker(("kohya", "diffusers"), "LoRA format"))] | None


def _without_default_modules(data: dict) -> dict:
    """``modules: all`` and ``format: kohya`` are the defaults: recipes without the fields (or with the
    defaults) keep their canonical bytes."""
    if data.get("modules", "all") in (None, "all"):
        data.pop("modules", None)
    if data.get("format", "kohya") in (None, "kohya"):
        data.pop("format", None)
    return data


class ExtractTarget(_TargetBase):
    """Extract a LoRA/LoCon from the difference tuned - base of two checkpoints (docs/extraction.md)."""

    produces: ClassVar[str] = "lora"
    kind: Literal["extract"]
    tuned: Name
    base: Name
    rank: PositiveRank = RankSpec(rank=32)
    conv_rank: OptionalRank = None  # 3x3 convs as LoCon; None (0 or absent) skips them
    text_encoder: Annotated[Union[bool, Literal["auto"]], BeforeValidator(_check_text_encoder_choice)] = "auto"
    svd: Annotated[Literal["randomized", "exact"], BeforeValidator(_choice_checker(("randomized", "exact"), "svd method"))] = "randomized"
    clamp_quantile: Annotated[float, BeforeValidator(_check_quantile)] | None = None
    min_diff: Annotated[float, BeforeValidator(_check_min_diff)] = 1e-4  # skip modules with max|dW| <= this
    modules: ModuleSet = None  # None = all (formats/arch/loaders.py)
    format: LoraFormat = None  # None = kohya

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return _without_default_modules(handler(self))

    def dependencies(self) -> tuple[str, ...]:
        return _unique((self.tuned, self.base))


# Method fields that are None unless the recipe gives them (dense_svd has a default, so it cannot be refused).
_OPTIONAL_METHOD_FIELDS = ("rank", "conv_rank", "clamp_quantile")


class LoraTarget(_TargetBase):
    """Merge (or, with one ingredient, resize) LoRA-family adapters into one LoRA (docs/merging.md)."""

    produces: ClassVar[str] = "lora"
    kind: Literal["lora"]
    method: Annotated[str, BeforeValidator(_choice_checker(tuple(LORA_METHODS), "merge method"))] = "svd"
    loras: tuple[LoraUse, ...] = Field(min_length=1)
    rank: Annotated[RankSpec, BeforeValidator(_check_positive_rank)] | None = None  # required for svd
    conv_rank: Annotated[RankSpec, BeforeValidator(_check_positive_rank)] | None = None  # k×k convs; default: rank
    dense_svd: Annotated[Literal["exact", "randomized"], BeforeValidator(_choice_checker(("exact", "randomized"), "dense SVD method"))] = "exact"
    clamp_quantile: Annotated[float, BeforeValidator(_check_quantile)] | None = None
    allow_unmatched: StrictFlag = False
    modules: ModuleSet = None  # None = all (formats/arch/loaders.py)
    format: LoraFormat = None  # None = kohya

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return _without_default_modules(handler(self))

    @model_validator(mode="after")
    def _fields_fit_the_method(self) -> LoraTarget:
        """The method's declared parameters decide which fields must and may be given (loraforge/methods/)."""
        method = LORA_METHODS[self.method]
        for field, hint in method.required.items():
            if getattr(self, field) is None:
                reason = f"method {method.name} needs a {field}"
                raise custom_error(reason, hint, problems=(((), reason, hint),))
        given = [name for name in _OPTIONAL_METHOD_FIELDS if name not in method.parameters and getattr(self, name) is not None]
        if given:
            others = [m.name for m in LORA_METHODS.values() if given[0] in m.parameters]
            reason = f"method {method.name} {method.unused_reason}, so {given[0]} has no meaning here"
            hint = f"remove {given[0]}" + (f", or use method: {others[0]} to reduce the rank" if others else "")
            raise custom_error(reason, hint, problems=(((given[0],), reason, hint),))
        return self

    def dependencies(self) -> tuple[str, ...]:
        return _unique(tuple(lora.use for lora in self.loras))


def _check_folder(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise custom_error(f"the output must be a folder path, got {describe_value(value)}", "write e.g. output: dist/my-release/")
    if value.endswith(".safetensors"):
        raise custom_error(f"a release is a folder, but {value!r} names a .safetensors file", "write a folder path such as dist/my-release/")
    if problem := _path_problem(value):
        raise custom_error(*problem)
    return value


def _check_destination(value: Any) -> str:
    try:
        parse_destination(value)
    except DestinationSyntaxError as error:
        raise custom_error(str(error), error.hint) from None
    return value.strip()


LICENSE_PATTERN = re.compile(r"[a-z0-9][a-z0-9.+-]*")


def _check_license(value: Any) -> str:
    if not isinstance(value, str) or not LICENSE_PATTERN.fullmatch(value):
        raise custom_error(
            f"the license must be a Hugging Face Hub license id, got {describe_value(value)}",
            "write e.g. license: creativeml-openrail-m (SD 1.x), openrail++ (SDXL), apache-2.0, or other",
        )
    return value


class PublishSpec(_Strict):
    """Where `loraforge publish` sends a release (docs/publishing.md)."""

    to: Annotated[str, BeforeValidator(_check_destination)]  # hf://ORG/REPO[@BRANCH]
    private: StrictFlag = False  # create the repository private (when publish creates it)


def _without_unset(data: dict, *names: str) -> dict:
    """Drop optional fields left unset, so recipes without them keep their canonical bytes and action keys."""
    for name in names:
        if name in data and data[name] is None:
            del data[name]
    return data


class ReleaseSpec(_TargetSpec):
    """Bundle other targets' outputs with manifest.json and a README.md model card (docs/releases.md)."""

    produces: ClassVar[str] = "bundle"
    kind: Literal["release"]
    include: tuple[Name, ...] | None = None  # None: every non-release target, in recipe order
    output: Annotated[str, BeforeValidator(_check_folder)] | None = None  # a folder; default dist/<name>
    description: Text | None = None  # the model card's description; default: the recipe's
    readme: StrictFlag = True
    publish: PublishSpec | None = None  # where `loraforge publish` sends the bundle

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return _without_unset(handler(self), "publish")

    # A release computes nothing, so it has no precision or device of its own;
    # these keep code that reads every target's fields working.
    @property
    def precision(self) -> None:
        return None

    @property
    def device(self) -> None:
        return None

    def dependencies(self) -> tuple[str, ...]:
        return _unique(self.include or ())  # the default (every target) needs the recipe: Recipe.dependencies

    def default_output(self, name: str) -> str:
        return f"dist/{name}"


class ConvertTarget(_TargetBase):
    """Rewrite a checkpoint's or LoRA's floating-point tensors in another dtype, each correctly rounded (docs/recipes.md)."""

    kind: Literal["convert"]
    source: Name  # an input or a target: any safetensors checkpoint or adapter
    dtype: Annotated[Literal["float16", "bfloat16", "float32"], BeforeValidator(_choice_checker(("float16", "bfloat16", "float32"), "dtype"))]

    def dependencies(self) -> tuple[str, ...]:
        return (self.source,)


# Every target kind's recipe model: a new kind adds its model here (and its TargetKind in loraforge/targets/).
TARGET_SPECS = (CheckpointTarget, ExtractTarget, LoraTarget, ReleaseSpec, ConvertTarget)
# ``kind`` picks the model.
Target = Annotated[Union[TARGET_SPECS], Field(discriminator="kind")]
TARGET_KINDS = tuple(get_args(spec.model_fields["kind"].annotation)[0] for spec in TARGET_SPECS)


class Recipe(_Strict):
    """A whole recipe file."""

    loraforge: Annotated[int, BeforeValidator(_check_schema_version)]
    name: Name
    title: Text | None = None  # filled with ``name`` when absent
    description: Text | None = None
    date: Annotated[str, BeforeValidator(_check_date)] | None = None
    license: Annotated[str, BeforeValidator(_check_license)] | None = None  # Hub license id; required to publish
    seed: Annotated[int, BeforeValidator(_check_seed)] = 0
    device: Device = "auto"
    precision: Precision = Precision()
    inputs: dict[Name, InputSpec] = Field(min_length=1)
    targets: dict[Name, Target] = Field(min_length=1)

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return _without_unset(handler(self), "license")

    @model_validator(mode="before")
    @classmethod
    def _title_defaults_to_name(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "title" not in data and "name" in data:
            return {**data, "title": data["name"]}
        return data

    @model_validator(mode="after")
    def _names_and_outputs_are_unique(self) -> Recipe:
        problems = [*self._name_clashes(), *self._output_clashes(), *release_problems(self)]
        if problems:
            raise custom_error("; ".join(reason for _, reason, _ in problems), problems[0][2], problems=tuple(problems))
        return self

    def _name_clashes(self) -> list[tuple]:
        return [
            (
                ("targets", name),
                f"the name {name!r} is used by an input and by a target",
                "inputs and targets share one namespace; rename the target or the input",
            )
            for name in self.targets
            if name in self.inputs
        ]

    def _output_clashes(self) -> list[tuple]:
        first_writer: dict[str, str] = {}
        problems = []
        for name in self.targets:
            output = self.default_output(name)
            # casefolded: paths differing only by case are one file on Windows and macOS filesystems
            normalised = os.path.normpath(output).casefold()
            if normalised in first_writer:
                earlier, earlier_output = first_writer[normalised]
                same = os.path.normpath(earlier_output) == os.path.normpath(output)
                problems.append(
                    (
                        ("targets", name, "output") if self.targets[name].output else ("targets", name),
                        f"targets {earlier!r} and {name!r} both write {output!r}" if same else
                        f"targets {earlier!r} and {name!r} write {earlier_output!r} and {output!r}, which differ only by case "
                        "and are one file on case-insensitive filesystems (Windows, macOS)",
                        "give each target its own output path" + ("" if same else ", differing in more than case"),
                    )
                )
            else:
                first_writer[normalised] = (name, output)
        return problems

    # --- helpers for later stages ---------------------------------------

    def default_output(self, target_name: str) -> str:
        """The target's output path as written, or dist/<target>.safetensors (a release: the folder dist/<target>)."""
        spec = self.targets[target_name]
        return spec.output or spec.default_output(target_name)

    def output_path(self, target_name: str, root: Path) -> Path:
        """Where the target is written: its output path resolved against ``root``."""
        return Path(root) / self.default_output(target_name)

    def effective_precision(self, target_name: str) -> Precision:
        return self.precision.merged_with(self.targets[target_name].precision)

    def effective_device(self, target_name: str) -> str:
        return self.targets[target_name].device or self.device

    def dependencies(self, target_name: str) -> tuple[str, ...]:
        """Input and target names the target reads, first use first, no repeats."""
        spec = self.targets[target_name]
        if spec.produces == "bundle" and spec.include is None:
            return tuple(name for name, target in self.targets.items() if target.produces != "bundle")
        return spec.dependencies()

    def canonical_json(self) -> str:
        """The recipe with defaults filled in as stable, compact JSON (provenance).

        Keys are sorted, numbers are in Python's shortest round-trip form, and
        each target's output is the effective (default-filled) path, so two
        recipes that mean the same thing give the same bytes. Credentials in a
        source URL are recorded as REDACTED (resolve/secrets.py).
        """
        from loraforge.resolve.secrets import redact_url

        data = self.model_dump(mode="json")
        for spec in data["inputs"].values():
            spec["source"] = redact_url(spec["source"])
        for name, target in data["targets"].items():
            target["output"] = self.default_output(name)
        return canonical_json(data, allow_nan=False)


def _unique(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def release_problems(recipe: Recipe) -> list[tuple]:
    """What a `kind: release` may not list: unknown names, inputs, other releases, repeats, nothing at all."""
    problems = []
    bundled = [name for name, target in recipe.targets.items() if target.produces != "bundle"]
    for name, spec in recipe.targets.items():
        if spec.produces != "bundle":
            continue
        if spec.include is None and not bundled:
            problems.append((("targets", name), "this release has nothing to bundle: the recipe has no other targets",
                             "add the targets whose outputs the release should contain"))
        if spec.include is not None and not spec.include:
            problems.append((("targets", name, "include"), "the include list is empty",
                             "list target names, or leave include out to bundle every target"))
        seen: set[str] = set()
        for index, used in enumerate(spec.include or ()):
            reason = _release_include_problem(recipe, used, seen)
            if reason:
                problems.append((("targets", name, "include", index), reason[0], reason[1]))
            seen.add(used)
    return problems


def _release_include_problem(recipe: Recipe, used: str, seen: set[str]) -> tuple[str, str] | None:
    targets = ", ".join(n for n, t in recipe.targets.items() if t.produces != "bundle") or "(none)"
    if used in seen:
        return f"{used!r} is listed twice", "list each target once"
    if used in recipe.inputs:
        return (f"{used!r} is an input; a release bundles outputs of targets",
                f"list targets only (every input is recorded in manifest.json anyway); targets: {targets}")
    if used not in recipe.targets:
        return f"there is no target named {used!r}", f"check the spelling; targets: {targets}"
    if recipe.targets[used].produces == "bundle":
        return (f"{used!r} is a release; a release cannot contain another release",
                f"list the targets of {used!r} here instead")
    return None
