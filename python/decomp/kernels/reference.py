"""Pure-PyTorch versions of every op in ``decomp.ops``: same names, same signatures.

They are the test oracle (pass float64 inputs for an exact-as-possible answer) and the benchmark baseline, so
each is the best plain-PyTorch formulation we know, not a literal transcription of the formula. Inputs that are
float32 or bfloat16 are computed in float32; float64 inputs in float64.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .hashing import (STREAM_COUNT_IN, STREAM_COUNT_OUT, STREAM_DENSE, STREAM_KRON_IN, STREAM_KRON_OUT, hash32, hash_row,
                      hash_word)

__all__ = ["fisher_linear", "fisher_linear_bias", "fisher_embedding", "projection_matrix", "sketch_dense",
           "sketch_linear", "count_sketch_linear", "hash32"]


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


def _masked_rows(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """Zeroes rows t >= L_n (with where, so padding holding NaN or inf cannot leak)."""
    mask = _valid_mask(lengths, x.shape[0], x.shape[1], x.device)
    return x if mask is None else torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))


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
    N = G.shape[0]
    sums = _masked_rows(G.to(dtype), lengths).sum(1)
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


# --- the counter-based hash and the sketches --------------------------------------------------------------------
# Entries come from the counter-based hash of decomp.kernels.hashing, as in the native kernels.

def _entries(state: Tensor, columns: Tensor, dist: str, dtype: torch.dtype) -> Tensor:
    """Unscaled entries S[rows, columns]: state [rows, 1], columns [1, cols] (global indices)."""
    if dist == "rademacher":
        bits = (hash_word(state, columns >> 5) >> (columns & 31)) & 1
        return (1 - 2 * bits).to(dtype)
    pair = columns >> 1
    u1 = ((hash_word(state, 2 * pair) >> 8).to(torch.float64) + 0.5) / 16777216.0
    u2 = ((hash_word(state, 2 * pair + 1) >> 8).to(torch.float64) + 0.5) / 16777216.0
    radius, angle = torch.sqrt(-2.0 * torch.log(u1)), 2 * math.pi * u2
    values = torch.where((columns & 1) == 1, radius * torch.sin(angle), radius * torch.cos(angle))
    return values.to(torch.float32).to(dtype)


def projection_matrix(rows: int, cols: int, *, seed: int, dist: str = "rademacher", offset: int = 0,
                      stream: int = STREAM_DENSE, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """S[:, offset:offset + cols] of the projection with `rows` rows, scaled by 1/sqrt(rows) so that
    E[<Sx, Sy>] = <x, y>. Entry (r, c) is a pure function of (seed, stream, r, c). Returns [rows, cols]."""
    state = hash_row(seed, stream, torch.arange(rows, device=device))[:, None]
    columns = torch.arange(offset, offset + cols, device=device, dtype=torch.int64)[None, :]
    return _entries(state, columns, dist, dtype) * (1.0 / math.sqrt(rows))


def sketch_dense(X: Tensor, *, k: int, seed: int, offset: int = 0, dist: str = "rademacher") -> Tensor:
    """X S^T -> [N, k] for X [N, p] holding columns offset..offset+p of the full vector; S generated in column
    chunks (a few MB each) and multiplied as it comes, never stored whole."""
    dtype = _compute_dtype(X)
    N, p = X.shape
    out = torch.zeros(N, k, dtype=dtype, device=X.device)
    chunk = max(32, (1 << 21) // max(k, 1))
    for start in range(0, p, chunk):
        stop = min(p, start + chunk)
        S = projection_matrix(k, stop - start, seed=seed, dist=dist, offset=offset + start, device=X.device,
                              dtype=dtype)
        out.addmm_(X[:, start:stop].to(dtype), S.T)
    return out


def sketch_linear(A: Tensor, G: Tensor, *, k_out: int, k_in: int, seed: int, lengths: Optional[Tensor] = None,
                  dist: str = "rademacher") -> Tensor:
    """Kronecker sketch vec(S_out G_n^T A_n S_in^T) -> [N, k_out * k_in] (row-major over (k_out, k_in)).

    S_out [k_out, out] and S_in [k_in, in] are materialised (they are small); then two GEMMs over all tokens
    and one batched product: the cost 2T(out k_out + in k_in) + 2T k_out k_in per example."""
    if A.dim() == 2:
        A, G = A.unsqueeze(1), G.unsqueeze(1)
    dtype = _compute_dtype(A)
    S_out = projection_matrix(k_out, G.shape[2], seed=seed, dist=dist, stream=STREAM_KRON_OUT, device=A.device,
                              dtype=dtype)
    S_in = projection_matrix(k_in, A.shape[2], seed=seed, dist=dist, stream=STREAM_KRON_IN, device=A.device,
                             dtype=dtype)
    return kronecker_from_projections(A, G, S_out, S_in, lengths)


def kronecker_from_projections(A: Tensor, G: Tensor, S_out: Tensor, S_in: Tensor, lengths: Optional[Tensor],
                               out: Optional[Tensor] = None) -> Tensor:
    """(G_n S_out^T)^T (A_n S_in^T), padding rows masked, flattened to [N, k_out * k_in] (added into `out` when
    given)."""
    dtype = S_out.dtype
    projected_g = _masked_rows(G.to(dtype), lengths) @ S_out.T   # [N, T, k_out]
    projected_a = _masked_rows(A.to(dtype), lengths) @ S_in.T    # [N, T, k_in]
    products = torch.bmm(projected_g.transpose(1, 2), projected_a)
    return _finish(products.reshape(A.shape[0], S_out.shape[0] * S_in.shape[0]), out)


def count_hashes(features: int, k: int, *, seed: int, stream: int, device=None):
    """CountSketch hashes of `features` coordinates: bucket [features] in [0, k) and sign [features] of +-1."""
    words = torch.arange(features, device=device, dtype=torch.int64)
    bucket = hash32(seed, stream, torch.tensor(0, device=device), words) % k
    sign = 1 - 2 * (hash32(seed, stream, torch.tensor(1, device=device), words) >> 31)
    return bucket, sign


def count_sketch(X: Tensor, *, k: int, seed: int, stream: int, lengths: Optional[Tensor] = None) -> Tensor:
    """CountSketch of each row: out[n, t, bucket(j)] += sign(j) X[n, t, j]; rows t >= L_n are zero. -> [N, T, k]"""
    dtype = _compute_dtype(X)
    bucket, sign = count_hashes(X.shape[2], k, seed=seed, stream=stream, device=X.device)
    out = torch.zeros(*X.shape[:2], k, dtype=dtype, device=X.device)
    out.index_add_(2, bucket, _masked_rows(X.to(dtype), lengths) * sign.to(dtype))
    return out


def tensor_sketch_from_counts(count_g: Tensor, count_a: Tensor, k: int) -> Tensor:
    """sum_t CS_out(g_t) circularly convolved with CS_in(a_t), by FFT: [N, T, k] x2 -> [N, k]."""
    if count_g.numel() == 0:  # MKL's FFT rejects empty batches
        return count_g.new_zeros(count_g.shape[0], k)
    spectrum = torch.fft.rfft(count_g, dim=2).mul_(torch.fft.rfft(count_a, dim=2))   # in place: no third buffer
    return torch.fft.irfft(spectrum.sum(1), n=k, dim=1)


def count_sketch_linear(A: Tensor, G: Tensor, *, k: int, seed: int, lengths: Optional[Tensor] = None) -> Tensor:
    """TensorSketch of each example's Linear-layer gradient sum_t g_t a_t^T -> [N, k]: the CountSketch with hash
    (h_out(o) + h_in(i)) mod k and sign s_out(o) s_in(i), computed by FFT without forming the outer products."""
    if A.dim() == 2:
        A, G = A.unsqueeze(1), G.unsqueeze(1)
    count_g = count_sketch(G, k=k, seed=seed, stream=STREAM_COUNT_OUT, lengths=lengths)
    count_a = count_sketch(A, k=k, seed=seed, stream=STREAM_COUNT_IN, lengths=lengths)
    return tensor_sketch_from_counts(count_g, count_a, k)
