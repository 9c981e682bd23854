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


# logits entries per chunk of rows in the token outputs: a few MB, so the per-row transients stay in cache and the
# [N, L, V] log-probabilities a language model's vocabulary makes (400 MB at 8 x 256 x 50257) are never allocated
CHUNK_ENTRIES = 1 << 20


def _row_chunks(rows: int, width: int):
    step = max(1, CHUNK_ENTRIES // max(width, 1))
    return (slice(start, min(start + step, rows)) for start in range(0, rows, step))


class TokenLogProbs(torch.autograd.Function):
    """Σ_t w[n, t] log softmax(z[n, t])[y[n, t]] per example, from logits z [N, L, V], targets y [N, L] and weights
    w [N, L] float32 (0 where a position has no target): [N] float32.

    Equal to gathering from z.float().log_softmax(-1), but the log-probabilities are never formed: the forward
    keeps only each row's logsumexp, and the backward writes dz = w (onehot(y) - softmax(z)) once, chunk by chunk
    (the log_softmax route allocates and fills several [N, L, V] tensors; at a language model's vocabulary those
    passes cost as much as a large layer)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
        rows = logits.reshape(-1, logits.shape[-1])
        lse = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
        for chunk in _row_chunks(*rows.shape):
            lse[chunk] = torch.logsumexp(rows[chunk].float(), -1)
        lse = lse.view(targets.shape)
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float() - lse
        ctx.save_for_backward(logits, targets, weights, lse)
        return (picked * weights).sum(1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, targets, weights, lse = ctx.saved_tensors
        coefficient = (grad.float()[:, None] * weights).reshape(-1, 1)   # [N L, 1]
        rows, lse, targets = logits.reshape(-1, logits.shape[-1]), lse.reshape(-1, 1), targets.reshape(-1, 1)
        result = torch.empty(rows.shape, dtype=logits.dtype, device=logits.device)
        in_place = result.dtype == torch.float32   # else each chunk is computed in float32, then cast into place
        for chunk in _row_chunks(*rows.shape):
            part = result[chunk] if in_place else torch.empty(result[chunk].shape, dtype=torch.float32,
                                                              device=result.device)
            torch.sub(rows[chunk].float(), lse[chunk], out=part)
            part.exp_().mul_(-coefficient[chunk])
            part.scatter_add_(1, targets[chunk], coefficient[chunk])
            if not in_place:
                result[chunk] = part
        return result.view(logits.shape), None, None


def _token_targets(task: str, logits: Tensor, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(logits [N, L, V], targets [N, L], mask [N, L]) of the positions that may have a target token (mask: they
    do). A causal LM's last position predicts nothing: its target is a placeholder, masked, so that the logits are
    used whole (no [N, L-1, V] slice for autograd to copy back into a zeroed [N, L, V])."""
    labels = batch.get("labels")
    device = logits.device
    if task == "causal_lm":  # position t predicts token t+1
        following = (labels if labels is not None else batch["input_ids"]).to(device)[:, 1:]
        targets = torch.cat([following, torch.full_like(following[:, :1], -100)], 1)
        mask = targets != -100
        if "attention_mask" in batch:  # both the predicting and the predicted token are real (left padding)
            real = batch["attention_mask"].to(device).bool()
            mask[:, :-1] &= real[:, 1:] & real[:, :-1]
    else:
        targets = _check_labels(batch, f"a {task} model's output").to(device)
        mask = targets != -100
    return logits, targets.clamp(min=0), mask


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
    logits, targets, mask = _token_targets(task, logits, batch)
    if output == "predicted":   # log_softmax keeps the order of the logits
        targets = logits.detach().argmax(-1)
    elif output == "sampled":
        predicting = logits[:, :-1] if task == "causal_lm" else logits
        positions = torch.arange(predicting.shape[1])
        if task == "causal_lm" and "attention_mask" in batch:  # count from each example's first real token
            positions = (batch["attention_mask"].long().cumsum(1)[:, :-1] - 1).clamp(min=0).cpu()
        with torch.no_grad():
            drawn = _sample(predicting.float().log_softmax(-1), uniforms(seed, indices, positions).to(logits.device))
        targets = torch.cat([drawn, targets[:, drawn.shape[1]:]], 1)
    weights = mask.float()
    if output == "loss":
        weights = -weights / mask.sum(1, keepdim=True).clamp(min=1)
    return [TokenLogProbs.apply(logits, targets, weights)]


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
