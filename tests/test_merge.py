"""Merging: every method against its published formula, computed by hand in float64 on small state dicts."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import decomp
from decomp.merging.methods.ties import dare_mask


def states(M=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"encoder.dense.weight": (6, 5), "encoder.dense.bias": (6,), "norm.weight": (5,)}
    base = {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    models = [{k: v + 0.3 * torch.randn(*v.shape, generator=g, dtype=torch.float64) for k, v in base.items()}
              for _ in range(M)]
    for model in models + [base]:
        model["encoder.position_ids"] = torch.arange(7)
    return base, models


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_average_and_task_arithmetic():
    base, models = states()
    weights = [0.2, 0.3, 0.5]
    merged = decomp.merge(models, method="average", weights=weights)
    for key in base:
        if key == "encoder.position_ids":
            assert torch.equal(merged[key], base[key])
            continue
        close(merged[key], sum(w * m[key] for w, m in zip(weights, models)) / sum(weights))
        arithmetic = decomp.merge(models, method="task_arithmetic", base=base, weights=weights, scale=0.7)
        close(arithmetic[key], base[key] + 0.7 * sum(w * (m[key] - base[key]) for w, m in zip(weights, models)))


def by_hand_ties(base, models, density, per_tensor):
    keys = [k for k in base if k != "encoder.position_ids"]
    taus = [{k: m[k] - base[k] for k in keys} for m in models]
    trimmed = []
    for tau in taus:
        if per_tensor:
            kept = {}
            for k, t in tau.items():
                k_keep = max(1, round(density * t.numel()))
                cut = t.abs().flatten().sort(descending=True).values[k_keep - 1]
                kept[k] = torch.where(t.abs() >= cut, t, 0.0)
        else:
            flat = torch.cat([t.flatten() for t in tau.values()])
            cut = flat.abs().sort(descending=True).values[round(density * flat.numel()) - 1]
            kept = {k: torch.where(t.abs() >= cut, t, 0.0) for k, t in tau.items()}
        trimmed.append(kept)
    out = {}
    for k in keys:
        stack = torch.stack([t[k] for t in trimmed])
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        count = agree.sum(0)
        out[k] = base[k] + torch.where(count > 0, (stack * agree).sum(0) / count.clamp(min=1), 0.0)
    return out


@pytest.mark.parametrize("trim", ["global", "per_tensor"])
def test_ties_matches_the_paper_and_the_trims_differ(trim):
    base, models = states()
    merged = decomp.merge(models, method="ties", base=base, density=0.3, trim=trim)
    expected = by_hand_ties(base, models, 0.3, per_tensor=trim == "per_tensor")
    for key, value in expected.items():
        close(merged[key], value)
    other = decomp.merge(models, method="ties", base=base, density=0.3,
                         trim="per_tensor" if trim == "global" else "global")
    assert any(not torch.equal(merged[k], other[k]) for k in expected)


def test_global_trim_threshold_is_exact_on_a_large_task_vector():
    g = torch.Generator().manual_seed(1)
    base = {"a": torch.zeros(300, 200, dtype=torch.float64), "b": torch.zeros(5000, dtype=torch.float64)}
    model = {"a": torch.randn(300, 200, generator=g, dtype=torch.float64) ** 3,
             "b": torch.randn(5000, generator=g, dtype=torch.float64)}
    merged = decomp.merge([model], method="ties", base=base, density=0.05)
    kept = sum(int((merged[k] != 0).sum()) for k in merged)
    assert kept == round(0.05 * 65000)


def test_dare_is_seeded_and_unbiased():
    base, models = states(M=1)
    key = "encoder.dense.weight"
    one = decomp.merge(models, method="dare", base=base, density=0.4, seed=3)
    two = decomp.merge(models, method="dare", base=base, density=0.4, seed=3)
    assert torch.equal(one[key], two[key])
    mask = dare_mask(3, 0, key, (6, 5), 0.4)
    close(one[key], base[key] + (models[0][key] - base[key]) * mask / 0.4)
    big = {"w": torch.zeros(200_000, dtype=torch.float64)}
    tuned = {"w": torch.ones(200_000, dtype=torch.float64)}
    means = [float(decomp.merge([tuned], method="dare", base=big, density=0.25, seed=s)["w"].mean()) for s in range(5)]
    # each entry is 4 with probability 1/4: the mean of 200k has standard deviation sqrt(3)/sqrt(200k) ~ 0.004
    assert all(abs(m - 1.0) < 0.02 for m in means)
    ties = decomp.merge(models * 2, method="dare_ties", base=base, density=0.4, seed=3)
    masks = [dare_mask(3, m, key, (6, 5), 0.4) for m in range(2)]
    taus = torch.stack([(models[0][key] - base[key]) * mk / 0.4 for mk in masks])
    sign = torch.sign(taus.sum(0))
    agree = (torch.sign(taus) == sign) & (taus != 0)
    close(ties[key], base[key] + torch.where(agree.sum(0) > 0, (taus * agree).sum(0) / agree.sum(0).clamp(min=1), 0.0))


def test_fisher_merge_formula_floor_normalize_and_favor():
    base, models = states()
    g = torch.Generator().manual_seed(5)
    fishers = [{k: torch.rand(*v.shape, generator=g, dtype=torch.float64) for k, v in base.items()
                if k != "encoder.position_ids"} for _ in models]
    key = "encoder.dense.weight"
    merged = decomp.merge(models, method="fisher", fishers=fishers, weights=[1, 2, 3])
    w = [1, 2, 3]
    close(merged[key], sum(wi * f[key] * m[key] for wi, f, m in zip(w, fishers, models)) /
          sum(wi * f[key] for wi, f in zip(w, fishers)))
    equal = decomp.merge(models, method="fisher", fishers=[fishers[0]] * 3, weights=w)
    plain = decomp.merge(models, method="average", weights=w)
    close(equal[key], plain[key])
    partial = [{k: v for k, v in f.items() if k != "norm.weight"} for f in fishers]
    averaged = decomp.merge(models, method="fisher", fishers=partial)
    close(averaged["norm.weight"], sum(m["norm.weight"] for m in models) / 3)
    assert averaged.notes["norm.weight"] == "averaged: not in every model's Fisher"
    zeros = [{k: torch.zeros_like(v) for k, v in f.items()} for f in fishers]
    floored = decomp.merge(models, method="fisher", fishers=zeros, floor=1e-3)
    close(floored[key], decomp.merge(models, method="average")[key])
    relative = decomp.merge(models, method="fisher", fishers=fishers, floor_relative=0.5)
    means = [sum(float(t.sum()) for t in f.values()) / sum(t.numel() for t in f.values()) for f in fishers]
    clamped = [f[key].clamp(min=0.5 * mean) for f, mean in zip(fishers, means)]
    close(relative[key], sum(c * m[key] for c, m in zip(clamped, models)) / sum(clamped))
    normalized = decomp.merge(models, method="fisher", fishers=fishers, normalize=True)
    scaled = [f[key] / mean for f, mean in zip(fishers, means)]
    close(normalized[key], sum(s * m[key] for s, m in zip(scaled, models)) / sum(scaled))
    favored = decomp.merge(models, method="fisher", fishers=fishers, favor=1, favor_weight=0.8)
    fw = [0.1, 0.8, 0.1]
    close(favored[key], sum(wi * f[key] * m[key] for wi, f, m in zip(fw, fishers, models)) /
          sum(wi * f[key] for wi, f in zip(fw, fishers)))


def test_regmean_is_the_least_squares_solution_on_concatenated_inputs():
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(40, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    weights = [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    models = [{"layer.weight": w, "layer.bias": torch.randn(6, generator=g, dtype=torch.float64)} for w in weights]
    grams = [{"layer": x.T @ x} for x in inputs]
    merged = decomp.merge(models, method="regmean", grams=grams, alpha=1.0)
    X = torch.cat(inputs)
    Y = torch.cat([x @ w.T for x, w in zip(inputs, weights)])
    solution = torch.linalg.lstsq(X, Y).solution.T                 # [out, in]
    torch.testing.assert_close(merged["layer.weight"], solution, rtol=1e-9, atol=1e-9)
    close(merged["layer.bias"], (models[0]["layer.bias"] + models[1]["layer.bias"]) / 2)
    shrunk = decomp.merge(models, method="regmean", grams=grams, alpha=0.0)   # diagonal Grams only
    diagonal = [torch.diag(torch.diagonal(x.T @ x)) for x in inputs]
    expected = torch.linalg.solve(sum(diagonal), sum(d @ w.T for d, w in zip(diagonal, weights))).T
    torch.testing.assert_close(shrunk["layer.weight"], expected, rtol=1e-9, atol=1e-9)


def test_merging_a_model_with_itself_returns_it():
    base, models = states(M=1)
    for method, extra in (("average", {}), ("task_arithmetic", {"base": base}), ("ties", {"base": base}),
                          ("fisher", {"fishers": [{k: torch.ones_like(v) for k, v in base.items()
                                                   if k != "encoder.position_ids"}] * 2})):
        merged = decomp.merge(models * 2, method=method, weights=[0.5, 0.5] if method == "task_arithmetic" else None,
                              **extra)
        for key in base:
            if method == "ties" and key != "encoder.position_ids":
                continue   # TIES trims: itself only where kept
            torch.testing.assert_close(merged[key], models[0][key])


def test_mismatched_inputs_fail_before_any_work_and_heads_are_explicit():
    base, models = states()
    other = dict(models[1])
    other["extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match="'extra.weight' is only in model 1"):
        decomp.merge([models[0], other], method="average")
    reshaped = dict(models[1])
    reshaped["encoder.dense.bias"] = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="'encoder.dense.bias' has different shapes"):
        decomp.merge([models[0], reshaped], method="average")
    kept = decomp.merge([models[0], reshaped], method="average", heads="per_task")
    assert "encoder.dense.bias" not in kept and kept.heads[1]["encoder.dense.bias"].shape == (4,)
    taken = decomp.merge([models[0], reshaped], method="average", heads=1)
    assert taken["encoder.dense.bias"].shape == (4,)
    with pytest.raises(ValueError, match="pass base="):
        decomp.merge(models, method="ties")
    with pytest.raises(ValueError, match="unknown \\['densty'\\]"):
        decomp.merge(models, method="ties", base=base, densty=0.2)
    with pytest.raises(ValueError, match="needs fishers="):
        decomp.merge(models, method="fisher")
    buffers = dict(models[1])
    buffers["encoder.position_ids"] = torch.arange(7) + 1
    with pytest.raises(ValueError, match="integer tensor 'encoder.position_ids' differs"):
        decomp.merge([models[0], buffers], method="average")


def test_saved_merge_loads_with_from_pretrained_and_runs(tmp_path):
    from transformers import AutoModel, BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=20)
    base = BertModel(config)
    tuned = [BertModel(config) for _ in range(2)]
    for i, model in enumerate(tuned):
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (i + 1) * torch.randn_like(p))
        model.save_pretrained(tmp_path / f"tuned{i}")
    base.save_pretrained(tmp_path / "base")
    paths = [tmp_path / "tuned0", tmp_path / "tuned1"]
    merged = decomp.merge(paths, method="ties", base=tmp_path / "base", density=0.5)
    out = decomp.save_merged(merged, tmp_path / "out", like=base, inputs=paths)
    loaded = AutoModel.from_pretrained(out)
    for key, value in merged.items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    hidden = loaded(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
    assert hidden.shape == (1, 3, 16) and bool(torch.isfinite(hidden).all())
    card = (out / "README.md").read_text()
    assert '"method": "ties"' in card and "sha256" in card
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent("""
        method: task_arithmetic
        base: base
        models:
          - path: tuned0
            weight: 0.5
          - path: tuned1
            weight: 0.5
        parameters: {scale: 1.0}
    """))
    from_recipe = decomp.merge_recipe(recipe, tmp_path / "from-recipe")
    assert (tmp_path / "from-recipe" / "config.json").exists()
    by_call = decomp.merge(paths, method="task_arithmetic", base=tmp_path / "base", weights=[0.5, 0.5])
    assert all(torch.equal(from_recipe[k], by_call[k]) for k in by_call)


def test_a_failed_merge_writes_nothing(tmp_path):
    from transformers import BertConfig, BertModel
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=24, max_position_embeddings=20))
    state = model.state_dict()
    broken = dict(state)
    broken["pooler.dense.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="'pooler.dense.weight' has different shapes"):
        decomp.merge([state, broken], method="average")
    partial = {k: v for k, v in state.items() if not k.startswith("pooler")}
    with pytest.raises(ValueError, match="lacks 2 tensors"):
        decomp.save_merged(partial, tmp_path / "out", like=model)
    assert not list(tmp_path.iterdir())


def test_collect_grams_matches_the_inputs_of_each_linear_layer():
    from models import padded_batch, tiny
    model = tiny("bert")
    batch = padded_batch("bert", [5, 3, 7, 1])
    grams = decomp.collect_grams(model, [batch], progress=False)
    captured = {}
    def keep(name):
        def hook(module, args, output):
            captured[name] = args[0].double()   # returns None: the output stays as it is
        return hook
    handle = model.classifier.register_forward_hook(keep("x"))
    handle2 = model.bert.encoder.layer[0].attention.self.query.register_forward_hook(keep("q"))
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    handle.remove()
    handle2.remove()
    torch.testing.assert_close(grams["classifier"], captured["x"].T @ captured["x"])
    real = captured["q"][batch["attention_mask"].bool()]
    torch.testing.assert_close(grams["bert.encoder.layer.0.attention.self.query"], real.T @ real)


def test_submodel_projects_onto_the_chosen_directions():
    base, models = states(M=1)
    keys = [k for k in base if k != "encoder.position_ids"]
    g = torch.Generator().manual_seed(9)
    directions = [{k: torch.randn(*base[k].shape, generator=g, dtype=torch.float64) for k in keys} for _ in range(3)]
    result = decomp.submodel(base, models[0], directions, [0, 2])
    V = torch.stack([torch.cat([d[k].flatten() for k in keys]) for d in (directions[0], directions[2])]).T
    tau = torch.cat([(models[0][k] - base[k]).flatten() for k in keys])
    projected = V @ torch.linalg.lstsq(V, tau[:, None]).solution[:, 0]
    got = torch.cat([(result[k] - base[k]).flatten() for k in keys])
    torch.testing.assert_close(got, projected, rtol=1e-9, atol=1e-9)
    everything = decomp.submodel(base, models[0], directions, [0, 1, 2], mode="fisher",
                                 component_fishers=[{k: v.square() for k, v in d.items()} for d in directions])
    for key in keys:   # every component chosen: the whole task vector
        torch.testing.assert_close(everything[key], models[0][key])


MEMORY_SCRIPT = """
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
root = Path(sys.argv[1])
g = torch.Generator().manual_seed(0)
for i in range(3):   # 24 tensors of 8 MiB: 192 MiB per model
    save_file({f"layer{j}.weight": torch.randn(2048, 1024, generator=g) for j in range(24)}, str(root / f"m{i}.safetensors"))
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
import decomp
state = decomp.merge([root / f"m{i}.safetensors" for i in range(3)], method="average")
print((status("VmHWM") - before) / 2**20)
"""


def test_merging_three_models_needs_about_one_model_of_memory(tmp_path):
    # a fixed mmap threshold: glibc's adaptive one keeps freed 16 MiB blocks on its heap, which would measure the
    # allocator's retention instead of what the merge holds
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"})
    assert result.returncode == 0, result.stderr[-2000:]
    peak = float(result.stdout.strip().splitlines()[-1])
    # the output (192 MiB) plus a few tensors in float64 (16 MiB each) and the import of decomp, far below the
    # 576 MiB of the three inputs
    assert peak < 192 + 160, f"peak extra resident memory {peak:.0f} MiB"


def test_keys_missing_from_some_inputs_are_handled_explicitly():
    base, models = states()
    stale = dict(base)
    stale["embeddings.position_ids"] = torch.arange(5)       # an old save's buffer: only in the base
    merged = decomp.merge(models, method="task_arithmetic", base=stale)
    assert "embeddings.position_ids" not in merged and "only in the base" in merged.notes["embeddings.position_ids"]
    partial = {k: v for k, v in models[2].items() if k != "norm.weight"}
    with pytest.raises(ValueError, match="'norm.weight' is missing from model 2"):
        decomp.merge([models[0], models[1], partial], method="average")
    skipped = decomp.merge([models[0], models[1], partial], method="average", missing="skip")
    assert "norm.weight" not in skipped and "not in every input" in skipped.notes["norm.weight"]


def test_components_merge_is_fisher_merging_with_the_chosen_component_fishers():
    base, models = states(M=2)
    keys = [k for k in base if k != "encoder.position_ids"]
    g = torch.Generator().manual_seed(4)
    per_model = [[{k: torch.rand(*base[k].shape, generator=g, dtype=torch.float64) for k in keys} for _ in range(3)]
                 for _ in models]
    merged = decomp.merge(models, method="components", fishers=per_model, select=[[0, 2], [1]])
    chosen = [{k: per_model[0][0][k] + per_model[0][2][k] for k in keys}, per_model[1][1]]
    expected = decomp.merge(models, method="fisher", fishers=chosen)
    for key in keys:
        close(merged[key], expected[key])
    with pytest.raises(ValueError, match="select\\[1\\] names component 5"):
        decomp.merge(models, method="components", fishers=per_model, select=[[0], [5]])


def test_search_coefficients_picks_the_best_on_held_out_scores():
    base, models = states(M=2)
    target = decomp.merge(models, method="task_arithmetic", base=base, scale=0.6)["norm.weight"]

    def make(scale):
        return decomp.merge(models, method="task_arithmetic", base=base, scale=scale)

    best, state, scored = decomp.search_coefficients(make, [0.2, 0.4, 0.6, 0.8],
                                                     lambda s: -float((s["norm.weight"] - target).norm()))
    assert best == 0.6 and len(scored) == 4 and torch.equal(state["norm.weight"], target)
