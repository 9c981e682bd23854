"""data_tsv (ours): TSV-M with each task's subspace chosen in the norm of its own inputs, against its formula
computed by hand in float64 with numpy on small matrices."""

import numpy as np
import pytest
import torch

import decomp


def task_states(M=3, seed=0, out=8, inp=6):
    """A base and M models: one Linear layer `lin` ([out, in]), its bias, and a 2-D embedding without a Gram."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"lin.weight": (out, inp), "lin.bias": (out,), "emb.weight": (9, 4)}
    base = {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    models = [{k: v + 0.3 * torch.randn(*v.shape, generator=g, dtype=torch.float64) for k, v in base.items()}
              for _ in range(M)]
    grams = []
    for _ in range(M):   # each task's inputs: mostly in a few directions of its own
        x = torch.randn(20, inp, generator=g, dtype=torch.float64) * torch.rand(inp, generator=g, dtype=torch.float64)
        grams.append({"lin": x.T @ x})
    return base, models, grams


def polar(a):
    p, _, qh = np.linalg.svd(a, full_matrices=False)
    return p @ qh


def best_in_data_norm(tau, gram, k):
    """argmin over rank-k B of ‖(τ - B) C^½‖_F, by brute force: the rank-k SVD truncation of τ C^½ mapped back
    through the pseudo-inverse of C^½ (C full rank here), as triplets."""
    values, vectors = np.linalg.eigh(gram)
    root = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    u, s, vt = np.linalg.svd(tau @ root)
    truncated = u[:, :k] @ np.diag(s[:k]) @ vt[:k] @ np.linalg.inv(root)
    p, s, qt = np.linalg.svd(truncated, full_matrices=False)
    return p[:, :k], s[:k], qt[:k]


def by_hand(taus, grams, isotropic=False):
    k = min(taus[0].shape) // len(taus)
    parts = [best_in_data_norm(t, c, k) for t, c in zip(taus, grams)]
    U = polar(np.concatenate([p for p, _, _ in parts], axis=1))
    V = polar(np.concatenate([q for _, _, q in parts], axis=0))
    S = np.concatenate([s for _, s, _ in parts])
    return S.mean() * U @ V if isotropic else U @ np.diag(S) @ V


@pytest.mark.parametrize("isotropic", [False, True])
def test_data_tsv_keeps_each_tasks_best_rank_k_part_in_the_norm_of_its_inputs(isotropic):
    base, models, grams = task_states()
    merged = decomp.merge(models, method="data_tsv", base=base, grams=grams, scale=0.8, isotropic=isotropic)
    taus = [m["lin.weight"].numpy() - base["lin.weight"].numpy() for m in models]
    expected = base["lin.weight"].numpy() + 0.8 * by_hand(taus, [g["lin"].numpy() for g in grams], isotropic)
    np.testing.assert_allclose(merged["lin.weight"].numpy(), expected, rtol=1e-9, atol=1e-9)
    bias = np.mean([m["lin.bias"].numpy() - base["lin.bias"].numpy() for m in models], axis=0)
    np.testing.assert_allclose(merged["lin.bias"].numpy(), base["lin.bias"].numpy() + 0.8 * bias, atol=1e-12)


def test_with_identity_grams_it_is_tsv_and_without_a_gram_it_falls_back_to_tsv():
    base, models, _ = task_states()
    identity = [{"lin": torch.eye(6, dtype=torch.float64)} for _ in models]
    ours = decomp.merge(models, method="data_tsv", base=base, grams=identity, scale=0.5)
    theirs = decomp.merge(models, method="tsv", base=base, scale=0.5)
    for key in ("lin.weight", "emb.weight"):   # the embedding has no Gram: TSV-M's truncation, noted
        np.testing.assert_allclose(ours[key].numpy(), theirs[key].numpy(), rtol=1e-9, atol=1e-9)
    assert "no input Gram" in ours.notes["emb.weight"]


def test_directions_a_task_never_feeds_cost_it_nothing():
    # one task, k = r: its inputs span only the first two input directions, so it keeps τ's action on them exactly
    # (τ C^½ has rank 2), and what τ does to the unseen directions is dropped.
    base = {"lin.weight": torch.zeros(3, 4, dtype=torch.float64)}
    tau = torch.arange(12, dtype=torch.float64).reshape(3, 4) / 10 + torch.eye(3, 4, dtype=torch.float64)
    gram = torch.diag(torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    merged = decomp.merge([{"lin.weight": tau}], method="data_tsv", base=base, grams=[{"lin": gram}], scale=1.0)
    seen = merged["lin.weight"][:, :2]
    np.testing.assert_allclose(seen.numpy(), tau[:, :2].numpy(), atol=1e-12)
    # the kept part is U_2 U_2ᵀ τ: its rows lie in the span of τ's action on the seen inputs
    u, _, _ = np.linalg.svd(tau[:, :2].numpy(), full_matrices=False)
    np.testing.assert_allclose(merged["lin.weight"].numpy(), u @ u.T @ tau.numpy(), atol=1e-12)


def test_unchanged_weights_stay_the_base():
    base, models, grams = task_states()
    frozen = [{**m, "lin.weight": base["lin.weight"].clone()} for m in models]
    merged = decomp.merge(frozen, method="data_tsv", base=base, grams=grams, isotropic=True)
    assert torch.equal(merged["lin.weight"], base["lin.weight"])


def test_conv1d_layout_is_merged_as_its_transpose():
    base, models, grams = task_states()
    transposed = [{k: (v.T.contiguous() if k == "lin.weight" else v) for k, v in m.items()} for m in models]
    base_t = {k: (v.T.contiguous() if k == "lin.weight" else v) for k, v in base.items()}
    linear = decomp.merge(models, method="data_tsv", base=base, grams=grams)
    conv1d = decomp.merge(transposed, method="data_tsv", base=base_t, grams=grams)
    np.testing.assert_allclose(conv1d["lin.weight"].numpy(), linear["lin.weight"].numpy().T, rtol=1e-9, atol=1e-9)


def iso_cts_by_hand(taus, grams, fraction):
    """data_iso_cts's formula in numpy: the summed task matrix's top-k left/right vectors, each task's best rank-n
    part of its residual in its data norm, orthogonalised together, one mean singular value."""
    r, M = min(taus[0].shape), len(taus)
    common = int(r * fraction)
    specific = round((r - common) / M) * M
    common, n = r - specific, specific // M
    u, s, vt = np.linalg.svd(sum(taus), full_matrices=False)
    shared = u[:, :common]
    parts = [best_in_data_norm(t - shared @ shared.T @ t, c, n) for t, c in zip(taus, grams)]
    U = polar(np.concatenate([p for p, _, _ in parts] + [shared], axis=1))
    V = polar(np.concatenate([q for _, _, q in parts] + [vt[:common]], axis=0))
    return np.concatenate([sv for _, sv, _ in parts] + [s[:common]]).mean() * U @ V


@pytest.mark.parametrize("fraction", [0.5, 0.8])
def test_data_iso_cts_chooses_each_tasks_own_directions_in_the_norm_of_its_inputs(fraction):
    base, models, grams = task_states(M=2, out=9, inp=8)
    merged = decomp.merge(models, method="data_iso_cts", base=base, grams=grams, scale=1.5,
                          common_space_fraction=fraction)
    taus = [m["lin.weight"].numpy() - base["lin.weight"].numpy() for m in models]
    expected = base["lin.weight"].numpy() + 1.5 * iso_cts_by_hand(taus, [g["lin"].numpy() for g in grams], fraction)
    np.testing.assert_allclose(merged["lin.weight"].numpy(), expected, rtol=1e-9, atol=1e-9)


def test_data_iso_cts_with_identity_grams_is_iso_cts():
    base, models, _ = task_states()
    identity = [{"lin": torch.eye(6, dtype=torch.float64)} for _ in models]
    ours = decomp.merge(models, method="data_iso_cts", base=base, grams=identity, scale=0.5)
    theirs = decomp.merge(models, method="iso_cts", base=base, scale=0.5)
    for key in ("lin.weight", "emb.weight", "lin.bias"):
        np.testing.assert_allclose(ours[key].numpy(), theirs[key].numpy(), rtol=1e-9, atol=1e-9)
    assert "no input Gram" in ours.notes["emb.weight"]


def test_data_tsv_needs_grams():
    base, models, _ = task_states()
    with pytest.raises(ValueError, match="grams"):
        decomp.merge(models, method="data_tsv", base=base)


# --- the SVD methods' shared guards (tsv.py): zero task vectors, LAPACK failures -----------------------------------

@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "data_tsv", "data_iso_cts"])
def test_a_matrix_no_task_changed_keeps_the_base_and_says_so(method):
    # frozen word embeddings: decomposing zero task vectors once made LAPACK fail to converge in iso_cts
    base, models, grams = task_states()
    frozen = [{**m, "emb.weight": base["emb.weight"].clone()} for m in models]
    merged = decomp.merge(frozen, method=method, base=base, grams=grams if method.startswith("data") else None)
    assert torch.equal(merged["emb.weight"], base["emb.weight"])
    assert "every task vector is zero" in merged.notes["emb.weight"]


def test_thin_svd_falls_back_to_the_qr_iteration_driver_when_lapack_fails(monkeypatch):
    from decomp.merging.methods import tsv
    matrix = torch.randn(7, 4, dtype=torch.float32)

    def failing(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
    monkeypatch.setattr(torch.linalg, "svd", failing)
    u, s, vh = tsv.thin_svd(matrix)
    assert u.dtype == s.dtype == vh.dtype == torch.float32 and u.shape == (7, 4) and vh.shape == (4, 4)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, matrix, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, torch.from_numpy(np.linalg.svd(matrix.double().numpy(), compute_uv=False)).float())
