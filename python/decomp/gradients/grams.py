"""Gram matrices of every Linear / Conv1D layer's inputs over a dataset: RegMean's statistics."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .engine import ModelPass, PassJob, batch_options
from .hf import model_inputs
from .rules import is_conv1d


class GramJob(PassJob):
    """X^T X of each layer's inputs over the real tokens (float64), by forward hooks; no backward pass."""

    description = "Gram matrices"

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.modules = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) or is_conv1d(m)}
        # allocated up front (not when a layer first runs) so that every rank all-reduces the same tensors
        self.grams = {name: torch.zeros(self._width(m), self._width(m), dtype=torch.float64, device=self.device)
                      for name, m in self.modules.items()}
        self.uses = torch.zeros(len(self.modules), dtype=torch.float64, device=self.device)
        self.mask: Optional[Tensor] = None

    @staticmethod
    def _width(module) -> int:
        return module.nx if is_conv1d(module) else module.in_features

    @contextlib.contextmanager
    def attached(self):
        was_training = self.model.training
        handles = [m.register_forward_hook(self._hook(i, name)) for i, (name, m) in enumerate(self.modules.items())]
        self.model.eval()
        try:
            with torch.no_grad():
                yield self
        finally:
            for handle in handles:
                handle.remove()
            self.model.train(was_training)

    def _hook(self, position: int, name: str):
        def hook(module, args, output):
            x = args[0].double()
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            if self.mask is not None and x.shape[:2] == self.mask.shape:   # padding tokens carry no statistics
                x = x * self.mask[..., None]
            flat = x.reshape(-1, x.shape[-1])
            self.grams[name] += flat.T @ flat
            self.uses[position] += 1
        return hook

    def step(self, indices: Tensor, batch: dict) -> None:
        inputs = model_inputs(self.model, batch, self.device)
        self.mask = inputs["attention_mask"].double() if "attention_mask" in inputs else None
        self.model(**inputs)

    def totals(self):
        return [*self.grams.values(), self.uses]


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
