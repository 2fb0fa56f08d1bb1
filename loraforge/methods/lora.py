"""`kind: lora` merge methods: concat (exact, rank Σrᵢ) and svd (Eckart–Young optimal rank-k).

Each method turns one output module's terms (loraforge.ops.merge.ModuleTerms)
into saved factors; the math is in loraforge.ops.merge and loraforge.ops.svd.
Those (and torch) are imported where a method runs, so the recipe schema can
read the registry without loading torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from loraforge.methods.base import MergeMethod

if TYPE_CHECKING:
    import torch

    from loraforge.ops.merge import ModuleTerms
    from loraforge.ops.svd import LowRankResult, RankPolicy

# Fields of a `kind: lora` target that belong to one method or another.
METHOD_FIELDS = ("rank", "conv_rank", "dense_svd", "clamp_quantile")


class LoraMergeMethod(MergeMethod):
    """A method of `kind: lora`: bound each module's rank, merge it, write its factors."""

    def rank_policy(self, spec, is_conv: bool) -> RankPolicy | None:
        """The rank rule of a module (None: the method keeps every rank)."""
        return None

    def module_bound(self, policy: RankPolicy | None, factored_rank: int, dense: bool, limit: int) -> int:
        """The most ranks the output module can have (sizes the output before it is built)."""
        raise NotImplementedError

    def merge(self, terms: ModuleTerms, policy: RankPolicy | None, target, module_name: str) -> LowRankResult:
        raise NotImplementedError

    def saved_factors(self, terms: ModuleTerms, result: LowRankResult, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) in the save dtype, each element rounded once."""
        from loraforge.ops.rounding import round_float64

        return round_float64(result.up, dtype), round_float64(result.down, dtype)

    def known_norm(self, terms: ModuleTerms, result: LowRankResult) -> float | None:
        """‖Σ cᵢ·ΔWᵢ‖_F when the result already knows it; else None (it is computed)."""
        return None


class Concat(LoraMergeMethod):
    name = "concat"
    summary = "exact: the factors side by side, rank Σrᵢ, correctly rounded"
    unused_reason = "keeps every rank exactly"

    def module_bound(self, policy, factored_rank, dense, limit):
        return factored_rank + (limit if dense else 0)

    def merge(self, terms, policy, target, module_name):
        from loraforge.ops.merge import concat

        return concat(terms)

    def saved_factors(self, terms, result, dtype):
        from loraforge.ops.merge import concat_rounded

        if terms.dense is None:
            return concat_rounded(terms, dtype)  # correctly rounded: the same bytes everywhere
        return super().saved_factors(terms, result, dtype)


class Svd(LoraMergeMethod):
    name = "svd"
    summary = "the best rank-k approximation (Eckart–Young) under a rank policy"
    parameters = ("rank", "conv_rank", "dense_svd", "clamp_quantile")
    required: ClassVar[dict[str, str]] = {
        "rank": "add e.g. rank: 32, or rank: {energy: 0.99, max: 128}; or use method: concat (exact, no rank)",
    }
    device_dependent = True
    seeded = True

    def rank_policy(self, spec, is_conv):
        from loraforge.ops.svd import RankPolicy

        rank_spec = spec.conv_rank if (is_conv and spec.conv_rank is not None) else spec.rank
        return RankPolicy(rank=rank_spec.rank, energy=rank_spec.energy, ratio=rank_spec.ratio, max_rank=rank_spec.max)

    def module_bound(self, policy, factored_rank, dense, limit):
        available = limit if dense else min(limit, factored_rank)
        return min(available, policy.bound) if policy.bound is not None else available

    def merge(self, terms, policy, target, module_name):
        from loraforge.ops.merge import svd_merge
        from loraforge.ops.svd import module_seed

        assert policy is not None
        return svd_merge(
            terms,
            policy,
            dense_method=target.dense_svd,
            generator_seed=module_seed(target.seed, module_name),
            clamp_quantile=target.clamp_quantile,
        )

    def known_norm(self, terms, result):
        if terms.dense is None:  # the factored SVD computed every singular value
            return math.sqrt(float((result.singular_values**2).sum()))
        return None


# The registry, in the order recipes' error messages list the choices.
LORA_METHODS: dict[str, LoraMergeMethod] = {method.name: method for method in (Svd(), Concat())}


def lora_method(name: str) -> LoraMergeMethod:
    return LORA_METHODS[name]
