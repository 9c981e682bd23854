"""Native kernels as torch operators.

Each public function validates its arguments (errors name the argument, what was expected and what was
given), allocates the output with torch and calls a ``torch.library`` custom op (with a fake implementation,
so the ops trace under ``torch.compile``) whose implementation hands raw views to ``decomp._C``.
``decomp.reference`` holds pure-PyTorch functions with the same names and signatures.

Shapes: A [N, T, in] (or [N, in], meaning T = 1), G [N, T, out], ids [N, T] (or [N]), lengths [N] marks each
example's valid prefix. Inputs are float32 or bfloat16; accumulation is float32. The Fisher ops return sums
over examples (not means) and, given ``out``, add into it.

Arguments are checked where they enter (ranks, dtypes, devices, sizes, lengths in [0, T], ids in the table, seeds
in [0, 2**32), offsets that keep every column index below 2**63): a bad one is a ValueError naming the argument,
what was expected and what was given, raised before anything is written (``out`` is left untouched). Any layout
of strides is accepted (non-contiguous views are read in place); empty batches (N = 0), empty sequences (T = 0)
and empty feature dimensions give zeros (or add nothing).

Values keep IEEE semantics: the kernels do not look for NaN or infinity in the data. A NaN (or an infinity) at a
valid position propagates to every output entry it enters, as it would in the reference: NaN in, NaN out, never
a silently finite number. Positions beyond an example's length are never read, so whatever padding holds (NaN
included) changes nothing. Checking for non-finite values is the job of the callers that know what the numbers
mean (decomp.compute_fisher and sketch_gradients check each example's output).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils import _python_dispatch

from . import validation as check
from .hashing import STREAM_COUNT_IN, STREAM_COUNT_OUT, STREAM_DENSE, STREAM_KRON_IN, STREAM_KRON_OUT
from .native import _C, num_threads, optional_view, stream_of, view

__all__ = ["fisher_linear", "fisher_linear_bias", "fisher_embedding", "projection_matrix", "sketch_dense",
           "sketch_linear", "count_sketch_linear"]


def _op(name: str, mutates_args=()):
    """torch.library.custom_op(name), with the plain function kept as `.eager`: see _run."""
    def wrap(function):
        op = torch.library.custom_op(name, mutates_args=mutates_args)(function)
        op.eager = function
        return op
    return wrap


def _run(op, *args):
    """op(*args), calling its implementation directly when nothing traces the call (plain tensors, no
    torch.compile, export or dispatch mode): torch.library's dispatcher costs ~15 us a call on the CPU, a third of a
    small call's time (a bias over 32 examples of one token). Traced calls go through the op and its fake."""
    if (torch.compiler.is_compiling() or _python_dispatch._get_current_dispatch_mode() is not None
            or any(isinstance(a, Tensor) and type(a) is not Tensor for a in args)):
        return op(*args)
    return op.eager(*args)


def _factors(A, G):
    """Validates the layer factors and returns them as [N, T, in] and [N, T, out] views."""
    check.tensor("G", G, shape="[N, T, out] or [N, out]", ranks=(2, 3), dtypes=check.FLOAT_INPUTS)
    shape = "[N, T, in] (G is [N, T, out])" if G.dim() == 3 else "[N, in] (G is [N, out])"
    check.tensor("A", A, shape=shape, ranks=(G.dim(),), dtypes=(G.dtype,), device=G.device, device_of="G")
    if A.dim() == 2:
        A, G = A.unsqueeze(1), G.unsqueeze(1)
    if A.shape[:2] != G.shape[:2]:
        raise ValueError(f"A and G must agree in N and T; got A {check.describe(A)} and G {check.describe(G)}")
    return A, G


def _sequence_grads(G, name="G"):
    check.tensor(name, G, shape="[N, T, out] or [N, out]", ranks=(2, 3), dtypes=check.FLOAT_INPUTS)
    return G.unsqueeze(1) if G.dim() == 2 else G


# --- fisher_linear -------------------------------------------------------------------------------------------

