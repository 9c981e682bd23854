"""Native Fisher kernels against their float64 pure-PyTorch references, over one shared input matrix."""

import math
import zlib

import pytest
import torch

import decomp
from decomp import ops, reference
from conftest import assert_within_rounding

# (N, T, in, out): empty batch, single example, T = 1, odd sizes off every tile multiple, long sequences.
SHAPES = [(0, 4, 5, 7), (1, 1, 1, 1), (1, 7, 13, 9), (9, 1, 33, 70), (6, 5, 37, 29), (4, 23, 70, 101),
          (3, 64, 129, 40)]
DTYPES = [torch.float32, torch.bfloat16]


def stable_seed(*parts):
    """A seed that differs per case but not per process (hash() of strings is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def make_lengths(N, T, generator, device):
    """Valid prefixes including an empty example and a full one."""
    lengths = torch.randint(0, T + 1, (N,), generator=generator)
    if N >= 2:
        lengths[0], lengths[1] = 0, T
    return lengths.to(device)


def make_factor(N, T, features, dtype, device, generator, contiguous):
    """[N, T, features]; when not contiguous, a strided view (every other feature of a transposed buffer)."""
    if contiguous:
        x = torch.randn(N, T, features, generator=generator)
    else:
        x = torch.randn(N, 2 * features, T, generator=generator).transpose(1, 2)[:, :, ::2]
    return x.to(dtype).to(device)


def poison_padding(x, lengths):
    """NaN beyond each valid prefix: a kernel that reads padding fails loudly."""
    if lengths is None:
        return x
    x = x.clone()
    mask = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None]
    x[mask] = float("nan")
    return x


def case_inputs(shape, dtype, device, *, seed, lengths, weights, contiguous):
    N, T, fin, fout = shape
    g = torch.Generator().manual_seed(seed)
    A = make_factor(N, T, fin, dtype, device, g, contiguous)
    G = make_factor(N, T, fout, dtype, device, g, contiguous)
    L = make_lengths(N, T, g, device) if lengths else None
    W = None
    if weights:
        W = torch.rand(N, generator=g) * 2
        if N:
            W[-1] = 0.0
        W = W.to(device)
    return A, G, L, W


CASES = [dict(lengths=l, weights=w, contiguous=c) for l in (False, True) for w in (False, True) for c in (True, False)]


def rounding_steps(N, T):
    # A dot product over T tokens (T), squaring (2x), the sqrt(w) scaling and the sum over N examples.
    return 2 * T + N + 8


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(k for k, v in c.items() if v) or "plain")
def test_fisher_linear_matches_reference(shape, dtype, case, device):
    A, G, L, W = case_inputs(shape, dtype, device, seed=stable_seed(shape, dtype, "linear"), **case)
    A_run, G_run = poison_padding(A, L), poison_padding(G, L)
    result = ops.fisher_linear(A_run, G_run, lengths=L, weights=W)
    assert result.shape == (shape[3], shape[2]) and result.dtype == torch.float32
    expected = reference.fisher_linear(A.double(), G.double(), lengths=L, weights=W)
    magnitude = reference.fisher_linear(A.double().abs(), G.double().abs(), lengths=L, weights=W)
    assert_within_rounding(result, expected, magnitude, rounding_steps(shape[0], shape[1]), dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(k for k, v in c.items() if v) or "plain")
def test_fisher_linear_bias_matches_reference(shape, dtype, case, device):
    _, G, L, W = case_inputs(shape, dtype, device, seed=stable_seed(shape, dtype, "bias"), **case)
    result = ops.fisher_linear_bias(poison_padding(G, L), lengths=L, weights=W)
    expected = reference.fisher_linear_bias(G.double(), lengths=L, weights=W)
    magnitude = reference.fisher_linear_bias(G.double().abs(), lengths=L, weights=W)
    assert_within_rounding(result, expected, magnitude, rounding_steps(shape[0], shape[1]), dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(k for k, v in c.items() if v) or "plain")
def test_fisher_embedding_matches_reference(shape, dtype, case, device):
    N, T, vocabulary, dim = shape
    _, G, L, W = case_inputs(shape, dtype, device, seed=stable_seed(shape, dtype, "embedding"), **case)
    g = torch.Generator().manual_seed(1)
    # Few distinct ids so that tokens repeat within an example: their rows must be summed before squaring.
    ids = torch.randint(0, min(vocabulary, 3), (N, T), generator=g).to(device)
    if L is not None:
        ids = ids.masked_fill(torch.arange(T, device=device)[None, :] >= L[:, None], -100)  # padding id
    result = ops.fisher_embedding(ids, poison_padding(G, L), vocabulary, lengths=L, weights=W)
    expected = reference.fisher_embedding(ids, G.double(), vocabulary, lengths=L, weights=W)
    magnitude = reference.fisher_embedding(ids, G.double().abs(), vocabulary, lengths=L, weights=W)
    assert_within_rounding(result, expected, magnitude, rounding_steps(N, T), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_bias_and_embedding_split_across_threads_match_reference(dtype, contiguous, device):
    """Batches large enough that the CPU kernels split them over a team of threads (smaller ones run on one): by
    valid tokens for the bias, by ids for the embedding; lengths, weights and repeated ids included."""
    shape = (24, 64, 60, 300)   # about 700 valid tokens x 300 features: above both kernels' one-thread limits
    N, T, vocabulary, dim = shape
    _, G, L, W = case_inputs(shape, dtype, device, seed=stable_seed(shape, dtype, "threads"), lengths=True,
                             weights=True, contiguous=contiguous)
    ids = torch.randint(0, 40, (N, T), generator=torch.Generator().manual_seed(2)).to(device)
    ids = ids.masked_fill(torch.arange(T, device=device)[None, :] >= L[:, None], -100)
    for result, expected, magnitude in (
            (ops.fisher_linear_bias(poison_padding(G, L), lengths=L, weights=W),
             reference.fisher_linear_bias(G.double(), lengths=L, weights=W),
             reference.fisher_linear_bias(G.double().abs(), lengths=L, weights=W)),
            (ops.fisher_embedding(ids, poison_padding(G, L), vocabulary, lengths=L, weights=W),
             reference.fisher_embedding(ids, G.double(), vocabulary, lengths=L, weights=W),
             reference.fisher_embedding(ids, G.double().abs(), vocabulary, lengths=L, weights=W))):
        assert_within_rounding(result, expected, magnitude, rounding_steps(N, T), dtype)


def test_repeated_tokens_are_summed_before_squaring():
    G = torch.tensor([[[1.0], [2.0], [-1.0]]])  # one example, three positions, dim 1
    ids = torch.tensor([[4, 4, 1]])
    result = ops.fisher_embedding(ids, G, 5)
    assert result[4, 0] == 9.0 and result[1, 0] == 1.0 and result.sum() == 10.0


def test_two_dimensional_inputs_mean_one_token(device):
    g = torch.Generator().manual_seed(3)
    A, G = torch.randn(7, 11, generator=g).to(device), torch.randn(7, 5, generator=g).to(device)
    expected = (G.double() ** 2).T @ (A.double() ** 2)
    torch.testing.assert_close(ops.fisher_linear(A, G).double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(ops.fisher_linear_bias(G).double(), (G.double() ** 2).sum(0), rtol=1e-5, atol=0)
    ids = torch.randint(0, 4, (7,), generator=g).to(device)
    torch.testing.assert_close(ops.fisher_embedding(ids, G, 4).double(),
                               reference.fisher_embedding(ids, G.double(), 4), rtol=1e-5, atol=0)


def test_out_accumulates(device):
    g = torch.Generator().manual_seed(4)
    A, G = torch.randn(3, 4, 6, generator=g).to(device), torch.randn(3, 4, 5, generator=g).to(device)
    out = torch.ones(5, 6, device=device)
    result = ops.fisher_linear(A, G, out=out)
    assert result is out
    torch.testing.assert_close(out, 1 + ops.fisher_linear(A, G))
    bias_out = torch.ones(5, device=device)
    ops.fisher_linear_bias(G, out=bias_out)
    torch.testing.assert_close(bias_out, 1 + ops.fisher_linear_bias(G))
    table = torch.ones(3, 5, device=device)
    ids = torch.randint(0, 3, (3, 4), generator=g).to(device)
    ops.fisher_embedding(ids, G, 3, out=table)
    torch.testing.assert_close(table, 1 + ops.fisher_embedding(ids, G, 3))


def test_padding_costs_nothing_and_changes_nothing(device):
    """Padded batch equals each example run alone on its valid prefix."""
    g = torch.Generator().manual_seed(5)
    A, G = torch.randn(4, 9, 10, generator=g).to(device), torch.randn(4, 9, 8, generator=g).to(device)
    lengths = torch.tensor([9, 3, 0, 5], device=device)
    batched = ops.fisher_linear(A, G, lengths=lengths)
    alone = sum(ops.fisher_linear(A[n:n + 1, :l], G[n:n + 1, :l]) for n, l in enumerate(lengths.tolist()) if l)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)


def test_opcheck():
    g = torch.Generator().manual_seed(6)
    A, G = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 5, generator=g)
    lengths, weights = torch.tensor([4, 0, 2]), torch.tensor([0.5, 1.0, 2.0])
    ids = torch.randint(0, 7, (3, 4), generator=g)
    checks = [
        (torch.ops.decomp.fisher_linear.default, (A, G, lengths, weights)),
        (torch.ops.decomp.fisher_linear.default, (A, G, None, None)),
        (torch.ops.decomp.fisher_linear_into.default, (A, G, lengths, weights, torch.zeros(5, 6))),
        (torch.ops.decomp.fisher_linear_bias.default, (G, lengths, weights)),
        (torch.ops.decomp.fisher_linear_bias_into.default, (G, None, weights, torch.zeros(5))),
        (torch.ops.decomp.fisher_embedding.default, (ids, G, 7, lengths, weights)),
        (torch.ops.decomp.fisher_embedding_into.default, (ids, G, None, None, torch.zeros(7, 5))),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)


def test_runs_under_torch_compile():
    g = torch.Generator().manual_seed(7)
    A, G = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 5, generator=g)
    lengths = torch.tensor([4, 1, 2])

    def fisher_and_bias(A, G, lengths):
        return ops.fisher_linear(A * 2, G, lengths=lengths), ops.fisher_linear_bias(G, lengths=lengths)

    torch._dynamo.reset()
    compiled = torch.compile(fisher_and_bias, fullgraph=True, backend="eager")
    weight, bias = compiled(A, G, lengths)
    torch.testing.assert_close(weight, ops.fisher_linear(A * 2, G, lengths=lengths))
    torch.testing.assert_close(bias, ops.fisher_linear_bias(G, lengths=lengths))


def test_build_info():
    info = decomp.build_info()
    assert isinstance(info["cuda_compiled"], bool)
    assert isinstance(info["cuda_archs"], str) and info["openmp_threads"] >= 1
    assert info["version"] == decomp.__version__
    if info["cuda_compiled"]:
        assert "80" in info["cuda_archs"] and "90" in info["cuda_archs"]


# --- bad input: each error names the argument, what was expected and what was given -------------------------

A3, G3 = torch.randn(2, 3, 4), torch.randn(2, 3, 5)


@pytest.mark.parametrize("call, message", [
    (lambda: ops.fisher_linear(torch.randn(3, 5).double(), torch.randn(3, 5).double()),
     r"G must be \[N, T, out\] or \[N, out\] float32 or bfloat16; got \[3, 5\] float64 on cpu"),
    (lambda: ops.fisher_linear(torch.randn(2, 3), G3),
     r"A must be \[N, T, in\] \(G is \[N, T, out\]\) float32 on the same device as G; got \[2, 3\] float32 on cpu"),
    (lambda: ops.fisher_linear(A3.to("meta"), G3),
     r"A must be .* on the same device as G; got \[2, 3, 4\] float32 on meta"),
    (lambda: ops.fisher_linear(A3.bfloat16(), G3), r"A must be .* float32 on the same device as G"),
    (lambda: ops.fisher_linear(torch.randn(3, 3, 4), G3), r"A and G must agree in N and T"),
    (lambda: ops.fisher_linear(A3, G3, lengths=torch.tensor([1, 4])), r"lengths must lie in \[0, T=3\]; got .* 4"),
    (lambda: ops.fisher_linear(A3, G3, lengths=torch.tensor([-1, 2])), r"lengths must lie in \[0, T=3\]; got .*-1"),
    (lambda: ops.fisher_linear(A3, G3, lengths=torch.tensor([1.0, 2.0])), r"lengths must be \[N\] int64 or int32"),
    (lambda: ops.fisher_linear(A3, G3, lengths=torch.tensor([1, 2, 3])), r"lengths must have N = 2"),
    (lambda: ops.fisher_linear(A3, G3, weights=torch.tensor([1.0, -2.0])), r"weights must be finite and >= 0"),
    (lambda: ops.fisher_linear(A3, G3, weights=torch.tensor([1.0, math.nan])), r"weights must be finite"),
    (lambda: ops.fisher_linear(A3, G3, out=torch.zeros(4, 5)),
     r"out must be a contiguous \[5, 4\] float32 tensor on the inputs' device; got \[4, 5\] float32 on cpu"),
    (lambda: ops.fisher_linear(A3, G3, out=torch.zeros(4, 5).T), r"out must be a contiguous \[5, 4\]"),
    (lambda: ops.fisher_linear_bias(torch.randn(2, 3, 4, 5)), r"G must be \[N, T, out\] or \[N, out\]"),
    (lambda: ops.fisher_embedding(torch.tensor([[0, 1, 9]] * 2), G3, 5),
     r"ids must lie in \[0, num_embeddings=5\) at valid positions; got 9 at example 0, position 2"),
    (lambda: ops.fisher_embedding(torch.tensor([[0, 1, 2], [0, 7, 1]]), G3, 5, weights=torch.tensor([1.0, 0.0])),
     r"ids must lie in \[0, num_embeddings=5\) at valid positions; got 7 at example 1, position 1"),
    (lambda: ops.fisher_embedding(torch.tensor([[0, -1, 2]] * 2), G3, 5), r"ids must lie in \[0, num_embeddings=5\)"),
    (lambda: ops.fisher_embedding(torch.zeros(2, 4, dtype=torch.int64), G3, 5), r"ids must be \[N, T\] matching G"),
    (lambda: ops.fisher_embedding(torch.zeros(2, 3), G3, 5), r"ids must be \[N, T\] or \[N\] int64 or int32"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_failed_call_leaves_out_untouched():
    out = torch.full((5, 4), 3.0)
    with pytest.raises(ValueError):
        ops.fisher_linear(A3, G3, lengths=torch.tensor([1, 9]), out=out)
    table = torch.full((5, 5), 3.0)
    with pytest.raises(ValueError):
        ops.fisher_embedding(torch.tensor([[0, 1, 2], [3, 4, 7]]), G3, 5, out=table)
    assert (out == 3.0).all() and (table == 3.0).all()


def test_ids_beyond_lengths_are_ignored():
    ids = torch.tensor([[0, 1, 99], [2, 99, 99]])
    result = ops.fisher_embedding(ids, G3, 5, lengths=torch.tensor([2, 1]))
    torch.testing.assert_close(result, reference.fisher_embedding(ids, G3, 5, lengths=torch.tensor([2, 1])))


def test_cuda_view_is_dispatched_to_cuda_or_refused_clearly():
    """A view that claims to be on CUDA never reaches the CPU kernel: without CUDA compiled in, the error says how
    to rebuild; with CUDA compiled in but no usable GPU, the CUDA runtime's error surfaces as RuntimeError."""
    from decomp.kernels.native import _C, view

    A = view(A3)
    out_tensor = torch.zeros(5, 4)
    fake_cuda = _C.TensorView(A3.data_ptr(), [2, 3, 4], [12, 4, 1], _C.DType.float32, True, 0)
    fake_cuda_g = _C.TensorView(G3.data_ptr(), [2, 3, 5], [15, 5, 1], _C.DType.float32, True, 0)
    fake_out = _C.TensorView(out_tensor.data_ptr(), [5, 4], [4, 1], _C.DType.float32, True, 0)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA kernels are tested by the device matrix instead")
    message = "cudaGetDevice" if decomp.build_info()["cuda_compiled"] else "built without CUDA"
    with pytest.raises(RuntimeError, match=message):
        _C.fisher_linear(fake_cuda, fake_cuda_g, None, None, fake_out, 1, 0)
    fake_x = _C.TensorView(A3.data_ptr(), [5, 4], [4, 1], _C.DType.float32, True, 0)
    with pytest.raises(RuntimeError, match=message):  # the sketch ops dispatch alike
        _C.sketch_dense(fake_x, fake_out, 1, 0, _C.Distribution.rademacher, 0, 1.0, 1, 0)
    with pytest.raises(ValueError, match="X's device"):
        _C.sketch_dense(view(torch.zeros(5, 4)), fake_out, 1, 0, _C.Distribution.rademacher, 0, 1.0, 1, 0)
    with pytest.raises(ValueError, match="one device"):
        _C.fisher_linear(A, fake_cuda_g, None, None, view(out_tensor), 1, 0)
    assert (out_tensor == 0).all()


def test_eager_calls_skip_the_dispatcher_and_traced_calls_do_not():
    """Plain calls run the implementation directly (the dispatcher's cost is most of a small call's); under a
    dispatch mode (as under tracing) the registered op is called, with the same result."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(8)
    A, G = torch.randn(4, 3, 6, generator=g), torch.randn(4, 3, 5, generator=g)
    lengths = torch.tensor([3, 0, 1, 2])
    eager = ops.fisher_linear_bias(G, lengths=lengths), ops.fisher_linear(A, G, lengths=lengths)
    assert torch.equal(eager[0], torch.ops.decomp.fisher_linear_bias(G, lengths, None))
    assert torch.equal(eager[1], torch.ops.decomp.fisher_linear(A, G, lengths, None))
    with Seen() as mode:
        seen = ops.fisher_linear_bias(G, lengths=lengths), ops.fisher_linear(A, G, lengths=lengths)
    assert any("fisher_linear_bias" in op for op in mode.ops) and any(op.startswith("decomp.fisher_linear.")
                                                                         for op in mode.ops)
    assert all(torch.equal(a, b) for a, b in zip(seen, eager))
