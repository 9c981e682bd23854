"""Gram matrices of every Linear / Conv1D layer's inputs over a dataset: RegMean's statistics."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .engine import ModelPass, PassJob, batch_options
from .hf import encoder_modules, model_inputs
from .rules import is_conv1d


class GramJob(PassJob):
    """X^T X of each layer's inputs over the real tokens (float64), by forward hooks; no backward pass."""

    description = "Gram matrices"

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.modules = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) or is_conv1d(m)}
        self.encoder = encoder_modules(model)
        # allocated up front (not when a layer first runs) so that every rank all-reduces the same tensors
        self.grams = {name: torch.zeros(self._width(m), self._width(m), dtype=torch.float64, device=self.device)
                      for name, m in self.modules.items()}
        self.uses = torch.zeros(len(self.modules), dtype=torch.float64, device=self.device)
        self.masks: dict = {}
        self.examples = 0

    @staticmethod
    def _width(module) -> int:
        return module.nx if is_conv1d(module) else module.in_features

    @contextlib.contextmanager
    def attached(self):
        was_training = self.model.training
        handles = [m.register_forward_hook(self._hook(i, name, m)) for i, (name, m) in enumerate(self.modules.items())]
        self.model.eval()
        try:
            with torch.no_grad():
                yield self
        finally:
            for handle in handles:
                handle.remove()
            self.model.train(was_training)

    def _hook(self, position: int, name: str, module):
        # a decoder's cross-attention projections read the encoder's sequence: its own side's mask first, then
        # whichever mask has the input's shape
        sides = ("encoder", "decoder") if id(module) in self.encoder else ("decoder", "encoder")

        def hook(module, args, output):
            x = args[0].double()
            masks = [self.masks[side] for side in sides if self.masks.get(side) is not None]
            # rows that are neither per example nor per token (experts' routed tokens, time-major layouts, tables
            # without a batch dimension) are counted as they come
            rows = _per_example(x, self.examples, masks[0] if masks else None)
            if rows is not None:
                mask = next((m for m in masks if rows.shape[:2] == m.shape), None)
                if mask is not None:   # padding carries no statistics
                    rows = rows * mask[..., None]
                x = rows
            flat = x.reshape(-1, x.shape[-1])
            self.grams[name] += flat.T @ flat
            self.uses[position] += 1
        return hook

    def step(self, indices: Tensor, batch: dict) -> None:
        self.examples = len(indices)
        self.masks = real_tokens(self.model, batch, self.device)
        self.model(**model_inputs(self.model, batch, self.device))

    def totals(self):
        return [*self.grams.values(), self.uses]


def _per_example(x: Tensor, N: int, mask: Optional[Tensor]) -> Optional[Tensor]:
    """x as [N, T, d]: its own batch dimension, or tokens flattened into [N T, d] rows (OPT's feed-forward layers,
    shared experts); None when its rows are neither."""
    if x.dim() >= 2 and x.shape[0] == N:
        return x.reshape(N, -1, x.shape[-1])
    if mask is not None and x.dim() == 2 and x.shape[0] == mask.numel():
        return x.reshape(*mask.shape, x.shape[-1])
    return None


def real_tokens(model, batch: dict, device) -> dict:
    """Masks [N, T] (float64) of the real tokens on each side: the encoder's attention_mask, and the decoder's
    decoder_attention_mask or, for a seq2seq model, the positions with a label (labels of -100 mark padding)."""
    masks = {}
    if isinstance(batch.get("attention_mask"), Tensor):
        masks["encoder"] = batch["attention_mask"].to(device, torch.float64)
    if isinstance(batch.get("decoder_attention_mask"), Tensor):
        masks["decoder"] = batch["decoder_attention_mask"].to(device, torch.float64)
    elif getattr(model.config, "is_encoder_decoder", False) and isinstance(batch.get("labels"), Tensor) \
            and batch["labels"].dim() == 2:
        masks["decoder"] = (batch["labels"] != -100).to(device, torch.float64)
    return masks


def collect_grams(model, data, *, batch_size: int = 32, max_examples: Optional[int] = None, progress: bool = True,
                  distributed: Optional[bool] = None, **options) -> dict:
    """Gram matrices X^T X [in, in] (float64) of every Linear / Conv1D layer's inputs over the real tokens of
    `data`, keyed by module name (as in named_modules()), for method='regmean'. Padding is excluded; layers the
    data never ran are left out. options: tokenizer, text_column, label_column, max_length (as compute_fisher).
    distributed: as in compute_fisher (each rank its share of the batches; the Grams all-reduced in float64)."""
    options = batch_options(batch_size=batch_size, max_examples=max_examples, **options)
    run = ModelPass("collect_grams", model, data, options=options, progress=progress, distributed=distributed)
    job = GramJob(model)
    run.run(job, device=job.device)
    return {name: gram for (name, gram), used in zip(job.grams.items(), job.uses.tolist()) if used > 0}