@_op("decomp::fisher_linear_into", mutates_args=("out",))
def _fisher_linear_into(A: Tensor, G: Tensor, lengths: Optional[Tensor], weights: Optional[Tensor],
                        out: Tensor) -> None:
    check.lengths_values(lengths, A.shape[1])
    check.weights_values(weights)
    if out.numel() == 0:   # nothing to accumulate (an empty feature dimension)
        return
    if A.shape[1] == 1 and not A.is_cuda:
        # One token per example: sum_n w_n (g_n a_n^T)^2 = (w G^2)^T (A^2) is one GEMM, which the fused per-example
        # loop cannot beat on the CPU (benchmarks/results/kernels_cpu.md)
        keep = None if lengths is None else (lengths > 0)[:, None]
        g2 = _valid_rows(G[:, 0], keep).square()
        if weights is not None:
            g2.mul_(weights[:, None])
        out.addmm_(g2.T, _valid_rows(A[:, 0], keep).square())
        return
    _C.fisher_linear(view(A), view(G), optional_view(lengths), optional_view(weights), view(out), num_threads(),
                     stream_of(A))


def _valid_rows(x: Tensor, keep: Optional[Tensor]) -> Tensor:
    """x [N, d] in float32 with the rows of padded (empty) examples zeroed, whatever they hold."""
    x = x.float()
    return x if keep is None else torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


@_fisher_linear_into.register_fake
def _(A, G, lengths, weights, out):
    return None


@_op("decomp::fisher_linear", mutates_args=())
def _fisher_linear(A: Tensor, G: Tensor, lengths: Optional[Tensor], weights: Optional[Tensor]) -> Tensor:
    out = torch.zeros(G.shape[2], A.shape[2], dtype=torch.float32, device=A.device)
    _fisher_linear_into.eager(A, G, lengths, weights, out)
    return out


@_fisher_linear.register_fake
def _(A, G, lengths, weights):
    return A.new_empty((G.shape[2], A.shape[2]), dtype=torch.float32)


def fisher_linear(A: Tensor, G: Tensor, *, lengths: Optional[Tensor] = None, weights: Optional[Tensor] = None,
                  out: Optional[Tensor] = None) -> Tensor:
    """Summed squared per-example gradients of a Linear weight, fused.

    out[o, i] (+)= sum_n w_n (sum_{t < L_n} G[n, t, o] A[n, t, i])^2, i.e. sum_n w_n (G_n^T A_n)^2 without ever
    forming an [N, out, in] buffer.

    A: [N, T, in] or [N, in] layer inputs; G: [N, T, out] or [N, out] gradients w.r.t. the layer outputs
    (same dtype, float32 or bfloat16). lengths: [N] valid prefix per example (padding beyond it costs nothing).
    weights: [N] >= 0. out: [out, in] float32, added into when given. Returns [out, in] float32.
    """
    A, G = _factors(A, G)
    N = A.shape[0]
    lengths = check.lengths(lengths, N, A.device)
    weights = check.weights(weights, N, A.device)
    if out is None:
        return _run(_fisher_linear, A, G, lengths, weights)
    check.out(out, (G.shape[2], A.shape[2]), A.device)
    _run(_fisher_linear_into, A, G, lengths, weights, out)
    return out


# --- fisher_linear_bias --------------------------------------------------------------------------------------

@_op("decomp::fisher_linear_bias_into", mutates_args=("out",))
def _fisher_linear_bias_into(G: Tensor, lengths: Optional[Tensor], weights: Optional[Tensor], out: Tensor) -> None:
    check.lengths_values(lengths, G.shape[1])
    check.weights_values(weights)
    if out.numel() == 0:
        return
    _C.fisher_linear_bias(view(G), optional_view(lengths), optional_view(weights), view(out), num_threads(),
                          stream_of(G))


@_fisher_linear_bias_into.register_fake
def _(G, lengths, weights, out):
    return None


@_op("decomp::fisher_linear_bias", mutates_args=())
def _fisher_linear_bias(G: Tensor, lengths: Optional[Tensor], weights: Optional[Tensor]) -> Tensor:
    out = torch.zeros(G.shape[2], dtype=torch.float32, device=G.device)
    _fisher_linear_bias_into.eager(G, lengths, weights, out)
    return out


@_fisher_linear_bias.register_fake
def _(G, lengths, weights):
    return G.new_empty((G.shape[2],), dtype=torch.float32)


def fisher_linear_bias(G: Tensor, *, lengths: Optional[Tensor] = None, weights: Optional[Tensor] = None,
                       out: Optional[Tensor] = None) -> Tensor:
    """Summed squared per-example gradients of a Linear bias: out[o] (+)= sum_n w_n (sum_{t < L_n} G[n, t, o])^2.

    G: [N, T, out] or [N, out]; lengths, weights: [N]; out: [out] float32. Returns [out] float32.
    """
    G = _sequence_grads(G)
    N = G.shape[0]
    lengths = check.lengths(lengths, N, G.device)
    weights = check.weights(weights, N, G.device)
    if out is None:
        return _run(_fisher_linear_bias, G, lengths, weights)
    check.out(out, (G.shape[2],), G.device)
    _run(_fisher_linear_bias_into, G, lengths, weights, out)
    return out


