"""Model Stock (Jang et al., ECCV 2024, "Model Stock: All we need is just a few fine-tuned models"): the average of
the fine-tuned models pulled towards the base by a ratio set by the angle between their task vectors.

Checked against mergekit (github.com/arcee-ai/mergekit, mergekit/merge_methods/model_stock.py): with more than two
fine-tuned models, cos θ is the mean of the pairwise cosines (the paper states the two-model case); cosines are
clamped to [-1, 1] with the norm product floored at 1e-6; filter_wise takes one angle per row of the tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..registry import Parameter, register_merge_method


def _prepare(context) -> None:
    if len(context.sources) < 2:
        raise ValueError(f"method='model_stock' needs at least two fine-tuned models; got {len(context.sources)}")


def _model_stock_slices(key: str, context) -> Optional[str]:
    # filter_wise takes one angle per row; otherwise the angle is the whole tensor's
    return "rows" if context.params["filter_wise"] else None


@register_merge_method("model_stock", needs=("base",), prepare=_prepare, weighted=False,
                       slices=_model_stock_slices, parameters=[
    Parameter("filter_wise", False, "one angle per row (output filter) instead of one per tensor", bool)])
def model_stock(key: str, values: list[Tensor], context) -> Tensor:
    """Model Stock: t·mean(θ_m) + (1 - t)·θ_0 with t from the task vectors' angle (Jang et al., 2024).

    cos θ = the mean over pairs m < n of ⟨τ_m, τ_n⟩ / max(|τ_m| |τ_n|, 1e-6) (clamped to [-1, 1]), over the
    flattened tensor (filter_wise: over each row, a 1-D tensor being one row); t = M cos θ / (1 + (M - 1) cos θ),
    M the number of fine-tuned models; θ = t·(1/M) Σ_m θ_m + (1 - t)·θ_0."""
    base, taus = context.task_vectors(key, values)
    if not any(bool(t.any()) for t in taus):
        # no task changed it (frozen word embeddings): every cosine is 0, so t = 0 and θ = θ_0; skipping the
        # pairwise products of the largest tensor, which set the merge's peak memory (3.2 GB on MiniLM x 8)
        return base
    if context.params["filter_wise"]:
        rows = (lambda x: x.reshape(1, -1)) if base.dim() < 2 else (lambda x: x)
    else:
        rows = (lambda x: x.reshape(-1))
    offsets = [rows(t) for t in taus]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)
            cosines.append(((offsets[i] * offsets[j]).sum(-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    M = len(values)
    t = M * cos / (1 + (M - 1) * cos)
    merged = t * rows(sum(values) / M) + (1 - t) * rows(base)
    return merged.reshape(base.shape)
