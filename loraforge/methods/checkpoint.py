"""Checkpoint-merge methods (`kind: checkpoint` with `merge:`): one class per method, declared parameters.

A method declares how many models it takes, whether it needs a ``base`` (the
model task vectors are taken against), its parameters (each a number or a
block-weight spec, optionally one per model, or a flag) with their ranges and
defaults, and whether it is *linear* (a fixed linear combination of the
models, correctly rounded) or not (fixed-order float64, device-dependent
bytes). The recipe schema validates a `merge:` mapping with the pydantic model
built from these declarations (:meth:`CheckpointMergeMethod.parameters_model`),
so errors point at the parameter; the planner evaluates each parameter per
block; the executor calls :meth:`linear_terms` or :meth:`merge` per tensor.
The math is in :mod:`loraforge.ops.checkpoint_merge` (imported where a method
runs, so the schema can read the registry without loading torch).
Formulas and sources: docs/merging-checkpoints.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, create_model
from typing_extensions import Annotated

from loraforge.methods.base import MergeMethod

# A parameter's value as written: a number, or a block-weight spec in its raw form
# (preset name, tuple of numbers, mapping of block ids / ranges to numbers).
Value = Any


class ParameterError(ValueError):
    """A parameter value the method refuses: ``reason`` and how to fix it (``hint``); ``at``: sub-path."""

    def __init__(self, reason: str, hint: str = "", at: tuple = ()):
        super().__init__(reason)
        self.reason, self.hint, self.at = reason, hint, at


@dataclass(frozen=True)
class Parameter:
    """One declared parameter of a method."""

    name: str
    summary: str
    kind: Literal["weight", "flag"] = "weight"  # weight: number or block-weight spec; flag: true/false
    per_model: bool = False  # one value per model in `models:` (a list)
    required: bool = False
    default: Any = None  # per_model: the value every model gets
    low: float | None = None  # range of every number (block-weight entries included)
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""  # what to write when it is missing or wrong

    def range_text(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{low}, {high}{')' if self.high_open or self.high is None else ']'}"

    def in_range(self, number: float) -> bool:
        if self.low is not None and (number < self.low or (self.low_open and number == self.low)):
            return False
        if self.high is not None and (number > self.high or (self.high_open and number == self.high)):
            return False
        return True


# --- value checks (no recipe import: the recipe layer imports this one) ---------------


def _number(value: Any, parameter: Parameter, at: tuple = ()) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParameterError(f"{parameter.name}: expected a number, got {value!r}", parameter.hint or "write a number such as 0.5", at)
    number = float(value)
    if not math.isfinite(number):
        raise ParameterError(f"{parameter.name}: expected a finite number, got {value!r}", parameter.hint, at)
    if not parameter.in_range(number):
        raise ParameterError(
            f"{parameter.name} must lie in {parameter.range_text()}, got {number!r}",
            parameter.hint or f"write a number in {parameter.range_text()}", at,
        )
    return number


def _weight(value: Any, parameter: Parameter, at: tuple = ()) -> Value:
    """A number, or a block-weight spec checked in form (its meaning needs the architecture)."""
    if isinstance(value, str):
        if not value.strip():
            raise ParameterError(f"{parameter.name}: the block-weight spec is empty", parameter.hint, at)
        return value.strip()
    if isinstance(value, (list, tuple)):
        if not value:
            raise ParameterError(f"{parameter.name}: the block-weight vector is empty", parameter.hint, at)
        return tuple(_number(item, parameter, (*at, i)) for i, item in enumerate(value))
    if isinstance(value, Mapping):
        if not value:
            raise ParameterError(f"{parameter.name}: the block-weight mapping is empty", parameter.hint, at)
        checked = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ParameterError(f"{parameter.name}: block ids are text such as IN04, got {key!r}", "write e.g. IN04: 0.5", (*at, key))
            checked[key] = _number(item, parameter, (*at, key))
        return checked
    return _number(value, parameter, at)


def _flag(value: Any, parameter: Parameter) -> bool:
    if not isinstance(value, bool):
        raise ParameterError(f"{parameter.name}: expected true or false, got {value!r}", "write true or false without quotes")
    return value


def _checker(parameter: Parameter):
    def check(value: Any) -> Any:
        if parameter.kind == "flag":
            return _flag(value, parameter)
        if parameter.per_model:
            if not isinstance(value, (list, tuple)):
                raise ParameterError(
                    f"{parameter.name} is a list with one value per model, got {value!r}",
                    parameter.hint or f"write e.g. {parameter.name}: [0.5, 0.5]",
                )
            return tuple(_weight(item, parameter, (i,)) for i, item in enumerate(value))
        return _weight(value, parameter)

    return check


class _Parameters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- methods ------------------------------------------------------------------------


class CheckpointMergeMethod(MergeMethod):
    """A method of `merge:`: its models, its base rule, its declared parameters, its math."""

    min_models: ClassVar[int] = 2
    max_models: ClassVar[int | None] = None
    base: ClassVar[Literal["required", "optional", "refused"]] = "refused"
    declared: ClassVar[tuple[Parameter, ...]] = ()
    linear: ClassVar[bool] = True  # correctly rounded linear combination; else fixed-order float64
    formula: ClassVar[str] = ""  # for plan, provenance and the release card

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.parameters = tuple(p.name for p in cls.declared)
        cls.required = {p.name: p.hint for p in cls.declared if p.required}
        cls.device_dependent = not cls.linear

    def parameters_model(self) -> type[BaseModel]:
        """The pydantic model of this method's parameters (cached per class)."""
        model = type(self).__dict__.get("_model")
        if model is None:
            fields = {
                p.name: (Annotated[Any, BeforeValidator(_checker(p))], ... if p.required else None)
                for p in self.declared
            }
            model = create_model(f"{type(self).__name__}Parameters", __base__=_Parameters, **fields)
            type(self)._model = model
        return model

    def defaults(self, n_models: int) -> dict[str, Any]:
        """Every parameter's default (per-model ones repeated per model)."""
        return {
            p.name: (tuple([p.default] * n_models) if p.per_model else p.default)
            for p in self.declared if p.default is not None
        }

    def check(self, values: Mapping[str, Any]) -> tuple[str, str] | None:
        """A problem (reason, hint) with the parameters' values at one block that their ranges cannot express."""
        return None

    def keeps_equal_inputs(self, values: Mapping[str, Any]) -> bool:
        """Whether bitwise-equal inputs give that same tensor back (then it is copied as bytes)."""
        return True

    # Linear methods: the output is Σ_k (Π factors_k) · model[source_k], optionally divided by Σ of the
    # divisor factors; the ops compute RN(exact value) from these terms.
    def linear_terms(self, values: Mapping[str, Any], n_models: int) -> tuple[list[tuple[tuple[float, ...], int]], tuple[float, ...] | None]:
        """(terms, divisor): each term (factors, source) with source the index into models (base last when there is one)."""
        raise NotImplementedError

    def merge(self, tensors: list, base, values: Mapping[str, Any], seeds: list[int]):
        """Non-linear methods: float64 tensors in, float64 tensor out (fixed operation order)."""
        raise NotImplementedError

    # Elementwise non-linear methods: once prepare() has the tensor's state (TIES: which elements the
    # trim keeps), output element i depends on element i of the inputs only, so the executor computes
    # the tensor in chunks (float64 copies of one chunk per model, not of whole tensors) on the run's
    # threads; same bytes as merge() on the whole tensor.
    elementwise: ClassVar[bool] = False

    def prepare(self, models: list, base, values: Mapping[str, Any], pool=None):
        """Per-tensor state from the stored (not widened) tensors."""
        return None

    def merge_part(self, tensors: list, base, values: Mapping[str, Any], seeds: list[int], state, start: int):
        """merge() of the elements from flat index ``start`` on (float64 chunks of the flattened tensors)."""
        return self.merge(tensors, base, values, seeds)


