"""The Fisher merge's remedies for the collapse benchmarks/fisher_collapse.py explains: each model's Fisher divided
by its mean within each tensor, and the Fisher-weighted task vector scaled like task arithmetic's, against their
formulas in float64."""

import numpy as np
import pytest
import torch

import decomp
from decomp.merging import engine


def setting(M=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (5, 4), "a.bias": (5,)}
    base = {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    models = [{k: v + 0.2 * torch.randn(*v.shape, generator=g, dtype=torch.float64) for k, v in base.items()}
              for _ in range(M)]
    # one model's Fisher is tiny in one tensor and large in the other: a global mean cannot even that out
    fishers = [{k: torch.rand(*s, generator=g, dtype=torch.float64) * (1e-4 if (m, k) == (0, "a.weight") else 1.0)
                for k, s in shapes.items()} for m in range(M)]
    return base, models, fishers


def by_hand(base, models, fishers, key, scale=1.0, per_tensor=False):
    F = [f[key].numpy() / (f[key].numpy().mean() if per_tensor else 1.0) for f in fishers]
    merged = sum(f * m[key].numpy() for f, m in zip(F, models)) / sum(F)
    return base[key].numpy() + scale * (merged - base[key].numpy())


@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_fisher_per_tensor_normalisation_and_scale(scale, per_tensor):
    base, models, fishers = setting()
    merged = decomp.merge(models, method="fisher", fishers=fishers, base=base, scale=scale,
                          normalize_per_tensor=per_tensor)
    for key in base:
        np.testing.assert_allclose(merged[key].numpy(), by_hand(base, models, fishers, key, scale, per_tensor),
                                   rtol=1e-12, atol=1e-12)


def test_per_tensor_normalisation_gives_each_model_its_share_in_every_tensor():
    base, models, fishers = setting()
    raw = decomp.merge(models, method="fisher", fishers=fishers)
    even = decomp.merge(models, method="fisher", fishers=fishers, normalize_per_tensor=True)
    tau = (models[0]["a.weight"] - base["a.weight"]).flatten()
    kept = [float(((m["a.weight"] - base["a.weight"]).flatten() @ tau) / (tau @ tau)) for m in (raw, even)]
    assert kept[0] < 0.05 < 0.2 < kept[1]   # model 0's task vector: overwritten raw, kept once normalised


def test_sliced_merge_equals_the_whole_one(monkeypatch):
    base, models, fishers = setting()
    whole = decomp.merge(models, method="fisher", fishers=fishers, base=base, scale=2.0, normalize_per_tensor=True)
    monkeypatch.setattr(engine, "SLICE_ENTRIES", 7)
    sliced = decomp.merge(models, method="fisher", fishers=fishers, base=base, scale=2.0, normalize_per_tensor=True)
    for key in whole:
        assert torch.equal(whole[key], sliced[key])


def test_remedy_options_are_checked():
    base, models, fishers = setting()
    with pytest.raises(ValueError, match="exclude each other"):
        decomp.merge(models, method="fisher", fishers=fishers, normalize=True, normalize_per_tensor=True)
    with pytest.raises(ValueError, match="needs base="):
        decomp.merge(models, method="fisher", fishers=fishers, scale=2.0)
    with pytest.raises(ValueError, match="scale"):
        decomp.merge(models, method="fisher", fishers=fishers, base=base, scale=-1.0)
