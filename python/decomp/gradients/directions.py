"""Directions in parameter space of per-example weightings: v_c = sum_n u_{c,n} g_n, exactly, for r weightings at
once (the loadings of components, in decomp.analysis.Components.parameter_directions)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels import validation
from ..kernels.ops import masked_rows
from .engine import GradientJob, ModelPass, batch_options
from .outputs import OUTPUTS, terms as output_terms
from .rules import Contribution


class DirectionsJob(GradientJob):
    """sum_n u_{c,n} g_n for all r weightings, float32, [r, *shape] per parameter: one GEMM per Linear layer on
    (G scaled by u) and A, the other parameters by their rules."""

    description = "Parameter directions"

    def __init__(self, model, weights: Tensor, rows: Optional[dict], output: str, seed: int, target):
        super().__init__(model)
        self.all_weights, self.rows = weights, rows
        self.output, self.seed, self.target = output, seed, target
        r = weights.shape[1]
        self.sums = {name: torch.zeros(r, *p.shape, dtype=torch.float32, device=p.device)
                     for name, p in self.params.items()}
        self.weights: Optional[Tensor] = None   # [N, r] of the current batch

    def terms(self, logits, batch, indices):
        return output_terms(self.capture.task, logits, batch, indices, output=self.output, seed=self.seed,
                            target=self.target)

    def totals(self):
        return self.sums.values()

    def step(self, indices: Tensor, batch: dict) -> None:
        N = len(self.all_weights)
        positions = torch.tensor([self.rows.get(int(i), -1) for i in indices] if self.rows is not None
                                 else indices.tolist())
        outside = (positions < 0) | (positions >= N)
        if bool(outside.any()):
            raise ValueError(f"example {int(indices[outside][0])} of the data was not among the {N} weighted "
                             f"(decomposed) examples")
        self.weights = self.all_weights[positions].to(self.capture.device)
        super().step(indices, batch)

    def matrix(self, name: str, contributions: list[Contribution]) -> None:
        out, u = self.sums[name], self.weights
        r = u.shape[1]
        for c in contributions:
            right = masked_rows(c.right.float(), c.lengths)                       # [N, T, b]
            N, T, b = right.shape
            if c.kind == "outer":  # one GEMM: [N T, r a]^T [N T, b]
                scaled = (c.left.float()[:, :, None, :] * u[:, None, :, None]).reshape(N * T, -1)
                out += (scaled.T @ right.reshape(N * T, b)).reshape(out.shape)
            else:
                scaled = (right[:, :, None, :] * u[:, None, :, None]).permute(2, 0, 1, 3).reshape(r, N * T, b)
                out.index_add_(1, c.left.reshape(-1), scaled)

    def vector(self, name: str, g: Tensor) -> None:
        out = self.sums[name]
        out += (self.weights.T @ g.float()).reshape(out.shape)

    def fallback(self, name: str, row: int, g: Tensor) -> None:
        out = self.sums[name]
        out += self.weights[row].view(-1, *([1] * g.dim())) * g.float()


def weighted_gradient_sums(model, data, weights: Tensor, *, indices: Optional[Tensor] = None,
                           output: str = "logprob", seed: int = 0, target: Optional[int] = None,
                           batch_size: int = 32, progress: bool = True, distributed: Optional[bool] = None,
                           **options) -> list[dict]:
    """v_c = sum_n weights[n, c] g_n of `output`'s per-example gradients, for every column c of weights [N, r].

    indices [N]: the example index (position in `data`) of each row of weights (None: rows are positions);
    `data` must hold exactly those examples. Returns r dicts keyed like named_parameters(), float32.
    distributed: as in compute_fisher (each rank its share of the batches; the sums all-reduced in float64)."""
    validation.choice("output", output, OUTPUTS)
    validation.seed(seed)
    if not isinstance(weights, Tensor) or weights.dim() != 2 or not bool(torch.isfinite(weights).all()):
        raise ValueError(f"weights must be a finite [N, r] tensor; got "
                         f"{list(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__}")
    options = batch_options(batch_size=batch_size, **options)
    rows = {int(i): n for n, i in enumerate(indices.tolist())} if indices is not None else None
    run = ModelPass("parameter_directions", model, data, options=options, progress=progress,
                    distributed=distributed, settings={"output": output, "seed": seed, "target": target,
                                                       "weights": float(weights.double().sum())})
    job = DirectionsJob(model, weights.float(), rows, output, seed, target)
    seen = run.run(job, device=job.capture.device)
    if seen != len(weights):
        raise ValueError(f"the data held {seen} of the {len(weights)} weighted (decomposed) examples")
    return [{name: total[c] for name, total in job.sums.items()} for c in range(weights.shape[1])]