_WEIGHTS_HINT = "write one number or block-weight spec per model, e.g. weights: [0.5, 0.5]"
_DENSITY = Parameter(
    "density", "fraction of each task vector kept", required=True, low=0.0, low_open=True, high=1.0,
    hint="write a fraction in (0, 1], e.g. density: 0.2 (keep 20 %)",
)
_LAMBDA = Parameter("lambda", "scale of the merged task vector", default=1.0, hint="write e.g. lambda: 1")
_TASK_WEIGHTS = Parameter("weights", "weight of each task vector", per_model=True, default=1.0, hint=_WEIGHTS_HINT)


class WeightedSum(CheckpointMergeMethod):
    name = "weighted_sum"
    summary = "Σ wᵢ·Wᵢ (normalize: divided by Σ wᵢ), correctly rounded"
    formula = "sum_i w_i * W_i  (normalize: / sum_i w_i)"
    declared = (
        Parameter("weights", "weight of each model", per_model=True, required=True, hint=_WEIGHTS_HINT),
        Parameter("normalize", "divide by the sum of the weights", kind="flag", default=False),
    )

    def keeps_equal_inputs(self, values):
        from fractions import Fraction

        total = sum(Fraction(w) for w in values["weights"])  # exact: Σ wᵢ·x = x only when Σ wᵢ is exactly 1
        return total != 0 if values.get("normalize") else total == 1

    def check(self, values):
        from fractions import Fraction

        if values.get("normalize") and sum(Fraction(w) for w in values["weights"]) == 0:
            return "the weights sum to 0, so normalize would divide by zero", "change a weight, or set normalize: false"
        return None

    def linear_terms(self, values, n_models):
        weights = values["weights"]
        terms = [((float(w),), i) for i, w in enumerate(weights)]
        return terms, (tuple(float(w) for w in weights) if values.get("normalize") else None)