# --- fisher_embedding ----------------------------------------------------------------------------------------

@_op("decomp::fisher_embedding_into", mutates_args=("out",))
def _fisher_embedding_into(ids: Tensor, G: Tensor, lengths: Optional[Tensor], weights: Optional[Tensor],
                           out: Tensor) -> None:
    check.lengths_values(lengths, G.shape[1])
    check.weights_values(weights)
    if G.is_cuda or out.numel() == 0:
        # the CPU kernel checks every valid id before it writes (naming the example and position); it is not
        # called for an empty table, nor on the GPU, whose kernel trusts its ids
        check.ids_values(ids, lengths, out.shape[0])
    if out.numel() == 0:
        return
    _C.fisher_embedding(view(ids), view(G), optional_view(lengths), optional_view(weights), view(out),
                        num_threads(), stream_of(G))


@_fisher_embedding_into.register_fake
def _(ids, G, lengths, weights, out):
    return None


@_op("decomp::fisher_embedding", mutates_args=())
def _fisher_embedding(ids: Tensor, G: Tensor, num_embeddings: int, lengths: Optional[Tensor],
                      weights: Optional[Tensor]) -> Tensor:
    out = torch.zeros(num_embeddings, G.shape[2], dtype=torch.float32, device=G.device)
    _fisher_embedding_into.eager(ids, G, lengths, weights, out)
    return out


@_fisher_embedding.register_fake
def _(ids, G, num_embeddings, lengths, weights):
    return G.new_empty((num_embeddings, G.shape[2]), dtype=torch.float32)


