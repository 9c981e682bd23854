"""The scalar whose per-example gradient is taken, for each kind of model.

An output function maps the model's logits for a batch to one or more *terms*, each a [N] tensor whose n-th
entry depends only on example n; the per-example gradient of term j is the gradient of term_j.sum() as seen by
example n's activations. Every term is a log-probability or a logit of one example, so per-example gradients
never mix examples.

Outputs (classification; for language models the per-token log-probabilities are summed over the target):
  logprob    log p(gold label)                     needs labels
  predicted  log p(predicted label)
  sampled    log p(y), y drawn from the model      seeded: y is a pure function of (seed, example, token)
  loss       -log p(gold) (language models: the mean over target tokens)
  logit      the logit of class `target` (default: the predicted class); classification only
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.hashing import STREAM_SAMPLE, hash32

OUTPUTS = ("logprob", "predicted", "sampled", "loss", "logit")
FISHER_KINDS = ("exact", "sampled", "empirical")


def _check_labels(batch: dict, why: str) -> Tensor:
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(f"{why} needs gold labels, but the data has no 'labels' or 'label' column "
                         f"(batch keys: {sorted(batch)})")
    return labels


def uniforms(seed: int, examples: Tensor, positions: Tensor) -> Tensor:
    """Uniform numbers in (0, 1), a pure function of (seed, example index, position): examples [N], positions
    [P] or [N, P] (a token's position within its example) -> [N, P] float64."""
    positions = positions.to(torch.int64)
    bits = hash32(seed, STREAM_SAMPLE, examples.to(torch.int64)[:, None], positions if positions.dim() == 2
                  else positions[None, :])
    return ((bits >> 8).to(torch.float64) + 0.5) / 16777216.0


def _sample(log_probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draws from categorical rows: log_probs [..., C], u [...] -> indices [...]."""
    cdf = log_probs.detach().double().softmax(-1).cumsum(-1)
    drawn = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1).contiguous()).squeeze(-1)
    return drawn.clamp_(max=log_probs.shape[-1] - 1)


def _token_targets(task: str, logits: Tensor, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(log-probs [N, L, V], targets [N, L], mask [N, L]) of the positions that have a target token."""
    labels = batch.get("labels")
    device = logits.device
    if task == "causal_lm":  # position t predicts token t+1
        targets = (labels if labels is not None else batch["input_ids"]).to(device)[:, 1:]
        logits = logits[:, :-1]
        mask = targets != -100
        if "attention_mask" in batch:  # both the predicting and the predicted token are real (left padding)
            real = batch["attention_mask"].to(device).bool()
            mask &= real[:, 1:] & real[:, :-1]
    else:
        targets = _check_labels(batch, f"a {task} model's output").to(device)
        mask = targets != -100
    return logits.float().log_softmax(-1), targets.clamp(min=0), mask


def terms(task: str, logits: Tensor, batch: dict, indices: Tensor, *, output: str = "logprob", seed: int = 0,
          target: Optional[int] = None) -> list[Tensor]:
    """The terms of `output` for one batch: a list of [N] tensors (one term for every output)."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}; got {output!r}")
    if task == "classification":
        log_probs = logits.float().log_softmax(-1)
        if output == "logit":
            chosen = logits.argmax(-1) if target is None else torch.full_like(logits[:, 0], target, dtype=torch.long)
            return [logits.float().gather(1, chosen[:, None]).squeeze(1)]
        if output in ("logprob", "loss"):
            labels = _check_labels(batch, f"output={output!r}").to(logits.device).long()
            picked = log_probs.gather(1, labels[:, None]).squeeze(1)
            return [picked if output == "logprob" else -picked]
        if output == "predicted":
            return [log_probs.max(-1).values]
        drawn = _sample(log_probs, uniforms(seed, indices, torch.zeros(1, dtype=torch.int64))[:, 0].to(logits.device))
        return [log_probs.gather(1, drawn[:, None]).squeeze(1)]
    if output == "logit":
        raise ValueError(f"output='logit' is defined for sequence classification; a {task} model has a logit per "
                         f"token and vocabulary entry: use 'logprob', 'predicted', 'sampled' or 'loss'")
    log_probs, targets, mask = _token_targets(task, logits, batch)
    if output == "predicted":
        targets = log_probs.argmax(-1)
    elif output == "sampled":
        positions = torch.arange(log_probs.shape[1])
        if task == "causal_lm" and "attention_mask" in batch:  # count from each example's first real token
            positions = (batch["attention_mask"].long().cumsum(1)[:, :-1] - 1).clamp(min=0).cpu()
        targets = _sample(log_probs, uniforms(seed, indices, positions).to(log_probs.device))
    picked = (log_probs.gather(2, targets.unsqueeze(-1)).squeeze(-1) * mask).sum(1)
    if output == "loss":
        return [-picked / mask.sum(1).clamp(min=1)]
    return [picked]


def fisher_terms(task: str, logits: Tensor, batch: dict, indices: Tensor, *, kind: str, seed: int = 0) -> list[Tensor]:
    """Terms whose squared per-example gradients, summed, are the per-example Fisher of `kind`.

    exact (classification): E_y[(grad log p_y)^2] = diag(J^T (diag(p) - p p^T) J) for the logits' Jacobian J.
    With diag(p) - p p^T = L L^T (rank C - 1, by eigendecomposition), the C - 1 terms sum_c L[c, j] z_c give it
    exactly: one backward pass for two classes instead of C.
    """
    if kind not in FISHER_KINDS:
        raise ValueError(f"kind must be one of {', '.join(FISHER_KINDS)}; got {kind!r}")
    if kind == "empirical":
        if task != "causal_lm":  # a language model's gold labels are its input tokens
            _check_labels(batch, "kind='empirical'")
        return terms(task, logits, batch, indices, output="logprob")
    if kind == "sampled":
        return terms(task, logits, batch, indices, output="sampled", seed=seed)
    if task != "classification":
        raise ValueError(f"kind='exact' sums over every class, which for a {task} model means the whole "
                         f"vocabulary at every token: use kind='sampled' (or 'empirical')")
    p = logits.detach().double().softmax(-1)
    covariance = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    # the smallest eigenvalue is 0 (the all-ones direction, to which logits are invariant): drop it
    factors = (eigenvectors[:, :, 1:] * eigenvalues[:, None, 1:].clamp(min=0).sqrt()).to(logits.device)
    z = logits.float()
    return [(z * factors[:, :, j].float()).sum(1) for j in range(factors.shape[2])]
