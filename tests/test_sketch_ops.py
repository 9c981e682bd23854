"""Sketch kernels: equal to their references and to materialised projections, invariant to batch split,
chunking and thread count, and statistically what the theory says (bounds derived, not tuned)."""

import math
import zlib

import pytest
import torch

from decomp import ops, reference
from conftest import DEVICES, assert_within_rounding

DISTS = ["rademacher", "gaussian"]


def stable_seed(*parts):
    return zlib.crc32(repr(parts).encode())


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("rows, cols, offset", [(1, 1, 0), (7, 100, 5), (33, 65, 31), (5, 40, 2 ** 40 + 3)])
def test_projection_matrix_is_the_reference(dist, rows, cols, offset, device):
    native = ops.projection_matrix(rows, cols, seed=17, dist=dist, offset=offset, device=device)
    assert native.device.type == device.type
    expected = reference.projection_matrix(rows, cols, seed=17, dist=dist, offset=offset)
    if device.type == "cpu" or dist == "rademacher":
        assert torch.equal(native.cpu(), expected)  # same hash, same float: bit for bit
    else:  # the GPU's double log and sin/cos may round the last float bit differently
        torch.testing.assert_close(native.cpu(), expected, rtol=2 ** -22, atol=0)


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("N, p, k, offset", [(0, 5, 3, 0), (1, 1, 1, 0), (5, 31, 17, 7), (13, 300, 33, 64),
                                             (25, 1000, 100, 1), (3, 257, 32, 2 ** 33), (3, 9001, 130, 5),
                                             (131, 40, 9, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("contiguous", [True, False])
def test_sketch_dense_matches_reference(dist, N, p, k, offset, dtype, contiguous, device):
    g = torch.Generator().manual_seed(stable_seed(N, p, k, dist))
    X = torch.randn(N, 2 * p if not contiguous else p, generator=g).to(dtype).to(device)
    X = X if contiguous else X[:, ::2]
    native = ops.sketch_dense(X, k=k, seed=5, offset=offset, dist=dist)
    assert native.shape == (N, k) and native.dtype == torch.float32 and native.device == X.device
    X = X.cpu()
    expected = reference.sketch_dense(X.double(), k=k, seed=5, offset=offset, dist=dist)
    S = reference.projection_matrix(k, p, seed=5, dist=dist, offset=offset, dtype=torch.float64)
    magnitude = X.double().abs() @ S.abs().T
    assert_within_rounding(native, expected, magnitude, p + 4)


@pytest.mark.parametrize("p", [1000, 20000])
def test_sketch_dense_chunks_add_up_and_rows_do_not_depend_on_the_batch(p, device):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(9, p, generator=g).to(device)
    whole = ops.sketch_dense(X, k=64, seed=3)
    parts = ops.sketch_dense(X[:, :333], k=64, seed=3) + ops.sketch_dense(X[:, 333:], k=64, seed=3, offset=333)
    S = reference.projection_matrix(64, p, seed=3, dtype=torch.float64).to(device)
    assert_within_rounding(parts, whole, X.double().abs() @ S.abs().T, 2 * p + 8)
    assert torch.equal(ops.sketch_dense(X[2:5], k=64, seed=3), whole[2:5])
    assert torch.equal(ops.sketch_dense(X[4:5], k=64, seed=3), whole[4:5])


def test_sketch_dense_does_not_depend_on_thread_count():
    X = torch.randn(13, 3000, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.sketch_dense(X, k=200, seed=4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, ops.sketch_dense(X, k=200, seed=4))


def per_example_gradients(A, G, lengths):
    """[N, out * in] float64, each example's sum_t g_t a_t^T over its valid tokens, flattened row-major."""
    rows = []
    for n in range(A.shape[0]):
        length = A.shape[1] if lengths is None else int(lengths[n])
        rows.append((G[n, :length].double().T @ A[n, :length].double()).flatten())
    return torch.stack(rows) if rows else torch.zeros(0, G.shape[2] * A.shape[2], dtype=torch.float64)


def factor_inputs(N, T, fin, fout, dtype, with_lengths, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(N, T, fin, generator=g).to(dtype)
    G = torch.randn(N, T, fout, generator=g).to(dtype)
    lengths = None
    if with_lengths:
        lengths = torch.randint(0, T + 1, (N,), generator=g)
        if N:
            lengths[0] = 0
        mask = torch.arange(T)[None, :] >= lengths[:, None]
        A, G = A.masked_fill(mask[..., None], float("nan")), G.masked_fill(mask[..., None], float("nan"))
    return A, G, lengths


LINEAR_CASES = [(0, 3, 4, 5), (1, 1, 7, 3), (4, 6, 9, 11), (5, 17, 20, 13)]


@pytest.mark.parametrize("N, T, fin, fout", LINEAR_CASES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_sketch_linear_is_the_kronecker_projection_of_the_gradients(N, T, fin, fout, dist, dtype, with_lengths,
                                                                     device):
    A, G, lengths = factor_inputs(N, T, fin, fout, dtype, with_lengths, stable_seed(N, T, dist, "kron"))
    k_out, k_in = 3, 4
    native = ops.sketch_linear(A.to(device), G.to(device), k_out=k_out, k_in=k_in, seed=9,
                               lengths=None if lengths is None else lengths.to(device), dist=dist)
    assert native.device.type == device.type
    S_out = reference.projection_matrix(k_out, fout, seed=9, dist=dist, stream=reference.STREAM_KRON_OUT,
                                        dtype=torch.float64)
    S_in = reference.projection_matrix(k_in, fin, seed=9, dist=dist, stream=reference.STREAM_KRON_IN,
                                       dtype=torch.float64)
    S = torch.kron(S_out, S_in)
    grads = per_example_gradients(A, G, lengths)
    expected = grads @ S.T
    magnitude = per_example_gradients(A.abs().nan_to_num(), G.abs().nan_to_num(), lengths) @ S.abs().T
    assert_within_rounding(native, expected, magnitude, 2 * (T + fin + fout) + 8)
    reference_result = reference.sketch_linear(A, G, k_out=k_out, k_in=k_in, seed=9, lengths=lengths, dist=dist)
    assert_within_rounding(reference_result, expected, magnitude, 2 * (T + fin + fout) + 8)


@pytest.mark.parametrize("N, T, fin, fout", LINEAR_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_count_sketch_linear_is_the_count_sketch_of_the_gradients(N, T, fin, fout, dtype, with_lengths, device):
    A, G, lengths = factor_inputs(N, T, fin, fout, dtype, with_lengths, stable_seed(N, T, "count"))
    k = 16
    native = ops.count_sketch_linear(A.to(device), G.to(device), k=k, seed=11,
                                     lengths=None if lengths is None else lengths.to(device))
    assert native.device.type == device.type
    bucket_out, sign_out = reference.count_hashes(fout, k, seed=11, stream=reference.STREAM_COUNT_OUT)
    bucket_in, sign_in = reference.count_hashes(fin, k, seed=11, stream=reference.STREAM_COUNT_IN)
    bucket = (bucket_out[:, None] + bucket_in[None, :]).flatten() % k
    sign = (sign_out[:, None] * sign_in[None, :]).flatten().double()
    C = torch.zeros(k, fout * fin, dtype=torch.float64)
    C[bucket, torch.arange(fout * fin)] = sign
    grads = per_example_gradients(A, G, lengths)
    # The FFT spreads rounding over all k outputs (its error bound is in norm, not per bucket), so each output's
    # scale is the example's total absolute mass; ~log2(k) butterfly levels each way plus the token sums.
    mass = per_example_gradients(A.abs().nan_to_num(), G.abs().nan_to_num(), lengths) @ C.abs().T
    magnitude = mass.sum(1, keepdim=True).expand_as(mass)
    steps = 2 * T + 4 * (math.log2(k) + 2)
    assert_within_rounding(native, grads @ C.T, magnitude, steps)


def test_sketches_do_not_depend_on_the_batch_split(device):
    A, G, lengths = factor_inputs(6, 5, 8, 7, torch.float32, True, 3)
    A, G, lengths = A.to(device), G.to(device), lengths.to(device)
    for sketch in (lambda *a: ops.sketch_linear(*a[:2], k_out=4, k_in=4, seed=1, lengths=a[2]),
                   lambda *a: ops.count_sketch_linear(*a[:2], k=32, seed=1, lengths=a[2])):
        whole = sketch(A, G, lengths)
        split = torch.cat([sketch(A[:2], G[:2], lengths[:2]), sketch(A[2:], G[2:], lengths[2:])])
        torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-6)


def strided(x):
    """x as a view whose token rows are not contiguous (feature stride T)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("N, T, fin, fout, k_out, k_in", [(3, 13, 37, 300, 17, 33), (11, 1, 50, 20, 16, 5),
                                                          (2, 40, 1, 9, 1, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kronecker_from_projections_adds_into_a_block_of_a_wider_row(N, T, fin, fout, k_out, k_in, dtype, device):
    """The fused pass over tokens: projections spanning several panels of 16 columns (and ragged ones), tiles of
    tokens spanning examples (T = 1), rows read through strides, NaN padding never read, the result added into
    a block of wider rows as the sketch engine's feature rows are, and nothing outside the block touched."""
    A, G, lengths = factor_inputs(N, T, fin, fout, dtype, True, stable_seed(N, T, fin, "fused"))
    g = torch.Generator().manual_seed(5)
    S_out, S_in = torch.randn(k_out, fout, generator=g), torch.randn(k_in, fin, generator=g)
    wide = torch.randn(N, k_out * k_in + 7, generator=g)
    before, wide = wide.clone(), wide.to(device)
    block = slice(3, 3 + k_out * k_in)
    ops.kronecker_from_projections(strided(A).to(device), strided(G).to(device), S_out.to(device), S_in.to(device),
                                   lengths.to(device), out=wide[:, block])
    wide = wide.cpu()
    expected = before[:, block].double() + reference.kronecker_from_projections(
        A.double(), G.double(), S_out.double(), S_in.double(), lengths)
    magnitude = before[:, block].double().abs() + reference.kronecker_from_projections(
        A.double().abs().nan_to_num(), G.double().abs().nan_to_num(), S_out.double().abs(), S_in.double().abs(),
        lengths)
    assert_within_rounding(wide[:, block], expected, magnitude, max(fin, fout) + T + 4)
    assert torch.equal(wide[:, :3], before[:, :3]) and torch.equal(wide[:, block.stop:], before[:, block.stop:])


def test_an_examples_kronecker_sketch_depends_on_its_own_rows_only():
    """Bit for bit whatever else is in the batch, however long its padding, and however many threads run (the
    stores of one run sharded over ranks or batch sizes must hold the same rows)."""
    A, G, lengths = factor_inputs(9, 23, 128, 96, torch.float32, True, 8)
    g = torch.Generator().manual_seed(6)
    S_out, S_in = torch.randn(16, 96, generator=g), torch.randn(16, 128, generator=g)
    whole = ops.kronecker_from_projections(A, G, S_out, S_in, lengths)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ops.kronecker_from_projections(A, G, S_out, S_in, lengths), whole)
    finally:
        torch.set_num_threads(threads)
    for n, length in enumerate(lengths.tolist()):
        alone = ops.kronecker_from_projections(A[n:n + 1, :length], G[n:n + 1, :length], S_out, S_in, None)
        assert torch.equal(alone[0], whole[n]), n


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it on one)")
def test_cuda_and_cpu_give_the_same_sketches_for_one_seed():
    g = torch.Generator().manual_seed(12)
    X = torch.randn(7, 5000, generator=g)
    A, G, lengths = factor_inputs(7, 9, 33, 20, torch.float32, True, 13)
    # Each device sums in its own order, so dense sketches agree to float32 rounding of a length-p dot product.
    S = reference.projection_matrix(96, 5000, seed=2, dtype=torch.float64)
    assert_within_rounding(ops.sketch_dense(X.cuda(), k=96, seed=2), ops.sketch_dense(X, k=96, seed=2),
                           2 * X.double().abs() @ S.abs().T, 5000 + 40)
    # The CountSketch adds the same terms in the same order on both devices: bit for bit.
    for stream in (reference.STREAM_COUNT_IN, reference.STREAM_COUNT_OUT):
        cpu = torch.ops.decomp.count_sketch(A, 64, 2, stream, lengths)
        assert torch.equal(torch.ops.decomp.count_sketch(A.cuda(), 64, 2, stream, lengths.cuda()).cpu(), cpu)
    assert torch.equal(ops.projection_matrix(16, 33, seed=2, device="cuda").cpu(),
                       ops.projection_matrix(16, 33, seed=2))


# --- statistics -----------------------------------------------------------------------------------------------

def unbiasedness_check(estimates, truth, variance):
    """The mean of M independent estimates lies within 5 standard errors (a 6e-7 two-sided Gaussian tail)."""
    standard_error = math.sqrt(variance / len(estimates))
    assert abs(float(torch.tensor(estimates).mean()) - truth) <= 5 * standard_error


@pytest.mark.parametrize("dist", DISTS)
def test_inner_products_are_unbiased_over_seeds(dist):
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(64, generator=g).double(), torch.randn(64, generator=g).double()
    y = 0.6 * x + 0.8 * y
    k, seeds = 16, 400
    X = torch.stack([x, y]).float()
    estimates = []
    for seed in range(seeds):
        z = ops.sketch_dense(X, k=k, seed=seed, dist=dist).double()
        estimates.append(float(z[0] @ z[1]))
    xx, yy, xy = float(x @ x), float(y @ y), float(x @ y)
    # Var <Sx, Sy> = (|x|^2 |y|^2 + <x,y>^2 - c sum x_i^2 y_i^2) / k, c = 2 for Rademacher, 0 for Gaussian.
    c = 2.0 if dist == "rademacher" else 0.0
    variance = (xx * yy + xy ** 2 - c * float((x ** 2 * y ** 2).sum())) / k
    unbiasedness_check(estimates, xy, variance)


def test_count_sketch_inner_products_are_unbiased_over_seeds():
    g = torch.Generator().manual_seed(8)
    A, G = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 5, generator=g)
    grads = per_example_gradients(A, G, None)
    truth = float(grads[0] @ grads[1])
    k, seeds = 8, 400
    estimates = [float(z[0].double() @ z[1].double())
                 for z in (ops.count_sketch_linear(A, G, k=k, seed=s) for s in range(seeds))]
    # Var of a CountSketch inner product <= (|x|^2 |y|^2 + <x,y>^2) / k (Weinberger et al. 2009).
    variance = (float(grads[0] @ grads[0]) * float(grads[1] @ grads[1]) + truth ** 2) / k
    unbiasedness_check(estimates, truth, variance)


@pytest.mark.parametrize("dist", DISTS)
def test_norms_are_preserved_within_the_jl_bound(dist):
    k, vectors = 256, 200
    # P(|‖Sx‖²/‖x‖² - 1| > eps) <= 2 exp(-k (eps²/2 - eps³/3) / 2) for Rademacher and Gaussian S (Achlioptas
    # 2003); eps is the smallest value whose union bound over all vectors is <= 1e-6.
    eps = next(e / 1000 for e in range(1, 1000)
               if vectors * 2 * math.exp(-k * ((e / 1000) ** 2 / 2 - (e / 1000) ** 3 / 3) / 2) <= 1e-6)
    X = torch.randn(vectors, 500, generator=torch.Generator().manual_seed(9))
    X[:10] = torch.nn.functional.one_hot(torch.arange(10) * 37, 500).float()  # sparse vectors too
    ratio = ops.sketch_dense(X, k=k, seed=21, dist=dist).double().pow(2).sum(1) / X.double().pow(2).sum(1)
    assert float((ratio - 1).abs().max()) <= eps, f"distortion beyond eps={eps:.3f}"


def test_different_seeds_give_independent_sketches():
    k, pairs = 64, 300
    x = torch.randn(1, 400, generator=torch.Generator().manual_seed(10))
    norm2 = float(x.double().pow(2).sum())
    # For independent S, S': E<Sx, S'x> = 0 and Var = |x|^4 / k.
    estimates = [float(ops.sketch_dense(x, k=k, seed=2 * s).double() @ ops.sketch_dense(x, k=k, seed=2 * s + 1)
                       .double().T) / norm2 for s in range(pairs)]
    unbiasedness_check(estimates, 0.0, 1.0 / k)
    # Sign agreement of two projection matrices: Binomial(n, 1/2), within 5 standard deviations of n/2.
    S1, S2 = ops.projection_matrix(64, 512, seed=1), ops.projection_matrix(64, 512, seed=2)
    n = S1.numel()
    assert abs(float((S1 == S2).sum()) - n / 2) <= 5 * math.sqrt(n / 4)


# --- bad input ------------------------------------------------------------------------------------------------

A3, G3 = torch.randn(2, 3, 4), torch.randn(2, 3, 5)


@pytest.mark.parametrize("call, message", [
    (lambda: ops.sketch_dense(torch.randn(2, 5), k=0, seed=0), r"k must be a positive int; got 0"),
    (lambda: ops.sketch_dense(torch.randn(2, 5), k=True, seed=0), r"k must be a positive int; got True"),
    (lambda: ops.sketch_dense(torch.randn(2, 5), k=4, seed=-1), r"seed must be an int in \[0, 2\*\*32\); got -1"),
    (lambda: ops.sketch_dense(torch.randn(2, 5), k=4, seed=2 ** 32), r"seed must be an int in \[0, 2\*\*32\)"),
    (lambda: ops.sketch_dense(torch.randn(2, 5), k=4, seed=1.5), r"seed must be an int"),
    (lambda: ops.sketch_dense(torch.randn(2, 5), k=4, seed=0, offset=-3), r"offset must be an int in \[0, 2\*\*63\)"),
    (lambda: ops.sketch_dense(torch.randn(2, 5), k=4, seed=0, dist="cauchy"),
     r"dist must be one of rademacher, gaussian; got 'cauchy'"),
    (lambda: ops.sketch_dense(torch.randn(2, 5, 3), k=4, seed=0), r"X must be \[N, p\] float32 or bfloat16; got"),
    (lambda: ops.sketch_linear(torch.randn(3, 3, 4), G3, k_out=2, k_in=2, seed=0), r"A and G must agree in N and T"),
    (lambda: ops.sketch_linear(A3, G3, k_out=0, k_in=2, seed=0), r"k_out must be a positive int"),
    (lambda: ops.sketch_linear(A3, G3, k_out=2, k_in=2, seed=0, lengths=torch.tensor([4, 1])),
     r"lengths must lie in \[0, T=3\]"),
    (lambda: ops.count_sketch_linear(torch.randn(3, 3, 4), G3, k=8, seed=0), r"A and G must agree in N and T"),
    (lambda: ops.count_sketch_linear(A3, G3, k=-8, seed=0), r"k must be a positive int; got -8"),
    (lambda: ops.projection_matrix(0, 5, seed=0), r"rows must be a positive int; got 0"),
])
def test_bad_sketch_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_sketch_ops_pass_opcheck_and_compile():
    X = torch.randn(3, 40)
    torch.library.opcheck(torch.ops.decomp.sketch_dense.default, (X, 8, 1, 3, "rademacher"))
    torch.library.opcheck(torch.ops.decomp.count_sketch.default, (A3, 8, 1, 3, torch.tensor([3, 1])))
    torch.library.opcheck(torch.ops.decomp.kronecker_sketch_into.default,
                          (A3, G3, torch.randn(2, G3.shape[2]), torch.randn(3, A3.shape[2]), torch.tensor([3, 1]),
                           torch.zeros(A3.shape[0], 6)))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: ops.sketch_dense(x * 2, k=8, seed=1), fullgraph=True, backend="eager")
    assert torch.equal(compiled(X), ops.sketch_dense(X * 2, k=8, seed=1))
