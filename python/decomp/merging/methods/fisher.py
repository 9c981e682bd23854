"""Fisher-weighted merging (Matena & Raffel, 2022) and its component-restricted form, `components` (ours)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import Tensor

from ..registry import REQUIRED, Interval, ModelIndex, Parameter, PerModel, register_merge_method

WEIGHTING = [
    Parameter("floor", 0.0, "absolute floor of every Fisher entry", float, Interval(0)),
    Parameter("floor_relative", None, "floor as a multiple of each model's mean Fisher (instead of floor)", float,
              Interval(0)),
    Parameter("normalize", False, "divide each model's Fisher by its mean over the merged tensors", bool),
    Parameter("normalize_per_tensor", False, "divide each model's Fisher by its mean within each tensor (every model "
              "then weighs the same in every tensor)", bool),
    Parameter("favor", None, "index of a model to favour (it gets favor_weight, the others share the rest)", int,
              ModelIndex()),
    Parameter("favor_weight", 0.5, "weight of the favoured model", float, Interval(0, 1)),
]


SCALED = Parameter("scale", 1.0, "coefficient of the merged task vector, θ_0 + scale·(θ_F - θ_0) (needs base= "
                   "unless 1)", float, Interval(0))


@dataclass
class FisherWeights:
    """What the Fisher formula needs, computed once: each model's Fisher (key -> tensor) and, when normalize or
    floor_relative asks for it, its mean over the merged tensors (per tensor with normalize_per_tensor)."""
    fishers: list[Mapping[str, Tensor]]
    means: list[Optional[float]]
    tensor_means: list[dict]


def _means(fishers: list[Mapping[str, Tensor]], context) -> tuple[list[Optional[float]], list[dict]]:
    """(each model's mean Fisher over the merged tensors, each model's key -> mean within that tensor)."""
    params = context.params
    if not (params["normalize"] or params["normalize_per_tensor"] or params["floor_relative"] is not None):
        return [None] * len(fishers), [{} for _ in fishers]
    merged = set(context.plan.merged)
    means, tensor_means = [], []
    for fisher in fishers:
        total, count, per_tensor = 0.0, 0, {}
        for key in fisher:
            if key in merged:   # each tensor read once (a ChosenSum sums its components at each read)
                value = fisher[key]
                per_tensor[key] = float(value.double().mean()) if value.numel() else 0.0
                total, count = total + per_tensor[key] * value.numel(), count + value.numel()
        means.append(total / max(count, 1))
        tensor_means.append(per_tensor)
    return means, tensor_means


def _check_options(context) -> None:
    params, name = context.params, context.method.name
    if params["normalize"] and params["normalize_per_tensor"]:
        raise ValueError(f"method={name!r}: normalize=True and normalize_per_tensor=True exclude each other; got both")
    if params["scale"] != 1.0 and context.base is None:
        raise ValueError(f"method={name!r} with scale={params['scale']} needs base= (θ = θ_0 + scale·(θ_F - θ_0)); "
                         f"got no base")


def _prepare_fisher(context) -> FisherWeights:
    _check_options(context)
    return FisherWeights(context.fishers, *_means(context.fishers, context))


def _prepare_components(context) -> FisherWeights:
    """F_{m,S} = Σ_{c in S_m} F_{m,c}: each model's chosen component Fishers summed."""
    _check_options(context)
    combined = []
    for m, (per_component, chosen) in enumerate(zip(context.components, context.params["select"])):
        if not chosen:
            raise ValueError(f"select[{m}] is empty: choose at least one component of model {m}")
        bad = [c for c in chosen if not 0 <= c < len(per_component)]
        if bad:
            raise ValueError(f"select[{m}] names component {bad[0]}, but model {m} has {len(per_component)}")
        combined.append(ChosenSum(per_component, chosen))
    return FisherWeights(combined, *_means(combined, context))


