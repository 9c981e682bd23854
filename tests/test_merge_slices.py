"""Methods that declare `slices` ("entries" or "rows") are handed large tensors in blocks of rows; the merge must be
the same, bit for bit, as the formula on whole tensors, for every such method (DARE's and DELLA's random drops
included), from in-memory models and from safetensors files read a block at a time."""

import pytest
import torch
from safetensors.torch import save_file

import decomp
from decomp.merging import engine
from decomp.merging.engine import row_blocks
from decomp.merging.methods.ties import hash_uniforms
from decomp.merging.registry import register_merge_method, unregister_merge_method

SHAPES = {"embed.weight": (49, 6), "layer.weight": (6, 6), "layer.bias": (6,), "conv.weight": (5, 3, 2),
          "long.bias": (40,), "scale": (), "frozen.weight": (30, 4)}
WEIGHTS = [0.5, 1.0, 1.5]

# every method that declares slices, with parameter sets that reach each of its branches
CASES = {
    "average": [{}],
    "task_arithmetic": [{"scale": 0.7}],
    "ties": [{}, {"density": 0.5, "normalize": False}, {"trim": "per_tensor"}],
    "dare": [{"density": 0.4, "seed": 3}],
    "dare_ties": [{"density": 0.5, "seed": 1}, {"normalize": False}],
    "della": [{"seed": 2}, {"density": 0.5, "epsilon": 0.2, "normalize": False}],
    "della_linear": [{"seed": 5}],
    "fisher": [{}, {"normalize": True, "floor_relative": 0.1}, {"favor": 1, "floor": 0.01}],
    "components": [{"select": [[0], [0, 1], [1]]}, {"select": [[1], [0], [0, 1]], "normalize": True}],
    "regmean": [{"alpha": 0.5}],
    "model_stock": [{"filter_wise": True}, {"filter_wise": False}],
    "tsv": [{"scale": 0.7}],      # entry by entry where no model changed a matrix, and off matrices
    "iso_c": [{}],
    "iso_cts": [{}],
    "data_tsv": [{}, {"isotropic": True}],
    "data_iso_cts": [{}, {"common_space_fraction": 0.5}],
}


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    models = [{k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    for model in models:   # repeated magnitudes: TIES' and DELLA's ties must break the same way in blocks
        model["embed.weight"][3:9] = base["embed.weight"][3:9] + 0.25
        model["frozen.weight"] = base["frozen.weight"].clone()   # no task changed it (frozen word embeddings)

    def fisher():
        values = {k: torch.rand(s, generator=g) for k, s in SHAPES.items()}
        values["embed.weight"][:4] = 0   # rows where every Fisher is zero take the average
        return values
    grams = []
    for _ in range(3):
        x = torch.randn(20, 6, generator=g)
        grams.append({"layer": x.T @ x})
    return base, models, [fisher() for _ in range(3)], [[fisher(), fisher()] for _ in range(3)], grams


def run(method, params, models, base, fishers, components, grams):
    declaration = decomp.merge_methods()[method]
    extra = {"base": base} if "base" in declaration.needs else {}
    extra.update({"fishers": fishers} if "fishers" in declaration.needs else {})
    extra.update({"fishers": components} if "components" in declaration.needs else {})
    extra.update({"grams": grams} if "grams" in declaration.needs else {})
    weights = WEIGHTS if declaration.weighted else None
    return decomp.merge(models, method=method, weights=weights, **extra, **params)


def assert_identical(sliced, whole):
    assert set(sliced) == set(whole)
    for key in whole:
        assert sliced[key].dtype == whole[key].dtype and sliced[key].shape == whole[key].shape, key
        assert torch.equal(sliced[key], whole[key]), key
    assert sliced.notes == whole.notes


CASE_LIST = [(method, params) for method, options in CASES.items() for params in options]


@pytest.mark.parametrize("entries", [1, 13, 100])
@pytest.mark.parametrize("method,params", CASE_LIST)
def test_sliced_merges_equal_whole_tensor_merges_bit_for_bit(method, params, entries, monkeypatch):
    base, models, fishers, components, grams = inputs()
    whole = run(method, params, models, base, fishers, components, grams)   # every tensor under 2**20 entries
    monkeypatch.setattr(engine, "SLICE_ENTRIES", entries)
    assert_identical(run(method, params, models, base, fishers, components, grams), whole)


@pytest.mark.parametrize("method,params", [case for case in CASE_LIST if case[0] in ("ties", "dare_ties", "della")])
def test_sliced_merges_of_files_read_block_by_block_equal_whole_ones(method, params, tmp_path, monkeypatch):
    base, models, fishers, components, grams = inputs(1)
    whole = run(method, params, models, base, fishers, components, grams)
    paths = []
    for name, state in [("base", base)] + [(f"model{m}", model) for m, model in enumerate(models)]:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / f"{name}.safetensors"))
        paths.append(str(tmp_path / f"{name}.safetensors"))
    monkeypatch.setattr(engine, "SLICE_ENTRIES", 13)
    assert_identical(run(method, params, paths[1:], paths[0], fishers, components, grams), whole)


