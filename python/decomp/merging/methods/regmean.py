"""RegMean (Jin et al., ICLR 2023): per Linear layer, the merged weight that best reproduces every model's outputs on
its own inputs, from the Grams of the layer inputs (decomp.collect_grams).

A singular Gram sum (input directions the data never excited, e.g. a layer that never ran, or every model's Gram
zero) leaves the least-squares problem undetermined in those directions. decomp then takes, of all the
least-squares solutions, the one closest to the λ-weighted average of the models: along the directions the Grams
see, the RegMean solution; along the ones they do not see (eigenvalues of Σ G̃ at or below n · ε · λ_max, ε the
float64 machine epsilon, as numpy's matrix_rank), the average. A zero Gram gives the average. The rank is noted in
the result's notes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..registry import Interval, Parameter, register_merge_method


def closest_least_squares(left: Tensor, right: Tensor, average: Tensor) -> tuple[Tensor, int]:
    """(X, rank): of the solutions of left X = right in the least-squares sense (left symmetric positive
    semi-definite [n, n]), the one closest to `average` [n, k]; the rank of `left` by the threshold above."""
    values, vectors = torch.linalg.eigh(left)
    tolerance = left.shape[0] * torch.finfo(torch.float64).eps * max(float(values.abs().max()), 0.0)
    seen = values > tolerance
    if bool(seen.all()):
        return torch.linalg.solve(left, right), left.shape[0]
    basis = vectors[:, seen]
    inside = basis @ ((basis.T @ right) / values[seen][:, None])
    return inside + average - basis @ (basis.T @ average), int(seen.sum())


def _regmean_slices(key: str, context) -> Optional[str]:
    # a layer's least squares needs its whole weight; every other tensor is an average, entry by entry
    return None if context.gram_layout(key) is not None else "entries"


@register_merge_method("regmean", needs=("grams",), normalizes=True, slices=_regmean_slices, parameters=[
    Parameter("alpha", 0.9, "scale of the Grams' off-diagonal entries (1: exact least squares)", float,
              Interval(0, 1))])
def regmean(key: str, values: list[Tensor], context) -> Tensor:
    """RegMean: per Linear layer, the least-squares fit of every model's outputs (Jin et al., 2023).

    "Dataless knowledge fusion by merging weights of language models": per Linear weight
    W* = (Σ G̃_m)^-1 Σ G̃_m W_m with W in the [in, out] layout, G_m [in, in] the Gram of the layer's inputs and
    G̃ = α G + (1 - α) diag(G); every other tensor is the λ-weighted average. Where Σ G̃_m is singular, the
    directions it does not see take the λ-weighted average (see the module's docstring)."""
    average = context.mean(values)
    stored_in_out = context.gram_layout(key)
    if stored_in_out is None:
        return average
    alpha = context.params["alpha"]
    module = key.rsplit(".", 1)[0]

    def in_out(weight):   # the [in, out] layout the least squares is written in
        return weight if stored_in_out else weight.T
    left, right = 0.0, 0.0
    for m, weight in enumerate(values):
        gram = context.grams[m][module].double()
        gram = alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))
        right = right + gram @ in_out(weight)
        left = left + gram
    solution, rank = closest_least_squares(left, right, in_out(average))
    if rank < left.shape[0]:
        context.note(key, f"regmean: Gram sum of rank {rank} < {left.shape[0]}; the directions it does not see "
                          f"take the average")
    return in_out(solution)
