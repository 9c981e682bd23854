"""PCA, ICA and k-means of gradient features: planted structure, alignment, parameter directions."""

import numpy as np
import pytest
import torch

import decomp
from models import float64_copy, padded_batch, per_example_grads, tiny


def planted(N=600, K=40, noise=0.05, seed=0):
    """Four independent non-Gaussian sources mixed into K features, plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(3, N, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    sources = torch.stack([
        -torch.sign(u[0] - 0.5) * torch.log1p(-2 * (u[0] - 0.5).abs()),   # Laplace
        u[1] * 2 - 1,                                                        # uniform
        -torch.log(u[2]) - 1,                                                # centred exponential
        torch.sign(torch.randn(N, generator=g, dtype=torch.float64)) * (1 + 0.1 * torch.randn(N, generator=g)),
    ], 1).float()
    sources = (sources - sources.mean(0)) / sources.std(0)
    mixing = torch.randn(K, 4, generator=g)
    return sources, sources @ mixing.T + noise * torch.randn(N, K, generator=g)


def test_pca_finds_the_planted_rank_with_every_method(tmp_path):
    torch.manual_seed(0)
    _, x = planted()
    exact = decomp.pca(x, 8, method="exact")
    assert exact.explained_variance[4] < 0.01 * exact.explained_variance[3]
    assert exact.components_for(0.99) == 4 and 3 < exact.effective_rank() <= 4
    for method in ("randomized", "streaming"):
        other = decomp.pca(x, 4, method=method)
        torch.testing.assert_close(other.explained_variance, exact.explained_variance[:4], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(other.loadings, exact.loadings[:, :4], rtol=1e-3, atol=1e-3)
    # the streaming path reads a store directory chunk by chunk
    sketch = decomp.GradientSketch(x.float(), torch.arange(600), None, None, [], {"output": "logprob"})
    from_store = decomp.pca(sketch.save(tmp_path / "store"), 4)
    assert from_store.meta["method"] == "streaming"
    torch.testing.assert_close(from_store.loadings, exact.loadings[:, :4], rtol=1e-3, atol=1e-3)
    centred = x.double() - x.double().mean(0)
    reconstructed = exact.loadings.double() @ exact.mixing.double().T
    # what 8 components leave is the noise in the other 32 dimensions
    assert float((centred - reconstructed).norm()) < 1.1 * 0.05 * (600 * 32) ** 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ica_recovers_every_planted_source_whatever_the_seed(seed):
    torch.manual_seed(0)
    sources, x = planted()
    found = decomp.ica(x, 4, seed=seed)
    correlation = np.corrcoef(sources.T.numpy(), found.loadings.T.numpy())[:4, 4:]
    assert (np.abs(correlation).max(1) >= 0.9).all(), correlation
    again = decomp.ica(x, 4, seed=seed)
    assert torch.equal(found.loadings, again.loadings)


def test_alignment_metrics_and_top_examples():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    centres = 4 * torch.randn(3, 10, generator=g)
    x = centres[labels] + torch.randn(300, 10, generator=g)
    clusters = decomp.cluster(x, 3, seed=0)
    aligned = clusters.align(labels, k=30)
    shuffled = clusters.align(labels[torch.randperm(300, generator=g)], k=30)
    assert aligned.ami > 0.9 and abs(shuffled.ami) < 0.05
    assert min(aligned.best_purity().values()) == 1.0 and aligned.table.shape == (3, 3)
    components = decomp.pca(x, 2)
    alignment = components.align(np.array(["a", "b", "c"])[labels.numpy()], k=20)
    assert len(alignment.purity) == 4 and alignment.table.sum() == 80 and "NMI" in alignment.to_markdown()
    top = components.top_examples(0, 5)
    assert torch.equal(top, torch.argsort(components.loadings[:, 0], descending=True)[:5])


def test_prepare_flips_by_class_and_normalizes():
    x = torch.tensor([[1.0, 2.0], [3.0, -4.0], [0.0, 0.0]])
    prepared = decomp.prepare(x, sign_by=torch.tensor([0, 1, 1]), normalize=True)
    torch.testing.assert_close(prepared, torch.tensor([[1.0, 2.0], [-3.0, 4.0], [0.0, 0.0]]) /
                               torch.tensor([[5 ** 0.5], [5.0], [1.0]]))
    projected = decomp.prepare(x, project_out=torch.tensor([1.0, 0.0]))
    assert torch.equal(projected[:, 0], torch.zeros(3))
    with pytest.raises(ValueError, match="two values"):
        decomp.prepare(x, sign_by=torch.tensor([0, 1, 2]))


def test_bad_input_gives_clear_errors():
    x = torch.randn(10, 5)
    with pytest.raises(ValueError, match="n_components must be at most min"):
        decomp.pca(x, 6)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite features \\(first in row 3\\)"):
        decomp.ica(bad, 2)
    with pytest.raises(ValueError, match="labels must be \\[N\\] = \\[10\\]"):
        decomp.pca(x, 2).align(torch.zeros(9))
    with pytest.raises(ValueError, match="k must be an int"):
        decomp.cluster(x, 1)


def test_save_load_roundtrip(tmp_path):
    _, x = planted(N=100)
    found = decomp.ica(x, 3, seed=0)
    loaded = decomp.Components.load(found.save(tmp_path / "ica.safetensors"))
    assert loaded.kind == "ica" and torch.equal(loaded.loadings, found.loadings)
    assert loaded.meta["seed"] == 0


def autograd_matrix(model, batch):
    """[N, P] per-example gradients (float64) of log p(gold), every parameter, and the parameter names."""
    model64 = float64_copy(model)
    rows = []
    for n in range(batch["input_ids"].shape[0]):
        (_, grads), = per_example_grads(model64, batch, n, kind="empirical")
        rows.append(torch.cat([g.reshape(-1) for g in grads.values()]))
    return torch.stack(rows), list(grads)


def test_parameter_directions_and_component_fishers_equal_autograd():
    model = tiny("bert")
    batch = padded_batch("bert", [5, 3, 7, 1, 4, 6])
    sketch = decomp.sketch_gradients(model, [batch], progress=False, k_out=4, k_in=4, k_vector=64)
    full = decomp.pca(sketch, 6, center=False)
    directions = full.parameter_directions(model, [batch], unit=True, progress=False)
    grads, names = autograd_matrix(model, batch)
    unit = full.loadings.double() / full.loadings.double().norm(dim=0)
    expected = unit.T @ grads                                    # [r, P]: sum_n u_cn g_n
    got = torch.stack([torch.cat([d[name].reshape(-1).double() for name in names]) for d in directions])
    assert float((got - expected).norm() / expected.norm()) < 1e-5
    fishers = decomp.component_fishers(directions, 6)
    fisher = decomp.compute_fisher(model, [batch], kind="empirical", progress=False)
    for name in names:
        total = sum(f[name].double() for f in fishers)
        assert float((total - fisher[name].double()).norm()) <= 1e-4 * float(fisher[name].norm()) + 1e-12, name
    signed = decomp.pca(decomp.prepare(sketch, sign_by="labels", normalize=True), 2)
    flipped = signed.parameter_directions(model, [batch], progress=False)
    scale = signed.meta["example_scale"].double()
    expected = (signed.loadings.double() * scale[:, None]).T @ grads
    got = torch.stack([torch.cat([d[name].reshape(-1).double() for name in names]) for d in flipped])
    assert float((got - expected).norm() / expected.norm()) < 1e-5


def test_sketched_pca_spans_the_exact_gradient_subspace():
    model = tiny("bert")
    lengths = [int(x) for x in torch.randint(2, 9, (24,), generator=torch.Generator().manual_seed(0))]
    batch = padded_batch("bert", lengths)
    grads, _ = autograd_matrix(model, batch)
    sketch = decomp.sketch_gradients(model, [batch], progress=False, k_out=16, k_in=16, k_vector=2048)
    gram = grads @ grads.T
    sketched = sketch.features.double() @ sketch.features.double().T
    gram_error = float(torch.linalg.matrix_norm(sketched - gram, ord=2))
    r = 2
    exact = torch.linalg.eigh(gram)
    U = exact.eigenvectors[:, -r:]
    gap = float(exact.eigenvalues[-r] - exact.eigenvalues[-r - 1])
    V = decomp.pca(sketch, r, center=False).loadings.double()
    V = V / V.norm(dim=0)
    sin_max = float(torch.linalg.matrix_norm(V - U @ (U.T @ V), ord=2))
    # Davis-Kahan: the subspace moves by at most the Gram error over the eigengap, and that error is the
    # sketch's: a JL sketch of K rows distorts inner products by ~ sqrt(2 / K) of the norms involved
    predicted = 2 * (2 / sketch.features.shape[1]) ** 0.5 * float(torch.diagonal(gram).sum())
    assert gram_error <= predicted
    assert sin_max <= min(1.0, 2 * gram_error / gap) + 1e-9


def test_plots_and_top_example_tables(tmp_path):
    from decomp.analysis.plots import plot_alignment, plot_spectrum, top_examples_markdown
    sources, x = planted(N=120)
    components = decomp.pca(x, 4)
    labels = (sources[:, 0] > 0).long()
    spectrum = plot_spectrum(components, tmp_path / "spectrum.png")
    heatmap = plot_alignment(components.align(labels, k=10), tmp_path / "alignment.png")
    for path in (spectrum, heatmap):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
    table = top_examples_markdown(components, [f"example {i}" for i in range(120)], labels=labels.tolist(), k=2)
    assert table.count("\n") == 2 + 4 * 2 * 2


def test_components_of_a_model_trained_on_two_tasks_align_with_the_tasks():
    """Task A: tokens 1..29, labels {0, 1} = token 5 present; task B: tokens 30..60, labels {2, 3} = first token
    even (two heads' worth of classes in one classifier, as in multi-task training)."""
    g = torch.Generator().manual_seed(0)
    model = tiny("bert", num_labels=4)
    N, T = 96, 8
    task = torch.arange(N) % 2
    ids = torch.where(task[:, None] == 0, torch.randint(1, 30, (N, T), generator=g),
                      torch.randint(30, 61, (N, T), generator=g))
    labels = torch.where(task == 0, (ids == 5).any(1).long(), 2 + (ids[:, 0] % 2 == 0).long())
    batch = {"input_ids": ids, "attention_mask": torch.ones(N, T, dtype=torch.long), "labels": labels,
             "token_type_ids": torch.zeros(N, T, dtype=torch.long)}
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    sketch = decomp.sketch_gradients(model, [batch], output="predicted", progress=False, k_out=4, k_in=4, k_vector=256)
    prepared = decomp.prepare(sketch, normalize=True)
    clusters = decomp.cluster(prepared, 2, whiten=2, seed=0)
    aligned = clusters.align(task).ami
    shuffled = clusters.align(task[torch.randperm(N, generator=g)]).ami
    assert aligned > 0.5 and aligned > shuffled + 0.4, (aligned, shuffled)
    assert decomp.ica(prepared, 4, seed=0).align(task).ami > 0.4


def test_components_save_never_replaces_what_decomp_did_not_write(tmp_path):
    """An existing file is refused; decomp's own components are replaced only with overwrite=True."""
    features = torch.randn(12, 6, generator=torch.Generator().manual_seed(0))
    components = decomp.pca(features, 2)
    foreign = tmp_path / "notes.safetensors"
    foreign.write_text("my notes")
    with pytest.raises(FileExistsError, match="not a decomp components file"):
        components.save(foreign, overwrite=True)
    assert foreign.read_text() == "my notes"
    path = components.save(tmp_path / "c.safetensors")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        decomp.pca(features, 3).save(path)
    assert decomp.Components.load(path).n_components == 2
    decomp.pca(features, 3).save(path, overwrite=True)
    assert decomp.Components.load(path).n_components == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "notes.safetensors"]
