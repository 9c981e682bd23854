"""Sparsified task vectors: TIES (trim, elect sign, disjoint mean), DARE (random drop and rescale) and DARE-TIES.

TIES' global trim keeps the top `density` of each whole flattened task vector, as in the paper; its thresholds
take two streaming passes over the tensors (a log-magnitude histogram, then the one bin holding the order
statistic) in the method's prepare step, so no task vector is ever held whole.
"""

from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
from torch import Tensor

from ...kernels.hashing import STREAM_DARE, hash32
from ..registry import Choice, Interval, Parameter, register_merge_method
from .linear import SCALE

HISTOGRAM_BINS = 65536
# log-magnitude bins of the global-trim histogram, fixed in advance so that no pass is spent on the range: values
# outside it fall into the end bins, which the second pass buckets the same way, so the threshold stays exact
LOG_RANGE = (math.log(1e-45), math.log(3.5e38))
SEED = Parameter("seed", 0, "seed of the drop masks (counter-based hash of seed, model, tensor, entry)", int)
NORMALIZE = Parameter("normalize", True, "divide the agreeing entries' λ-weighted sum by their weights (the TIES "
                      "paper's disjoint mean); false: keep the sum (mergekit's normalize: false)", bool)


def _density(default: float, doc: str) -> Parameter:
    return Parameter("density", default, doc, float, Interval(0, 1, "(]"))


def _ties_slices(key: str, context) -> Optional[str]:
    # given the global thresholds each entry is trimmed on its own; a per-tensor trim ranks the whole tensor
    return "entries" if context.params["trim"] == "global" else None


def _prepare_ties(context) -> Optional[list[float]]:
    return _global_thresholds(context, context.params["density"]) if context.params["trim"] == "global" else None


@register_merge_method("ties", needs=("base",), prepare=_prepare_ties, slices=_ties_slices, parameters=[
    _density(0.2, "fraction of each task vector kept (largest magnitudes)"),
    Parameter("trim", "global", "'global': over the whole flattened task vector (the paper); 'per_tensor'", str,
              Choice(("global", "per_tensor"))),
    SCALE, NORMALIZE])
def ties(key: str, values: list[Tensor], context) -> Tensor:
    """TIES: trim each task vector, elect signs, average the agreeing entries (Yadav et al., 2023).

    "TIES-Merging: Resolving interference when merging models": trim each τ_m to its top `density` by magnitude
    (trim="global": over the whole flattened task vector; "per_tensor": within each tensor), elect the sign of
    Σ λ_m τ̂_m, average the agreeing entries (weighted by λ; normalize=False: their λ-weighted sum);
    θ_0 + scale τ*."""
    base, taus = context.task_vectors(key, values)
    thresholds = context.prepared
    taus = [_trim(t, context.params["density"], thresholds[m] if thresholds else None) for m, t in enumerate(taus)]
    return base + context.params["scale"] * disjoint_mean(taus, context.weights, context.params["normalize"])


@register_merge_method("dare", needs=("base",), slices="entries", parameters=[
    _density(0.1, "probability of keeping each entry of a task vector"), SEED, SCALE])
def dare(key: str, values: list[Tensor], context) -> Tensor:
    """DARE: random drop and rescale of each task vector, then task arithmetic (Yu et al., 2024).

    "Language models are Super Mario": drop each entry of τ_m with probability 1 - density, rescale the survivors
    by 1/density (seeded, see dare_mask), then θ_0 + scale Σ λ_m τ̃_m."""
    base, taus = _dropped(key, values, context)
    return base + context.params["scale"] * sum(w * t for w, t in zip(context.weights, taus))


@register_merge_method("dare_ties", needs=("base",), slices="entries", parameters=[
    _density(0.1, "probability of keeping each entry of a task vector"), SEED, SCALE, NORMALIZE])
def dare_ties(key: str, values: list[Tensor], context) -> Tensor:
    """DARE-TIES: DARE's drop and rescale, then TIES' sign election and disjoint mean (Yu et al., 2024).

    τ̃_m = τ_m ∘ mask_m / density as in `dare`, then θ_0 + scale τ* with τ* the disjoint mean of `ties`
    (normalize=False: the agreeing entries' λ-weighted sum)."""
    base, taus = _dropped(key, values, context)
    return base + context.params["scale"] * disjoint_mean(taus, context.weights, context.params["normalize"])


def _dropped(key: str, values: list[Tensor], context) -> tuple[Tensor, list[Tensor]]:
    base, taus = context.task_vectors(key, values)
    seed, density = context.params["seed"], context.params["density"]
    return base, [t * dare_mask(seed, m, key, t.shape, density, context.first_entry(t)).to(t.device) / density
                  for m, t in enumerate(taus)]


