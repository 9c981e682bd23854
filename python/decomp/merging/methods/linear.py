"""Linear merges: the weighted average of the models, and task arithmetic on their task vectors."""

from __future__ import annotations

from torch import Tensor

from ..registry import Parameter, register_merge_method

SCALE = Parameter("scale", 1.0, "global coefficient of the merged task vector: θ_0 + scale·Δ")


@register_merge_method("average", normalizes=True, slices="entries")
def average(key: str, values: list[Tensor], context) -> Tensor:
    """Weighted average Σ λ_m θ_m / Σ λ_m (model soups; Wortsman et al., 2022)."""
    return context.mean(values)


@register_merge_method("task_arithmetic", parameters=[SCALE], needs=("base",), slices="entries")
def task_arithmetic(key: str, values: list[Tensor], context) -> Tensor:
    """Task arithmetic: θ_0 + scale Σ λ_m τ_m (Ilharco et al., 2023, "Editing models with task arithmetic")."""
    base, taus = context.task_vectors(key, values)
    return base + context.params["scale"] * sum(w * t for w, t in zip(context.weights, taus))
