"""Recombination of components: θ_0 + P_S τ, a fine-tuned model's task vector restricted to chosen components."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .engine import MergedState, make_plan
from .sources import Source


def submodel(base, finetuned, directions: Sequence[dict], select: Sequence[int], *, mode: str = "project",
             component_fishers: Optional[Sequence[dict]] = None) -> MergedState:
    """θ_0 + P_S τ: the task vector of `finetuned` restricted to the chosen components S.

    mode="project": P_S projects τ (all floating tensors, flattened together) onto the span of the chosen
    components' parameter directions v_c (Components.parameter_directions), by least squares over their Gram
    matrix, streaming tensor by tensor. mode="fisher": each entry of τ scaled by the share of the chosen
    components in that entry's Fisher, F_S / F_all (component_fishers: all components' Fishers)."""
    if mode not in ("project", "fisher"):
        raise ValueError(f"mode must be 'project' or 'fisher'; got {mode!r}")
    if mode == "fisher" and component_fishers is None:
        raise ValueError("mode='fisher' needs component_fishers=[the Fisher of every component]")
    chosen = list(select)
    available = len(directions if mode == "project" else component_fishers)
    if not chosen or any(not 0 <= c < available for c in chosen):
        raise ValueError(f"select must name components in [0, {available}); got {chosen}")
    base_source, tuned = Source(base, "base"), Source(finetuned, "finetuned")
    plan = make_plan([tuned], base_source, None)
    result = MergedState()
    result.heads, result.notes = {0: {}}, {}
    if mode == "project":
        _project(result, base_source, tuned, plan.merged, [directions[c] for c in chosen])
    else:
        _fisher_share(result, base_source, tuned, plan.merged, component_fishers, chosen)
    for key in plan.copied:
        result[key] = tuned.get(key).clone()
    result.recipe = {"method": "submodel", "mode": mode, "select": chosen}
    return result


def _project(result: MergedState, base: Source, tuned: Source, keys: list[str], chosen: list[dict]) -> None:
    """θ_0 + V a with a = argmin |V a - τ|, V [P, |S|] the chosen directions flattened over every tensor they
    cover: the normal equations (VᵀV) a = Vᵀτ are summed tensor by tensor, so no flat vector is formed."""
    covered = [k for k in keys if k in chosen[0]]
    gram = torch.zeros(len(chosen), len(chosen), dtype=torch.float64)
    inner = torch.zeros(len(chosen), dtype=torch.float64)
    for key in covered:
        tau = tuned.get(key).double() - base.get(key).double()
        vectors = torch.stack([direction[key].double().flatten() for direction in chosen])
        gram += vectors @ vectors.T
        inner += vectors @ tau.flatten()
    coefficients = torch.linalg.lstsq(gram, inner[:, None]).solution[:, 0]
    for key in keys:
        base_value = base.get(key)
        if key in covered:
            step = sum(float(a) * direction[key].double() for a, direction in zip(coefficients, chosen))
            result[key] = (base_value.double() + step.reshape(base_value.shape)).to(base_value.dtype)
        else:
            result[key] = base_value.clone()
            result.notes[key] = "no component direction: kept from the base"


def _fisher_share(result: MergedState, base: Source, tuned: Source, keys: list[str], fishers: Sequence[dict],
                  chosen: list[int]) -> None:
    """θ_0 + (F_S / F_all) ∘ τ, entry by entry (0 where every component's Fisher is 0)."""
    for key in keys:
        base_value = base.get(key)
        if key not in fishers[0]:
            result[key] = base_value.clone()
            result.notes[key] = "no component Fisher: kept from the base"
            continue
        tau = tuned.get(key).double() - base_value.double()
        everything = sum(f[key].double() for f in fishers)
        share = sum(fishers[c][key].double() for c in chosen) / everything.clamp(min=1e-300)
        result[key] = (base_value.double() + torch.where(everything > 0, share, 0.0) * tau).to(base_value.dtype)