class AddDifference(CheckpointMergeMethod):
    name = "add_difference"
    summary = "A + α·(B − C), correctly rounded"
    formula = "A + alpha * (B - C)"
    min_models = max_models = 3
    declared = (Parameter("alpha", "scale of the difference B − C", required=True, hint="write e.g. alpha: 1"),)

    def linear_terms(self, values, n_models):
        alpha = float(values["alpha"])
        return [((1.0,), 0), ((alpha,), 1), ((-alpha,), 2)], None


class TaskArithmetic(CheckpointMergeMethod):
    name = "task_arithmetic"
    summary = "base + λ·Σ wᵢ·(Wᵢ − base), correctly rounded"
    formula = "base + lambda * sum_i w_i * (W_i - base)"
    min_models = 1
    base = "required"
    declared = (
        _TASK_WEIGHTS,
        _LAMBDA,
    )

    def linear_terms(self, values, n_models):
        scale = float(values["lambda"])
        terms = [((1.0,), n_models)]
        for i, w in enumerate(values["weights"]):
            terms += [((scale, float(w)), i), ((-scale, float(w)), n_models)]
        return terms, None


class Ties(CheckpointMergeMethod):
    name = "ties"
    summary = "TIES: trim to the top density of |τᵢ|, elect signs by Σ, disjoint mean"
    formula = "base + lambda * sum_i w_i*trim(tau_i)[agree] / sum_i w_i[agree]"
    min_models = 1
    base = "required"
    linear = False
    declared = (
        _DENSITY,
        _TASK_WEIGHTS,
        _LAMBDA,
        Parameter("normalize", "divide by the agreeing weights (disjoint mean)", kind="flag", default=True),
    )

    elementwise = True

    def merge(self, tensors, base, values, seeds):
        from loraforge.ops.checkpoint_merge import ties_merge, trim_top

        deltas = [trim_top(t - base, values["density"]) for t in tensors]
        return ties_merge(base, deltas, values["weights"], values["lambda"], values["normalize"])

    def prepare(self, models, base, values, pool=None):
        from loraforge.ops.checkpoint_merge import top_magnitudes

        return top_magnitudes(models, base, values["density"], pool)

    def merge_part(self, tensors, base, values, seeds, state, start):
        import torch

        from loraforge.ops.checkpoint_merge import ties_merge

        part = slice(start, start + tensors[0].numel())
        deltas = [torch.where(kept[part], t - base, torch.zeros_like(t)) for t, kept in zip(tensors, state)]
        return ties_merge(base, deltas, values["weights"], values["lambda"], values["normalize"])


class Dare(CheckpointMergeMethod):
    name = "dare"
    summary = "DARE: keep each τᵢ element with probability density (seeded), rescale by 1/density, add"
    formula = "base + lambda * sum_i w_i * bernoulli_mask(tau_i) * tau_i / density"
    min_models = 1
    base = "required"
    linear = False
    seeded = True
    declared = (
        _DENSITY,
        _TASK_WEIGHTS,
        _LAMBDA,
    )

    elementwise = True  # the masks of a chunk come from the generator advanced to its first element

    def merge(self, tensors, base, values, seeds):
        return self.merge_part(tensors, base, values, seeds, None, 0)

    def merge_part(self, tensors, base, values, seeds, state, start):
        from loraforge.ops.checkpoint_merge import dare_delta, weighted_delta_sum

        deltas = [dare_delta(t - base, values["density"], seed, start) for t, seed in zip(tensors, seeds)]
        return weighted_delta_sum(base, deltas, values["weights"], values["lambda"])