def test_every_method_that_declares_slices_is_checked_here():
    declared = {name for name, method in decomp.merge_methods().items() if method.slices is not None}
    assert declared <= set(CASES), f"add {sorted(declared - set(CASES))} to CASES"
    assert {"average", "task_arithmetic", "ties", "dare", "dare_ties", "della", "della_linear", "fisher",
            "components"} <= declared


def test_blocks_are_whole_rows_of_about_slice_entries(monkeypatch):
    monkeypatch.setattr(engine, "SLICE_ENTRIES", 10)
    assert row_blocks((7, 3), "entries") == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert row_blocks((7, 30), "rows") == [slice(i, i + 1) for i in range(7)]     # a row is never split
    assert row_blocks((25,), "entries") == [slice(0, 10), slice(10, 20), slice(20, 25)]
    assert row_blocks((25,), "rows") is None        # a 1-D tensor is one row
    assert row_blocks((3, 3), "entries") is None    # small enough to merge whole
    assert row_blocks((7, 3), None) is None
    # a block's draws are those of the whole tensor at the block's place
    assert torch.equal(hash_uniforms(4, 1, "w", (7, 3))[2:5], hash_uniforms(4, 1, "w", (3, 3), first=6))


def test_the_formula_is_given_blocks_and_their_rows(monkeypatch):
    seen = []

    def record(key, values, context):
        """Records the rows it is given."""
        seen.append((key, context.rows, tuple(values[0].shape)))
        return context.mean(values)
    register_merge_method("record_rows", record, slices="entries")
    try:
        monkeypatch.setattr(engine, "SLICE_ENTRIES", 13)
        base, models, *_ = inputs()
        merged = decomp.merge(models, method="record_rows")
    finally:
        unregister_merge_method("record_rows")
    embed = [(rows, shape) for key, rows, shape in seen if key == "embed.weight"]
    assert embed[0] == (slice(0, 2), (2, 6)) and embed[-1] == (slice(48, 49), (1, 6)) and len(embed) == 25
    assert [rows for key, rows, _ in seen if key == "layer.bias"] == [None]
    torch.testing.assert_close(merged["embed.weight"], sum(m["embed.weight"] for m in models) / 3)
    with pytest.raises(ValueError, match="slices must be one of"):
        register_merge_method("bad_slices", record, slices="columns")


def test_a_non_finite_block_is_reported_as_for_the_whole_tensor(monkeypatch):
    base, models, *_ = inputs()
    models[1]["embed.weight"][30, 2] = float("nan")
    with pytest.raises(ValueError) as whole:
        decomp.merge(models, method="task_arithmetic", base=base)
    monkeypatch.setattr(engine, "SLICE_ENTRIES", 13)
    with pytest.raises(ValueError) as sliced:
        decomp.merge(models, method="task_arithmetic", base=base)
    assert str(sliced.value) == str(whole.value) and "entry (30, 2)" in str(whole.value)
