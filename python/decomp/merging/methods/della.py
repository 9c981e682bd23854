"""DELLA-Merging (Deep, Bhardwaj & Poria, 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling"): MagPrune (drop each task vector entry with a probability that falls with its magnitude
rank, rescale the survivors by the inverse of their keep probability), then TIES' sign election and disjoint mean.

Checked against the authors' code (github.com/declare-lab/della, mergekit/mergekit/sparsify.py, rank_magnitude,
used by the method "della"): ranks are taken within each row (a 1-D tensor is one row), keep probabilities run
linearly from density - epsilon (smallest magnitude) to density + epsilon (largest), and the result is scaled by
λ (here `scale`). The drops are seeded by the counter-based hash of (seed, model, tensor, entry) on the stream
DARE uses (decomp.kernels.hashing.STREAM_DARE), so a merge is a pure function of its inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import Interval, Parameter, register_merge_method
from .linear import SCALE
from .ties import NORMALIZE, SEED, disjoint_mean, hash_uniforms


def keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """MagPrune's keep probability of each entry, shape of `tau`: per row ([rows, -1]; a 1-D tensor one row),
    ranks r = 1..n by |τ| ascending (ties by position), p_keep = density - ε + 2ε (r - 1) / (n - 1)
    (density itself when n = 1)."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    n = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(torch.float64)
    spread = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    return (density - epsilon + 2 * epsilon * spread).reshape(tau.shape)


def _prepare(context) -> None:
    density, epsilon = context.params["density"], context.params["epsilon"]
    if density - epsilon <= 0 or density + epsilon > 1:
        raise ValueError(f"method={context.method.name!r}: keep probabilities density ± epsilon must lie in (0, 1]; "
                         f"got density={density}, epsilon={epsilon}")


DELLA_PARAMETERS = [
    Parameter("density", 0.7, "mean keep probability of a task vector entry (the authors' 1 - drop rate)", float,
              Interval(0, 1, "(]")),
    Parameter("epsilon", 0.07, "half-width of the keep probabilities' range (the authors' window_size / 2)", float,
              Interval(0, 1, "[)")),
    SEED, SCALE]


def magprune(key: str, values: list[Tensor], context) -> tuple[Tensor, list[Tensor]]:
    """(θ_0, [τ̃_m]): each task vector's entries kept with their MagPrune probability p and divided by it."""
    base, taus = context.task_vectors(key, values)
    params = context.params
    dropped = []
    for m, tau in enumerate(taus):
        keep = keep_probabilities(tau, params["density"], params["epsilon"]).to(tau.device)
        survives = hash_uniforms(params["seed"], m, key, tau.shape, context.first_entry(tau)).to(tau.device) < keep
        dropped.append(torch.where(survives, tau / keep, torch.zeros_like(tau)))
    return base, dropped


# ranks are taken within each row, so the engine may hand the formula blocks of whole rows
@register_merge_method("della", needs=("base",), prepare=_prepare, slices="rows",
                       parameters=[*DELLA_PARAMETERS, NORMALIZE])
def della(key: str, values: list[Tensor], context) -> Tensor:
    """DELLA: MagPrune drops by magnitude rank, rescaling, then TIES' election and disjoint mean (Deep et al., 2024).

    For each task vector τ_m: p = keep_probabilities(τ_m, density, epsilon), keep entry i when
    u_i < p_i (u_i uniform from the hash of (seed, m, tensor, i)), τ̃_m = τ_m ∘ keep / p; then the sign of
    Σ λ_m τ̃_m is elected and the agreeing entries averaged with weights λ (as TIES; normalize=False: their
    λ-weighted sum): θ = θ_0 + scale τ*."""
    base, dropped = magprune(key, values, context)
    return base + context.params["scale"] * disjoint_mean(dropped, context.weights, context.params["normalize"])


@register_merge_method("della_linear", needs=("base",), prepare=_prepare, slices="rows", parameters=DELLA_PARAMETERS)
def della_linear(key: str, values: list[Tensor], context) -> Tensor:
    """DELLA-linear: MagPrune's drops and rescaling, then task arithmetic, no sign election (as mergekit).

    τ̃_m as in `della`; θ = θ_0 + scale Σ_m λ_m τ̃_m."""
    base, dropped = magprune(key, values, context)
    return base + context.params["scale"] * sum(w * t for w, t in zip(context.weights, dropped))