class DareTies(CheckpointMergeMethod):
    name = "dare_ties"
    summary = "DARE masks (seeded) then TIES sign election"
    formula = "base + lambda * sum_i w_i*dare(tau_i)[agree] (normalize: / sum_i w_i[agree])"
    min_models = 1
    base = "required"
    linear = False
    seeded = True
    declared = (
        _DENSITY,
        _TASK_WEIGHTS,
        _LAMBDA,
        Parameter("normalize", "divide by the agreeing weights", kind="flag", default=False),
    )

    elementwise = True  # as dare

    def merge(self, tensors, base, values, seeds):
        return self.merge_part(tensors, base, values, seeds, None, 0)

    def merge_part(self, tensors, base, values, seeds, state, start):
        from loraforge.ops.checkpoint_merge import dare_delta, ties_merge

        deltas = [dare_delta(t - base, values["density"], seed, start) for t, seed in zip(tensors, seeds)]
        return ties_merge(base, deltas, values["weights"], values["lambda"], values["normalize"])


class Slerp(CheckpointMergeMethod):
    name = "slerp"
    summary = "spherical interpolation of two models (or of their task vectors against a base)"
    formula = "sin((1-t)θ)/sinθ * A + sin(tθ)/sinθ * B  (lerp when |cosθ| > 0.9995)"
    min_models = max_models = 2
    base = "optional"
    linear = False
    declared = (Parameter("t", "position between the first (0) and the second (1) model", required=True, hint="write e.g. t: 0.5"),)

    def merge(self, tensors, base, values, seeds):
        from loraforge.ops.checkpoint_merge import slerp

        if base is None:
            return slerp(tensors[0], tensors[1], values["t"])
        return base + slerp(tensors[0] - base, tensors[1] - base, values["t"])


class Della(CheckpointMergeMethod):
    name = "della"
    summary = "DELLA: MagPrune (keep probability by magnitude rank per row, seeded), rescale, TIES sign election, fuse"
    formula = "base + lambda * sum_i w_i*magprune(tau_i)[agree] (normalize: / sum_i w_i[agree])"
    min_models = 1
    base = "required"
    linear = False
    seeded = True
    declared = (
        _DENSITY,
        Parameter("epsilon", "half-width of the keep probabilities around density", default=0.1, low=0.0,
                  hint="write e.g. epsilon: 0.1, with density − epsilon > 0 and density + epsilon ≤ 1"),
        _TASK_WEIGHTS,
        _LAMBDA,
        Parameter("normalize", "divide by the agreeing weights (the paper's fuse: a mean)", kind="flag", default=True),
    )

    def check(self, values):
        density, epsilon = values["density"], values["epsilon"]
        if not (density - epsilon > 0 and density + epsilon <= 1):
            return (f"density {density:g} and epsilon {epsilon:g} give keep probabilities outside (0, 1]",
                    "choose epsilon with density − epsilon > 0 and density + epsilon ≤ 1")
        return None

    def merge(self, tensors, base, values, seeds):
        from loraforge.ops.checkpoint_merge import magprune_delta, ties_merge

        deltas = [magprune_delta(t - base, values["density"], values["epsilon"], seed) for t, seed in zip(tensors, seeds)]
        return ties_merge(base, deltas, values["weights"], values["lambda"], values["normalize"])


class ModelStock(CheckpointMergeMethod):
    name = "model_stock"
    summary = "Model Stock: t·mean(Wᵢ) + (1 − t)·base, t from the mean pairwise cosine of the task vectors"
    formula = "t * mean_i W_i + (1 - t) * base, t = N cos / (1 + (N - 1) cos)"
    base = "required"
    linear = False

    def merge(self, tensors, base, values, seeds):
        from loraforge.ops.checkpoint_merge import model_stock

        return model_stock(base, tensors)


class TrainDifference(CheckpointMergeMethod):
    name = "train_difference"
    summary = "SuperMerger's train difference: A + α·1.8·sign(B − C)·|B − C|·|B − A| / (|B − C| + |B − A|)"
    formula = "A + alpha * 1.8 * sign(B - C) * |B - C| * |B - A| / (|B - C| + |B - A|)"
    min_models = max_models = 3
    linear = False
    declared = (Parameter("alpha", "scale of the trained difference", required=True, hint="write e.g. alpha: 1"),)
    elementwise = True

    def merge(self, tensors, base, values, seeds):
        from loraforge.ops.checkpoint_merge import train_difference

        return train_difference(tensors[0], tensors[1], tensors[2], values["alpha"])


# The registry, in the order docs and errors list the choices.
CHECKPOINT_METHODS: dict[str, CheckpointMergeMethod] = {
    method.name: method
    for method in (WeightedSum(), AddDifference(), TaskArithmetic(), Ties(), Dare(), DareTies(), Della(), ModelStock(),
                   Slerp(), TrainDifference())
}


def checkpoint_method(name: str) -> CheckpointMergeMethod:
    return CHECKPOINT_METHODS[name]
