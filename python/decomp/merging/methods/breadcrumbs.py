"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
Sparse Masks"): each task vector loses its largest entries (outliers) and its smallest (noise), then task
arithmetic.

Parametrised as mergekit does (github.com/arcee-ai/mergekit, mergekit/sparsify.py, magnitude_outliers, and
docs/merge_methods.md): per tensor, `density` is the fraction kept and `gamma` the fraction of largest
magnitudes removed (the paper's β); the smallest 1 - density - gamma are removed with them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..registry import Interval, Parameter, register_merge_method
from .linear import SCALE
from .ties import NORMALIZE, disjoint_mean


def breadcrumbs_mask(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Which entries of `tau` are kept: with n entries, the top ⌊gamma n⌋ magnitudes and the bottom
    n - ⌊density n⌋ - ⌊gamma n⌋ are removed (when that is negative, fewer top ones, so ⌊density n⌋ remain);
    density >= 1 keeps everything. Ties in magnitude are ranked by position."""
    n = tau.numel()
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    target, top = int(density * n), int(gamma * n)
    bottom = n - target - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    order = torch.argsort(tau.abs().flatten(), stable=True)
    mask = torch.zeros(n, dtype=torch.bool, device=tau.device)
    mask[order[bottom:n - top]] = True
    return mask.reshape(tau.shape)


BREADCRUMBS_PARAMETERS = [
    Parameter("density", 0.9, "fraction of each task vector's entries kept, per tensor", float,
              Interval(0, 1, "(]")),
    Parameter("gamma", 0.01, "fraction of largest-magnitude entries removed (the paper's β)", float,
              Interval(0, 1, "[)")),
    SCALE]


def _crumbs(key: str, values: list[Tensor], context) -> tuple[Tensor, Optional[list[Tensor]]]:
    """(θ_0, the masked task vectors), or (θ_0, None) when no task changed the tensor."""
    base, taus = context.task_vectors(key, values)
    if not any(bool(t.any()) for t in taus):
        # a tensor no task changed (frozen word embeddings) merges to the base whatever the masks: ranking its
        # zeros took an argsort per model of the largest tensor, the merge's peak memory (3.9 GB on MiniLM x 8)
        return base, None
    density, gamma = context.params["density"], context.params["gamma"]
    return base, [t * breadcrumbs_mask(t, density, gamma) for t in taus]


@register_merge_method("breadcrumbs", needs=("base",), parameters=BREADCRUMBS_PARAMETERS)
def breadcrumbs(key: str, values: list[Tensor], context) -> Tensor:
    """Breadcrumbs: drop each task vector's largest and smallest entries, then add (Davari & Belilovsky, 2024).

    τ̃_m = τ_m ∘ breadcrumbs_mask(τ_m, density, gamma) per tensor; θ = θ_0 + scale Σ_m λ_m τ̃_m."""
    base, kept = _crumbs(key, values, context)
    if kept is None:
        return base
    return base + context.params["scale"] * sum(w * t for w, t in zip(context.weights, kept))


@register_merge_method("breadcrumbs_ties", needs=("base",), parameters=[*BREADCRUMBS_PARAMETERS, NORMALIZE])
def breadcrumbs_ties(key: str, values: list[Tensor], context) -> Tensor:
    """Breadcrumbs-TIES: breadcrumbs' masks, then TIES' sign election and disjoint mean (as mergekit).

    τ̃_m as in `breadcrumbs`; θ = θ_0 + scale τ* with τ* the disjoint mean of `ties` over the τ̃_m
    (normalize=False: the agreeing entries' λ-weighted sum)."""
    base, kept = _crumbs(key, values, context)
    if kept is None:
        return base
    return base + context.params["scale"] * disjoint_mean(kept, context.weights, context.params["normalize"])
