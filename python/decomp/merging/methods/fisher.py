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
    Parameter("favor", None, "index of a model to favour (it gets favor_weight, the others share the rest)", int,
              ModelIndex()),
    Parameter("favor_weight", 0.5, "weight of the favoured model", float, Interval(0, 1)),
]


@dataclass
class FisherWeights:
    """What the Fisher formula needs, computed once: each model's Fisher (key -> tensor) and, when normalize or
    floor_relative asks for it, its mean over the merged tensors."""
    fishers: list[Mapping[str, Tensor]]
    means: list[Optional[float]]


def _means(fishers: list[Mapping[str, Tensor]], context) -> list[Optional[float]]:
    if not (context.params["normalize"] or context.params["floor_relative"] is not None):
        return [None] * len(fishers)
    merged = set(context.plan.merged)
    means = []
    for fisher in fishers:
        total, count = 0.0, 0
        for key in fisher:
            if key in merged:   # each tensor read once (a ChosenSum sums its components at each read)
                value = fisher[key]
                total, count = total + float(value.double().sum()), count + value.numel()
        means.append(total / max(count, 1))
    return means


def _prepare_fisher(context) -> FisherWeights:
    return FisherWeights(context.fishers, _means(context.fishers, context))


def _prepare_components(context) -> FisherWeights:
    """F_{m,S} = Σ_{c in S_m} F_{m,c}: each model's chosen component Fishers summed."""
    combined = []
    for m, (per_component, chosen) in enumerate(zip(context.components, context.params["select"])):
        if not chosen:
            raise ValueError(f"select[{m}] is empty: choose at least one component of model {m}")
        bad = [c for c in chosen if not 0 <= c < len(per_component)]
        if bad:
            raise ValueError(f"select[{m}] names component {bad[0]}, but model {m} has {len(per_component)}")
        combined.append(ChosenSum(per_component, chosen))
    return FisherWeights(combined, _means(combined, context))


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


@register_merge_method("fisher", needs=("fishers",), prepare=_prepare_fisher, parameters=WEIGHTING,
                       normalizes=True, slices="entries")
def fisher(key: str, values: list[Tensor], context) -> Tensor:
    """Fisher merging: the Fisher-weighted average of the models (Matena & Raffel, 2022).

    "Merging models with Fisher-weighted averaging": Σ λ_m F_m θ_m / Σ λ_m F_m entry by entry, F floored
    (absolute `floor`, or `floor_relative` x the mean of F_m), optionally each F_m divided by its mean
    (`normalize`), optionally one model favoured (`favor`). A tensor some Fisher lacks, or where every Fisher is
    zero, gets the λ-weighted average (noted in the result)."""
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
        if params["normalize"]:
            F = F / max(prepared.means[m], 1e-300)
        floor = params["floor"] if params["floor_relative"] is None else params["floor_relative"] * \
            (1.0 if params["normalize"] else prepared.means[m])
        F = F.clamp(min=floor)
        numerator = numerator + w * F * v
        denominator = denominator + w * F
    # where every model's Fisher is zero (and no floor), the average is the only sensible answer
    return torch.where(denominator > 0, numerator / torch.where(denominator > 0, denominator,
                                                                torch.ones_like(denominator)), average)


@register_merge_method("components", needs=("components",), prepare=_prepare_components, normalizes=True,
                       slices="entries", parameters=[
    Parameter("select", REQUIRED, "the chosen component indices of each model, one list per model", list,
              PerModel()), *WEIGHTING])
def components(key: str, values: list[Tensor], context) -> Tensor:
    """Component merging (ours): Fisher merging with each model's chosen components' Fishers.

    Fisher merging whose Fishers are each model's component-restricted Fishers
    F_{m,S} = Σ_{c in S_m} F_{m,c} (decomp.component_fishers: F_c = σ_c² v̂_c∘v̂_c), S_m = select[m]."""
    return fisher(key, values, context)
