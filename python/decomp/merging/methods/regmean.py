"""RegMean (Jin et al., 2023): per Linear layer, the weights that best reproduce every model's outputs on its own
inputs, from the Gram matrices of the layer inputs (decomp.collect_grams)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import Interval, Parameter, register_merge_method


def _applies(key: str, context) -> bool:
    module = key.rsplit(".", 1)[0]
    return key.endswith(".weight") and all(module in grams for grams in context.grams)


@register_merge_method("regmean", needs=("grams",), parameters=[
    Parameter("alpha", 0.9, "scale of the Grams' off-diagonal entries (1: exact least squares)", float,
              Interval(0, 1))])
def regmean(key: str, values: list[Tensor], context) -> Tensor:
    """RegMean: per Linear layer, the least-squares fit of every model's outputs (Jin et al., 2023).

    "Dataless knowledge fusion by merging weights of language models": per Linear weight
    W* = (Σ G̃_m)^-1 Σ G̃_m W_m with W in the [in, out] layout, G_m [in, in] the Gram of the layer's inputs and
    G̃ = α G + (1 - α) diag(G); every other tensor is the λ-weighted average."""
    if not _applies(key, context):
        return context.mean(values)
    alpha = context.params["alpha"]
    module = key.rsplit(".", 1)[0]
    left, right = 0.0, 0.0
    for m, weight in enumerate(values):
        gram = context.grams[m][module].double()
        gram = alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))
        transposed = gram.shape[0] == weight.shape[1]  # nn.Linear stores [out, in]; Conv1D [in, out]
        right = right + gram @ (weight.T if transposed else weight)
        left = left + gram
    solution = torch.linalg.lstsq(left, right).solution if bool(torch.linalg.matrix_rank(left) < left.shape[0]) \
        else torch.linalg.solve(left, right)
    return solution.T if transposed else solution