class ChosenSum(Mapping):
    """key -> Σ_{c in chosen} F_c[key], summed when a tensor asks for it: summing every tensor up front held one
    more model-sized Fisher per model for the whole merge (and component Fishers stored on disk stay there)."""

    def __init__(self, per_component: list[Mapping[str, Tensor]], chosen: list[int]):
        self.per_component, self.chosen = per_component, list(chosen)

    def __getitem__(self, key: str) -> Tensor:
        return sum(self.per_component[c][key] for c in self.chosen)

    def __contains__(self, key) -> bool:   # without summing
        return key in self.per_component[self.chosen[0]]

    def __iter__(self):
        return iter(self.per_component[self.chosen[0]])

    def __len__(self) -> int:
        return len(self.per_component[self.chosen[0]])


@register_merge_method("fisher", needs=("fishers",), prepare=_prepare_fisher, parameters=[*WEIGHTING, SCALED],
                       normalizes=True, slices="entries")
def fisher(key: str, values: list[Tensor], context) -> Tensor:
    """Fisher merging: the Fisher-weighted average of the models (Matena & Raffel, 2022).

    "Merging models with Fisher-weighted averaging": θ_F = Σ λ_m F_m θ_m / Σ λ_m F_m entry by entry, F floored
    (absolute `floor`, or `floor_relative` x the mean of F_m), optionally each F_m divided by its mean over the
    merged tensors (`normalize`) or within each tensor (`normalize_per_tensor`), optionally one model favoured
    (`favor`). A tensor some Fisher lacks, or where every Fisher is zero, gets the λ-weighted average (noted in the
    result). With `scale` ≠ 1 (and base=): θ = θ_0 + scale·(θ_F - θ_0), the Fisher-weighted task vector scaled, as
    task arithmetic scales its sum; the average a Fisher merge takes keeps only a share of each task vector."""
    merged = _fisher_average(key, values, context)
    if context.params["scale"] == 1.0:
        return merged
    base = context.base_value(key)
    return base + context.params["scale"] * (merged - base)


def _fisher_average(key: str, values: list[Tensor], context) -> Tensor:
    params, prepared = context.params, context.prepared
    M = len(values)
    weights = context.weights
    if params["favor"] is not None:
        rest = (1 - params["favor_weight"]) / max(M - 1, 1)
        weights = [params["favor_weight"] if m == params["favor"] else rest for m in range(M)]
    average = context.mean(values, weights)
    if any(key not in f for f in prepared.fishers):
        context.note(key, "averaged: not in every model's Fisher")
        return average
    numerator, denominator = 0.0, 0.0
    for m, (w, v) in enumerate(zip(weights, values)):
        F = context.part(prepared.fishers[m], key).double()
        mean = prepared.tensor_means[m].get(key) if params["normalize_per_tensor"] else prepared.means[m]
        normalized = params["normalize"] or params["normalize_per_tensor"]
        if normalized:
            F = F / max(mean, 1e-300)
        floor = params["floor"] if params["floor_relative"] is None else params["floor_relative"] * \
            (1.0 if normalized else prepared.means[m])
        F = F.clamp(min=floor)
        numerator = numerator + w * F * v
        denominator = denominator + w * F
    # where every model's Fisher is zero (and no floor), the average is the only sensible answer
    return torch.where(denominator > 0, numerator / torch.where(denominator > 0, denominator,
                                                                torch.ones_like(denominator)), average)


@register_merge_method("components", needs=("components",), prepare=_prepare_components, normalizes=True,
                       slices="entries", parameters=[
    Parameter("select", REQUIRED, "the chosen component indices of each model, one list per model", list,
              PerModel()), *WEIGHTING, SCALED])
def components(key: str, values: list[Tensor], context) -> Tensor:
    """Component merging (ours): Fisher merging with each model's chosen components' Fishers.

    Fisher merging whose Fishers are each model's component-restricted Fishers
    F_{m,S} = Σ_{c in S_m} F_{m,c} (decomp.component_fishers: F_c = σ_c² v̂_c∘v̂_c), S_m = select[m]."""
    return fisher(key, values, context)