def fisher_embedding(ids: Tensor, G: Tensor, num_embeddings: int, *, lengths: Optional[Tensor] = None,
                     weights: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """Summed squared per-example gradients of an embedding table.

    Within an example, the rows of a repeated token are summed before squaring (that is the example's gradient
    of that row): out[v, d] (+)= sum_n w_n (sum_{t < L_n, ids[n, t] = v} G[n, t, d])^2.

    ids: [N, T] or [N] int64; G: [N, T, dim] or [N, dim] gradients w.r.t. the looked-up rows; lengths, weights:
    [N]; out: [num_embeddings, dim] float32. Returns [num_embeddings, dim] float32.
    """
    check.tensor("ids", ids, shape="[N, T] or [N]", ranks=(1, 2), dtypes=(torch.int64, torch.int32))
    G = _sequence_grads(G.unsqueeze(1) if isinstance(G, torch.Tensor) and ids.dim() == 1 else G)
    ids = ids.unsqueeze(1) if ids.dim() == 1 else ids
    check.tensor("ids", ids, shape="[N, T] or [N]", ranks=(2,), dtypes=(torch.int64, torch.int32),
                 device=G.device, device_of="G")
    if ids.shape != G.shape[:2]:
        raise ValueError(f"ids must be [N, T] matching G's first two dimensions; got ids {check.describe(ids)} "
                         f"and G {check.describe(G)}")
    ids = ids.to(torch.int64)
    if not isinstance(num_embeddings, int) or num_embeddings < 0:
        raise ValueError(f"num_embeddings must be a non-negative int; got {num_embeddings!r}")
    N = G.shape[0]
    lengths = check.lengths(lengths, N, G.device)
    weights = check.weights(weights, N, G.device)
    if out is None:
        return _run(_fisher_embedding, ids, G, num_embeddings, lengths, weights)
    check.out(out, (num_embeddings, G.shape[2]), G.device)
    _run(_fisher_embedding_into, ids, G, lengths, weights, out)
    return out


# --- sketches ------------------------------------------------------------------------------------------------

def _distribution(dist: str):
    return _C.Distribution.rademacher if dist == "rademacher" else _C.Distribution.gaussian


def _check_sketch_args(seed, dist, **positive):
    check.seed(seed)
    check.distribution(dist)
    for name, value in positive.items():
        check.positive_int(name, value)


@torch.library.custom_op("decomp::projection_matrix", mutates_args=())
def _projection_matrix(rows: int, cols: int, seed: int, stream: int, dist: str, offset: int,
                       device: torch.device) -> Tensor:
    out = torch.empty(rows, cols, dtype=torch.float32, device=device)
    if out.numel() == 0:   # the native core takes no empty views
        return out
    _C.projection_matrix(view(out), seed, stream, _distribution(dist), offset, 1.0 / math.sqrt(rows),
                         num_threads(), stream_of(out))
    return out


@_projection_matrix.register_fake
def _(rows, cols, seed, stream, dist, offset, device):
    return torch.empty(rows, cols, dtype=torch.float32, device=device)


def projection_matrix(rows: int, cols: int, *, seed: int, dist: str = "rademacher", offset: int = 0,
                      stream: int = STREAM_DENSE, device=None) -> Tensor:
    """Columns offset..offset+cols of the random projection with `rows` rows, materialised: [rows, cols] float32,
    entries +-1/sqrt(rows) (Rademacher) or N(0, 1/rows) (Gaussian), each a pure function of (seed, stream, row,
    column). Equal to decomp.reference.projection_matrix bit for bit on the CPU, and on CUDA for Rademacher
    entries; Gaussian entries on CUDA agree to float rounding (the GPU's double-precision log and sin/cos)."""
    _check_sketch_args(seed, dist, rows=rows)
    check.offset(offset)
    if isinstance(cols, bool) or not isinstance(cols, int) or cols < 0:
        raise ValueError(f"cols must be a non-negative int; got {cols!r}")
    check.column_range(offset, cols)
    return _projection_matrix(rows, cols, seed, stream, dist, offset, torch.device(device or "cpu"))


@torch.library.custom_op("decomp::sketch_dense", mutates_args=())
def _sketch_dense(X: Tensor, k: int, seed: int, offset: int, dist: str) -> Tensor:
    out = torch.empty(X.shape[0], k, dtype=torch.float32, device=X.device)
    if X.numel() == 0:   # no example, or no column: the sketch of nothing is zero
        return out.zero_()
    _C.sketch_dense(view(X), view(out), seed, STREAM_DENSE, _distribution(dist), offset, 1.0 / math.sqrt(k),
                    num_threads(), stream_of(X))
    return out


@_sketch_dense.register_fake
def _(X, k, seed, offset, dist):
    return X.new_empty((X.shape[0], k), dtype=torch.float32)


def sketch_dense(X: Tensor, *, k: int, seed: int, offset: int = 0, dist: str = "rademacher") -> Tensor:
    """Johnson-Lindenstrauss sketch S X of each row, S generated on the fly from (seed, row, column), never stored.

    X: [N, p] float32 or bfloat16, holding columns offset..offset+p of the full vector, so that sketches of
    column chunks add up to the sketch of the whole: sketch_dense(X[:, :m]) + sketch_dense(X[:, m:], offset=m)
    == sketch_dense(X). k: sketch size; seed in [0, 2**32); dist: "rademacher" (default) or "gaussian".
    Returns [N, k] float32 with E[<S x, S y>] = <x, y>. Rows are independent: any batch split gives the same rows.
    """
    check.tensor("X", X, shape="[N, p]", ranks=(2,), dtypes=check.FLOAT_INPUTS)
    _check_sketch_args(seed, dist, k=k)
    check.offset(offset)
    check.column_range(offset, X.shape[1])
    return _sketch_dense(X, k, seed, offset, dist)


def sketch_linear(A: Tensor, G: Tensor, *, k_out: int, k_in: int, seed: int, lengths: Optional[Tensor] = None,
                  dist: str = "rademacher") -> Tensor:
    """Kronecker sketch of each example's Linear-layer gradient G_n^T A_n, never formed: vec(S_out G_n^T A_n S_in^T).

    A: [N, T, in] or [N, in]; G: [N, T, out] or [N, out]; lengths: [N]. S = S_out (x) S_in with S_out [k_out, out]
    and S_in [k_in, in] from streams of the same seed, each scaled by 1/sqrt(rows). Returns [N, k_out * k_in]
    float32, row-major over (k_out, k_in). The projections come from the native generator; the products from
    kronecker_from_projections.
    """
    A, G = _factors(A, G)
    _check_sketch_args(seed, dist, k_out=k_out, k_in=k_in)
    lengths = check.lengths(lengths, A.shape[0], A.device)
    check.lengths_values(lengths, A.shape[1])
    S_out = projection_matrix(k_out, G.shape[2], seed=seed, dist=dist, stream=STREAM_KRON_OUT, device=A.device)
    S_in = projection_matrix(k_in, A.shape[2], seed=seed, dist=dist, stream=STREAM_KRON_IN, device=A.device)
    return kronecker_from_projections(A, G, S_out, S_in, lengths)


def masked_rows(t: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """t [N, T, ...] with rows t >= lengths[n] set to zero (lengths None: t itself)."""
    if lengths is None:
        return t
    keep = torch.arange(t.shape[1], device=t.device)[None, :] < lengths[:, None]
    return torch.where(keep.view(*keep.shape, *([1] * (t.dim() - 2))), t, torch.zeros((), dtype=t.dtype,
                                                                                        device=t.device))


@_op("decomp::kronecker_sketch_into", mutates_args=("out",))
def _kronecker_sketch_into(A: Tensor, G: Tensor, S_out: Tensor, S_in: Tensor, lengths: Optional[Tensor],
                           out: Tensor) -> None:
    if out.numel() == 0 or A.shape[1] == 0:
        return
    if A.is_cuda:   # cuBLAS GEMMs over all tokens, padding masked on the small [N, T, k] sides
        projected_g = masked_rows(G.to(S_out.dtype) @ S_out.T, lengths)     # [N, T, k_out]
        projected_a = masked_rows(A.to(S_in.dtype) @ S_in.T, lengths)       # [N, T, k_in]
        out += torch.bmm(projected_g.transpose(1, 2), projected_a).reshape(out.shape)
        return
    if A.dtype not in check.FLOAT_INPUTS or G.dtype != A.dtype:
        A, G = A.float(), G.float()
    _C.kronecker_sketch(view(A), view(G), view(S_out), view(S_in), optional_view(lengths), view(out), num_threads())


@_kronecker_sketch_into.register_fake
def _(A, G, S_out, S_in, lengths, out):
    return None


def kronecker_from_projections(A: Tensor, G: Tensor, S_out: Tensor, S_in: Tensor, lengths: Optional[Tensor],
                               out: Optional[Tensor] = None) -> Tensor:
    """sum over valid t of (S_out g_t)(S_in a_t)^T, flattened: [N, k_out * k_in] float32, added into `out` when
    given (a view with unit column stride, e.g. a block of a wider row). A: [N, T, in], G: [N, T, out], S_out
    [k_out, out] and S_in [k_in, in] float32. On the CPU one fused pass (decomp._C.kronecker_sketch) reads each
    valid token's rows once and writes nothing per token; padding is never read, whatever it holds (NaN
    included)."""
    if out is None:
        out = torch.zeros(A.shape[0], S_out.shape[0] * S_in.shape[0], dtype=torch.float32, device=A.device)
    _run(_kronecker_sketch_into, A, G, S_out, S_in, lengths, out)
    return out


@torch.library.custom_op("decomp::count_sketch", mutates_args=())
def _count_sketch(X: Tensor, k: int, seed: int, stream: int, lengths: Optional[Tensor]) -> Tensor:
    out = torch.empty(X.shape[0], X.shape[1], k, dtype=torch.float32, device=X.device)
    if X.numel() == 0:
        return out.zero_()
    _C.count_sketch(view(X), optional_view(lengths), view(out), seed, stream, num_threads(), stream_of(X))
    return out


@_count_sketch.register_fake
def _(X, k, seed, stream, lengths):
    return X.new_empty((X.shape[0], X.shape[1], k), dtype=torch.float32)


def count_sketch_linear(A: Tensor, G: Tensor, *, k: int, seed: int, lengths: Optional[Tensor] = None) -> Tensor:
    """TensorSketch of each example's Linear-layer gradient sum_t g_t a_t^T: [N, k] float32.

    The CountSketch with bucket (h_out(o) + h_in(i)) mod k and sign s_out(o) s_in(i), computed as the circular
    convolution of the two factors' CountSketches (native hashing, torch.fft), without forming outer products.
    E[<z(x), z(y)>] = <x, y> for the flattened gradients. A: [N, T, in] or [N, in]; G: [N, T, out] or [N, out].
    """
    A, G = _factors(A, G)
    _check_sketch_args(seed, "rademacher", k=k)
    lengths = check.lengths(lengths, A.shape[0], A.device)
    check.lengths_values(lengths, A.shape[1])
    count_g = _count_sketch(G, k, seed, STREAM_COUNT_OUT, lengths)
    count_a = _count_sketch(A, k, seed, STREAM_COUNT_IN, lengths)
    if count_g.numel() == 0:  # MKL's FFT rejects empty batches
        return count_g.new_zeros(count_g.shape[0], k)
    # the circular convolution of the two CountSketches, summed over tokens, in the frequency domain; the product
    # is taken in place (a third [N, T, k/2+1] complex buffer costs more than the multiplication itself)
    spectrum = torch.fft.rfft(count_g, dim=2)
    return torch.fft.irfft(spectrum.mul_(torch.fft.rfft(count_a, dim=2)).sum(1), n=k, dim=1)
