"""The merge methods added to the registry (TSV-M, Iso-C, Iso-CTS, SLERP, Model Stock, Model Breadcrumbs, DELLA),
each against its published formula computed here by hand in float64 with numpy on small matrices."""

import math
import zlib

import numpy as np
import pytest
import torch

import decomp
from decomp.kernels.hashing import STREAM_DARE, hash32


def states(M=3, seed=0, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"attn.weight": (10, 12), "mlp.weight": (7, 5), "mlp.bias": (7,), "conv.weight": (3, 2, 2)}
    base = {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    models = [{k: v + 0.3 * torch.randn(*v.shape, generator=g, dtype=torch.float64) for k, v in base.items()}
              for _ in range(M)]
    return base, models


def numpy_taus(base, models, key):
    return [m[key].numpy() - base[key].numpy() for m in models]


def close(got, expected, tolerance=1e-10):
    np.testing.assert_allclose(got.numpy() if isinstance(got, torch.Tensor) else got, expected, rtol=tolerance,
                               atol=tolerance)


def polar(a):
    p, _, qh = np.linalg.svd(a, full_matrices=False)
    return p @ qh


# --- TSV-M -----------------------------------------------------------------------------------------------------------

def tsv_by_hand(taus):
    r, M = min(taus[0].shape), len(taus)
    k = r // M
    svds = [np.linalg.svd(t, full_matrices=False) for t in taus]
    U = np.concatenate([u[:, :k] for u, _, _ in svds], axis=1)
    S = np.diag(np.concatenate([s[:k] for _, s, _ in svds]))
    Vt = np.concatenate([vt[:k] for _, _, vt in svds], axis=0)
    return polar(U) @ S @ polar(Vt)


def test_tsv_merges_matrices_by_their_orthogonalised_task_singular_vectors():
    base, models = states()
    merged = decomp.merge(models, method="tsv", base=base, scale=0.7)
    for key in ("attn.weight", "mlp.weight"):   # r = 10 -> k = 3 per task; r = 5 -> k = 1
        close(merged[key], base[key].numpy() + 0.7 * tsv_by_hand(numpy_taus(base, models, key)))
    for key in ("mlp.bias", "conv.weight"):      # not matrices: the mean of the task vectors
        close(merged[key], base[key].numpy() + 0.7 * np.mean(numpy_taus(base, models, key), axis=0))


def test_tsv_of_tasks_in_orthogonal_subspaces_is_the_sum_of_their_truncations():
    # τ_m = Σ_j σ_mj a_mj b_mjᵀ with every a (and every b) orthonormal across tasks: the kept singular vectors are
    # already orthogonal, so TSV adds each task's top ⌊r/M⌋ = ⌊5/2⌋ = 2 terms (task 0 loses its third)
    rng = np.random.default_rng(3)
    A, _ = np.linalg.qr(rng.standard_normal((10, 5)))
    B, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    terms = [[(5.0, 0), (4.0, 1), (0.5, 2)], [(3.0, 3), (2.5, 4)]]
    taus = [sum(s * np.outer(A[:, j], B[:, j]) for s, j in task) for task in terms]
    kept = sum(s * np.outer(A[:, j], B[:, j]) for task in terms for s, j in task[:2])
    base = {"w": torch.zeros(10, 5, dtype=torch.float64)}
    merged = decomp.merge([{"w": torch.from_numpy(t)} for t in taus], method="tsv", base=base)
    close(merged["w"], kept)


def test_svd_methods_run_in_float32_for_float32_models():
    base, models = states()
    as32 = [{k: v.float() for k, v in m.items()} for m in models]
    merged = decomp.merge(as32, method="tsv", base={k: v.float() for k, v in base.items()})
    assert merged["attn.weight"].dtype == torch.float32
    taus = [m["attn.weight"].float().double().numpy() - base["attn.weight"].float().double().numpy() for m in models]
    expected = base["attn.weight"].float().double().numpy() + tsv_by_hand(taus)
    np.testing.assert_allclose(merged["attn.weight"].double().numpy(), expected, rtol=1e-4, atol=1e-5)


# --- Iso-C and Iso-CTS ------------------------------------------------------------------------------------------------

def test_iso_c_flattens_the_spectrum_of_the_task_arithmetic_update():
    base, models = states()
    weights = [0.5, 1.0, 2.0]
    merged = decomp.merge(models, method="iso_c", base=base, weights=weights, scale=1.3)
    for key in ("attn.weight", "mlp.weight"):
        total = sum(w * t for w, t in zip(weights, numpy_taus(base, models, key)))
        u, s, vt = np.linalg.svd(total, full_matrices=False)
        delta = (merged[key].numpy() - base[key].numpy()) / 1.3
        close(delta, s.mean() * u @ vt)
        close(np.linalg.svd(delta, compute_uv=False), np.full(min(total.shape), s.sum() / min(total.shape)))
    bias = sum(w * t for w, t in zip(weights, numpy_taus(base, models, "mlp.bias"))) / 3
    close(merged["mlp.bias"], base["mlp.bias"].numpy() + 1.3 * bias)


def iso_cts_by_hand(taus, common, per_task):
    u, s, vt = np.linalg.svd(sum(taus), full_matrices=False)
    Uc, Sc, Vc = u[:, :common], s[:common], vt[:common]
    Us, Ss, Vs = [], [], []
    for t in taus:
        outside = t - Uc @ Uc.T @ t
        ut, st, vtt = np.linalg.svd(outside, full_matrices=False)
        Us.append(ut[:, :per_task])
        Ss.append(st[:per_task])
        Vs.append(vtt[:per_task])
    mean = np.concatenate(Ss + [Sc]).mean()
    return mean * polar(np.concatenate(Us + [Uc], axis=1)) @ polar(np.concatenate(Vs + [Vc], axis=0))


@pytest.mark.parametrize("fraction,sizes", [
    (0.8, {"attn.weight": (7, 1), "mlp.weight": (5, 0)}),   # r=10: ⌊8⌋, round(2/3)·3 = 3 -> 7 + 3·1
    (0.5, {"attn.weight": (4, 2), "mlp.weight": (2, 1)}),   # r=10: 5, round(5/3)·3 = 6 -> 4 + 3·2; r=5: 2 + 3·1
])
def test_iso_cts_adds_task_specific_directions_outside_the_common_subspace(fraction, sizes):
    base, models = states()
    merged = decomp.merge(models, method="iso_cts", base=base, common_space_fraction=fraction)
    for key, (common, per_task) in sizes.items():
        close(merged[key], base[key].numpy() + iso_cts_by_hand(numpy_taus(base, models, key), common, per_task))
    close(merged["conv.weight"], base["conv.weight"].numpy() + np.mean(numpy_taus(base, models, "conv.weight"), 0))
    everything_common = decomp.merge(models, method="iso_cts", base=base, common_space_fraction=1.0)
    iso_c = decomp.merge(models, method="iso_c", base=base)
    for key in base:
        close(everything_common[key], iso_c[key].numpy())


# --- SLERP -----------------------------------------------------------------------------------------------------------

def slerp_by_hand(t, a, b):
    a, b = a.ravel(), b.ravel()
    cos = np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    omega = np.arccos(cos)
    return np.sin((1 - t) * omega) / np.sin(omega) * a + np.sin(t * omega) / np.sin(omega) * b


def test_slerp_interpolates_on_the_sphere_and_falls_back_to_lerp_when_colinear():
    _, models = states(M=2)
    merged = decomp.merge(models, method="slerp", t=0.3)
    for key in models[0]:
        close(merged[key], slerp_by_hand(0.3, models[0][key].numpy(), models[1][key].numpy()).reshape(
            models[0][key].shape))
    ends = [decomp.merge(models, method="slerp", t=t) for t in (0.0, 1.0)]
    for key in models[0]:
        close(ends[0][key], models[0][key].numpy())
        close(ends[1][key], models[1][key].numpy())
    colinear = [{"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)},
                {"w": torch.tensor([2.0, 4.0, 6.0 + 1e-6], dtype=torch.float64)}]
    close(decomp.merge(colinear, method="slerp", t=0.25)["w"], 0.75 * colinear[0]["w"].numpy() +
          0.25 * colinear[1]["w"].numpy())
    with pytest.raises(ValueError, match="exactly two models"):
        decomp.merge(models * 2, method="slerp")
    with pytest.raises(ValueError, match="takes no per-model weights"):
        decomp.merge(models, method="slerp", weights=[1, 2])
    with pytest.raises(ValueError, match="t must be a number in \\[0, 1\\]; got 1.5"):
        decomp.merge(models, method="slerp", t=1.5)


# --- Model Stock -----------------------------------------------------------------------------------------------------

def model_stock_by_hand(base, tuned, filter_wise=False):
    shape = base.shape
    rows = (lambda x: x.reshape(1, -1) if x.ndim < 2 else x) if filter_wise else (lambda x: x.reshape(1, -1))
    w0, ws = rows(base), [rows(w) for w in tuned]
    offsets = [w - w0 for w in ws]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = (offsets[i] * offsets[j]).sum(-1)
            cos.append(np.clip(dot / np.maximum(np.linalg.norm(offsets[i], axis=-1) *
                                                np.linalg.norm(offsets[j], axis=-1), 1e-6), -1, 1))
    c = np.mean(cos, axis=0)[..., None]
    N = len(ws)
    t = N * c / (1 + (N - 1) * c)
    return (t * np.mean(ws, axis=0) + (1 - t) * w0).reshape(shape)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_pulls_the_average_towards_the_base_by_the_angle(filter_wise):
    base, models = states()
    merged = decomp.merge(models, method="model_stock", base=base, filter_wise=filter_wise)
    for key in base:
        close(merged[key], model_stock_by_hand(base[key].numpy(), [m[key].numpy() for m in models], filter_wise))
    # two fine-tuned models: the paper's t = 2 cos θ / (1 + cos θ)
    a, b = models[0]["mlp.bias"].numpy() - base["mlp.bias"].numpy(), models[1]["mlp.bias"].numpy() - \
        base["mlp.bias"].numpy()
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    t = 2 * cos / (1 + cos)
    pair = decomp.merge(models[:2], method="model_stock", base=base)
    close(pair["mlp.bias"], base["mlp.bias"].numpy() + t * (a + b) / 2)
    with pytest.raises(ValueError, match="at least two fine-tuned models"):
        decomp.merge(models[:1], method="model_stock", base=base)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_leaves_a_tensor_no_task_changed_at_the_base(filter_wise):
    g = torch.Generator().manual_seed(9)
    base = {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in (("frozen", (30, 4)), ("w", (5, 3)))}
    models = [{"frozen": base["frozen"].clone(), "w": base["w"] + torch.randn(5, 3, generator=g, dtype=torch.float64)}
              for _ in range(3)]
    merged = decomp.merge(models, method="model_stock", base=base, filter_wise=filter_wise)
    assert torch.equal(merged["frozen"], base["frozen"])
    close(merged["w"], model_stock_by_hand(base["w"].numpy(), [m["w"].numpy() for m in models], filter_wise))


# --- Model Breadcrumbs ------------------------------------------------------------------------------------------------

def test_breadcrumbs_drops_the_largest_and_the_smallest_entries_then_adds():
    g = torch.Generator().manual_seed(7)
    base = {"w": torch.randn(10, 10, generator=g, dtype=torch.float64)}
    models = [{"w": base["w"] + torch.randn(10, 10, generator=g, dtype=torch.float64)} for _ in range(2)]
    merged = decomp.merge(models, method="breadcrumbs", base=base, density=0.8, gamma=0.05, weights=[1.0, 0.5],
                          scale=0.9)
    expected = base["w"].numpy().copy()
    for w, model in zip([1.0, 0.5], models):
        tau = (model["w"] - base["w"]).numpy()
        order = np.argsort(np.abs(tau).ravel())           # ascending magnitude
        keep = np.zeros(100, bool)
        keep[order[15:95]] = True                          # bottom 100 - 80 - 5 = 15 and top 5 removed
        expected += 0.9 * w * np.where(keep.reshape(10, 10), tau, 0.0)
    close(merged["w"], expected)
    # gamma beyond 1 - density: fewer top entries go (10 instead of 20) and no bottom ones
    wide = decomp.merge(models[:1], method="breadcrumbs", base=base, density=0.9, gamma=0.2)
    tau = (models[0]["w"] - base["w"]).numpy()
    kept = np.argsort(np.abs(tau).ravel())[:90]
    expected = np.zeros(100)
    expected[kept] = tau.ravel()[kept]
    close(wide["w"], base["w"].numpy() + expected.reshape(10, 10))
    everything = decomp.merge(models, method="breadcrumbs", base=base, density=1.0)
    arithmetic = decomp.merge(models, method="task_arithmetic", base=base)
    close(everything["w"], arithmetic["w"].numpy())


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_leaves_a_tensor_no_task_changed_at_the_base_without_ranking_it(method, monkeypatch):
    from decomp.merging.methods import breadcrumbs
    g = torch.Generator().manual_seed(8)
    base = {"frozen": torch.randn(40, 3, generator=g, dtype=torch.float64), "w": torch.randn(6, generator=g)}
    models = [{"frozen": base["frozen"].clone(), "w": base["w"] + 1.0 + m} for m in range(3)]
    ranked = []
    real = breadcrumbs.breadcrumbs_mask
    monkeypatch.setattr(breadcrumbs, "breadcrumbs_mask", lambda t, *a: ranked.append(t.shape) or real(t, *a))
    merged = decomp.merge(models, method=method, base=base, scale=0.7)
    assert torch.equal(merged["frozen"], base["frozen"])
    assert ranked == [(6,)] * 3     # the changed tensor's three task vectors only


# --- DELLA -----------------------------------------------------------------------------------------------------------

def uniforms_by_hand(seed, model_index, key, shape):
    """The counter-based hash of (seed, model, tensor, entry) mapped to (0, 1), as DARE draws it."""
    row = torch.tensor((zlib.crc32(key.encode()) ^ (model_index * 0x9E3779B1)) & 0xFFFFFFFF)
    bits = hash32(seed, STREAM_DARE, row, torch.arange(math.prod(shape), dtype=torch.int64))
    return (((bits >> 8).double().numpy() + 0.5) / 2 ** 24).reshape(shape)


def della_by_hand(base, models, key, density, epsilon, seed, weights, scale):
    dropped = []
    for m, model in enumerate(models):
        tau = model[key].numpy() - base[key].numpy()
        rows = tau.reshape(1, -1) if tau.ndim < 2 else tau.reshape(tau.shape[0], -1)
        ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
        p = (density - epsilon + 2 * epsilon * ranks / (rows.shape[1] - 1)).reshape(tau.shape)
        survives = uniforms_by_hand(seed, m, key, tau.shape) < p
        dropped.append(weights[m] * np.where(survives, tau / p, 0.0))
    stacked = np.stack(dropped)
    sign = np.sign(stacked.sum(0))
    agree = (np.sign(stacked) == sign) & (stacked != 0)
    weight_sum = (agree * np.array(weights).reshape(-1, *([1] * tau.ndim))).sum(0)
    mean = np.where(weight_sum > 0, (stacked * agree).sum(0) / np.maximum(weight_sum, 1e-300), 0.0)
    return base[key].numpy() + scale * mean


def test_della_drops_by_magnitude_rank_rescales_and_elects_signs():
    base, models = states()
    merged = decomp.merge(models, method="della", base=base, density=0.6, epsilon=0.2, seed=4, weights=[1, 2, 1],
                          scale=0.8)
    for key in base:
        close(merged[key], della_by_hand(base, models, key, 0.6, 0.2, 4, [1.0, 2.0, 1.0], 0.8))
    again = decomp.merge(models, method="della", base=base, density=0.6, epsilon=0.2, seed=4, weights=[1, 2, 1],
                         scale=0.8)
    assert all(torch.equal(merged[k], again[k]) for k in base)
    with pytest.raises(ValueError, match="density ± epsilon must lie in \\(0, 1\\]"):
        decomp.merge(models, method="della", base=base, density=0.9, epsilon=0.2)


def test_della_keeps_large_entries_more_often_and_is_unbiased():
    n = 4000
    base = {"w": torch.zeros(n, dtype=torch.float64)}
    tuned = {"w": torch.linspace(0.5, 1.5, n, dtype=torch.float64)}   # magnitude rank = position
    runs = torch.stack([decomp.merge([tuned], method="della", base=base, density=0.5, epsilon=0.3, seed=s)["w"]
                        for s in range(20)])
    kept = (runs != 0).double()
    assert abs(float(kept[:, :400].mean()) - 0.23) < 0.03 and abs(float(kept[:, -400:].mean()) - 0.77) < 0.03
    # E[τ̃] = τ: each entry kept with p and divided by p
    assert abs(float(runs.mean()) - float(tuned["w"].mean())) < 0.02


def test_every_new_method_is_listed_with_its_parameters():
    methods = decomp.merging.merge_methods()
    assert methods["tsv"].defaults() == {"scale": 1.0} and methods["iso_c"].defaults() == {"scale": 1.0}
    assert methods["iso_cts"].defaults() == {"scale": 1.0, "common_space_fraction": 0.8}
    assert methods["slerp"].defaults() == {"t": 0.5} and methods["model_stock"].defaults() == {"filter_wise": False}
    assert methods["breadcrumbs"].defaults() == {"density": 0.9, "gamma": 0.01, "scale": 1.0}
    assert methods["della"].defaults() == {"density": 0.7, "epsilon": 0.07, "seed": 0, "scale": 1.0, "normalize": True}
    assert methods["della_linear"].defaults() == {"density": 0.7, "epsilon": 0.07, "seed": 0, "scale": 1.0}
    assert methods["breadcrumbs_ties"].defaults() == {"density": 0.9, "gamma": 0.01, "scale": 1.0, "normalize": True}
    for name in ("tsv", "iso_c", "iso_cts", "model_stock", "breadcrumbs", "della"):
        assert methods[name].needs == ("base",), name
    assert methods["slerp"].needs == () and not methods["slerp"].weighted
