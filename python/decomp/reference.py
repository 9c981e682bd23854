"""Pure-PyTorch versions of every op in ``decomp.ops``: same names, same signatures.

They are the test oracle (pass float64 inputs for an exact-as-possible answer) and the benchmark baseline, so
each is the best plain-PyTorch formulation we know, not a literal transcription of the formula. Inputs that are
float32 or bfloat16 are computed in float32; float64 inputs in float64.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["fisher_linear", "fisher_linear_bias", "fisher_embedding"]


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _finish(result: Tensor, out: Optional[Tensor]) -> Tensor:
    if out is None:
        return result
    out.add_(result.to(out.dtype))
    return out


def _valid_mask(lengths: Optional[Tensor], N: int, T: int, device) -> Optional[Tensor]:
    if lengths is None:
        return None
    return torch.arange(T, device=device)[None, :] < lengths.to(device)[:, None]


def fisher_linear(A: Tensor, G: Tensor, *, lengths: Optional[Tensor] = None, weights: Optional[Tensor] = None,
                  out: Optional[Tensor] = None) -> Tensor:
    """sum_n w_n (G_n[:L_n]^T A_n[:L_n])^2 -> [out, in]. A: [N, T, in] or [N, in]; G: [N, T, out] or [N, out].

    T = 1: one GEMM, (w G^2)^T (A^2). T > 1: a loop over examples with addcmul_, slicing off the padding,
    which beats any batched einsum (that would materialise [N, out, in]).
    """
    if A.dim() == 2:
        A, G = A.unsqueeze(1), G.unsqueeze(1)
    dtype = _compute_dtype(A)
    N, T = A.shape[:2]
    result = torch.zeros(G.shape[2], A.shape[2], dtype=dtype, device=A.device)
    w = None if weights is None else weights.to(dtype)
    if T == 1:
        scale = torch.ones(N, dtype=dtype, device=A.device) if w is None else w
        if lengths is not None:
            scale = scale * (lengths > 0).to(dtype)
        g2 = G[:, 0].to(dtype).square().mul_(scale[:, None])
        return _finish(result.addmm_(g2.T, A[:, 0].to(dtype).square()), out)
    length_list = [T] * N if lengths is None else lengths.tolist()
    weight_list = [1.0] * N if w is None else w.tolist()
    for n in range(N):
        length = length_list[n]
        if length == 0:
            continue
        tile = G[n, :length].to(dtype).T @ A[n, :length].to(dtype)
        result.addcmul_(tile, tile, value=weight_list[n])
    return _finish(result, out)


def fisher_linear_bias(G: Tensor, *, lengths: Optional[Tensor] = None, weights: Optional[Tensor] = None,
                       out: Optional[Tensor] = None) -> Tensor:
    """sum_n w_n (sum_{t < L_n} G[n, t])^2 -> [out]. G: [N, T, out] or [N, out]."""
    if G.dim() == 2:
        G = G.unsqueeze(1)
    dtype = _compute_dtype(G)
    N, T = G.shape[:2]
    mask = _valid_mask(lengths, N, T, G.device)
    G = G.to(dtype)
    sums = G.sum(1) if mask is None else (G * mask[..., None]).sum(1)
    w = torch.ones(N, dtype=dtype, device=G.device) if weights is None else weights.to(dtype)
    return _finish(sums.square().T @ w, out)


def fisher_embedding(ids: Tensor, G: Tensor, num_embeddings: int, *, lengths: Optional[Tensor] = None,
                     weights: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """sum_n w_n (sum_{t < L_n, ids[n,t] = v} G[n, t])^2 -> [num_embeddings, dim]. ids: [N, T] or [N].

    Vectorised over the batch: (example, token id) pairs are made unique, their rows summed with index_add_,
    squared, weighted and scattered into the table.
    """
    if G.dim() == 2:
        G, ids = G.unsqueeze(1), ids.unsqueeze(1)
    dtype = _compute_dtype(G)
    N, T, dim = G.shape
    result = torch.zeros(num_embeddings, dim, dtype=dtype, device=G.device)
    mask = _valid_mask(lengths, N, T, G.device)
    if mask is None:
        mask = torch.ones(N, T, dtype=torch.bool, device=G.device)
    example, position = mask.nonzero(as_tuple=True)
    if example.numel() == 0:
        return _finish(result, out)
    key = example * num_embeddings + ids[example, position].to(torch.int64)
    pairs, inverse = torch.unique(key, return_inverse=True)
    sums = torch.zeros(pairs.numel(), dim, dtype=dtype, device=G.device)
    sums.index_add_(0, inverse, G[example, position].to(dtype))
    squares = sums.square_()
    if weights is not None:
        squares.mul_(weights.to(dtype)[pairs // num_embeddings][:, None])
    result.index_add_(0, pairs % num_embeddings, squares)
    return _finish(result, out)