def dare_mask(seed: int, model_index: int, key: str, shape, density: float, first: int = 0) -> Tensor:
    """Which entries DARE keeps: uniform(hash(seed, model, tensor, entry)) < density, a pure function of those
    (`first`: the flat index of the block's first entry in the whole tensor, see hash_uniforms)."""
    return hash_uniforms(seed, model_index, key, shape, first) < density


def hash_uniforms(seed: int, model_index: int, key: str, shape, first: int = 0) -> Tensor:
    """One uniform in (0, 1) per entry, float64 of `shape`, a pure function of (seed, model, tensor, entry): the
    counter-based hash on the stream DARE and DELLA draw their drops from. For a block of rows of a larger tensor,
    `first` is the flat index of its first entry there, so the block draws what the whole tensor draws there."""
    numel = math.prod(shape)
    row = torch.tensor((zlib.crc32(key.encode()) ^ (model_index * 0x9E3779B1)) & 0xFFFFFFFF)
    bits = hash32(seed, STREAM_DARE, row, torch.arange(first, first + numel, dtype=torch.int64))
    return (((bits >> 8).to(torch.float64) + 0.5) / 16777216.0).reshape(shape)


def disjoint_mean(taus: list[Tensor], weights: list[float], normalize: bool = True) -> Tensor:
    """TIES: elect each entry's sign by the weighted sum, then the weighted mean of the agreeing entries
    (normalize=False: their weighted sum)."""
    stacked = torch.stack([w * t for w, t in zip(weights, taus)])
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    column = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    if not normalize:
        return (stacked * agree).sum(0)
    weight_sum = (agree * column).sum(0)
    return torch.where(weight_sum > 0, (stacked * agree).sum(0) / weight_sum.clamp(min=1e-300),
                       torch.zeros_like(sign))


def _trim(tau: Tensor, density: float, threshold: Optional[float]) -> Tensor:
    """Keeps the top `density` of |tau| (per tensor when threshold is None, else at or above the global
    threshold); entries tied with the last kept magnitude are kept too."""
    if threshold is None:
        k = max(1, int(round(density * tau.numel())))
        if k >= tau.numel():
            return tau
        cut = torch.topk(tau.abs().flatten(), k).values.min()
        return torch.where(tau.abs() >= cut, tau, torch.zeros_like(tau))
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau)) if threshold > 0 else tau


def _global_thresholds(context, density: float) -> list[float]:
    """For each model, the magnitude at or above which `density` of its whole task vector lies, in two streaming
    passes over the tensors (each read once per pass): a histogram of log-magnitudes finds the bin holding the
    order statistic, then that bin's values give it exactly."""
    sources, base, keys = context.sources, context.base, context.plan.merged
    M = len(sources)
    edges = torch.linspace(*LOG_RANGE, HISTOGRAM_BINS + 1, dtype=torch.float64)[1:-1]

    def magnitudes(key):
        """(model, bucket of each non-zero |τ| entry, those entries) for every model and block of rows (as the
        formula is given them: counts add up, so blocks keep a large tensor's transients small), the base's block
        read once."""
        for rows in context.blocks(key):
            origin = base.get(key, rows).double()
            for m, source in enumerate(sources):
                magnitude = (source.get(key, rows).double() - origin).abs().flatten()
                magnitude = magnitude[magnitude > 0]
                yield m, torch.bucketize(torch.log(magnitude), edges.to(magnitude.device)), magnitude

    counts = torch.zeros(M, HISTOGRAM_BINS, dtype=torch.int64)
    for key in keys:
        for m, buckets, _ in magnitudes(key):
            counts[m] += torch.bincount(buckets, minlength=HISTOGRAM_BINS).cpu()
    total = sum(math.prod(sources[0].shape(k)) for k in keys)
    keep = max(1, int(round(density * total)))
    above = torch.flip(torch.cumsum(torch.flip(counts, [1]), 1), [1])   # [M, bins]: values in bins >= b
    chosen = {}   # model -> (bin, how many of its values are needed)
    for m in range(M):
        if int(above[m, 0]) > keep:   # else fewer non-zero entries than kept: keep them all (threshold 0)
            b = int((above[m] >= keep).nonzero().max())
            chosen[m] = (b, keep - (int(above[m, b + 1]) if b + 1 < HISTOGRAM_BINS else 0))
    inside = {m: [] for m in chosen}
    if chosen:
        for key in keys:
            for m, buckets, magnitude in magnitudes(key):
                if m in chosen:
                    inside[m].append(magnitude[buckets == chosen[m][0]])
    return [float(torch.topk(torch.cat(inside[m]), chosen[m][1]).values.min()) if m in chosen else 0.0
            for m in range(M)]
