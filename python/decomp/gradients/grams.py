"""Gram matrices of every Linear / Conv1D layer's inputs over a dataset: RegMean's statistics."""

from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm

from .. import distributed as shards
from . import hf
from .capture import _is_conv1d


@torch.no_grad()
def collect_grams(model, data, *, batch_size: int = 32, max_examples: Optional[int] = None, progress: bool = True,
                  distributed: Optional[bool] = None, **batch_options) -> dict:
    """Gram matrices X^T X [in, in] (float64) of every Linear / Conv1D layer's inputs over the real tokens of
    `data`, keyed by module name (as in named_modules()), for method='regmean'. Padding is excluded.
    distributed: as in compute_fisher (each rank its share of the batches; the Grams all-reduced in float64)."""
    grams, state = {}, {}
    names = {id(m): n for n, m in model.named_modules()}
    device = next(model.parameters()).device

    def hook(module, args, output):
        x = args[0].double()
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        mask = state.get("mask")
        if mask is not None and x.shape[1] == mask.shape[1]:
            x = x * mask[..., None]
        flat = x.reshape(-1, x.shape[-1])
        name = names[id(module)]
        grams[name] = grams.get(name, 0) + flat.T @ flat

    # Checked before any hook is attached, so that ranks that disagree leave the model as it was.
    shard = shards.world(distributed)
    shards.check_same(shard, "collect_grams", model, data, batch_size=batch_size, max_examples=max_examples,
                      options={k: str(v) for k, v in batch_options.items()})
    modules = [m for m in model.modules() if isinstance(m, torch.nn.Linear) or _is_conv1d(m)]
    handles = [m.register_forward_hook(hook) for m in modules]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        stream = hf.batches(data, batch_size=batch_size, max_examples=max_examples, shard=shard, **batch_options)
        for indices, batch in tqdm(stream, disable=not progress or (shard and shard.rank), desc="Gram matrices",
                                   unit="batch"):
            inputs = hf.model_inputs(model, batch, device)
            state["mask"] = inputs["attention_mask"].double() if "attention_mask" in inputs else None
            model(**inputs)
            seen += len(indices)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if shard is not None:
        # A rank that never ran a layer (no batch, or a layer unused by its batches) still reduces it, as zeros.
        everyone = shards.gather_objects(shard, {name: gram.shape[0] for name, gram in grams.items()})
        for name, width in sorted({item for sizes in everyone for item in sizes.items()}):
            gram = grams.setdefault(name, torch.zeros(width, width, dtype=torch.float64, device=device))
            shards.all_reduce_sum_(gram, shard)
        seen = shards.all_reduce_count(seen, shard, device)
    if seen == 0:
        raise ValueError("data has no examples: Gram matrices need inputs")
    return grams
