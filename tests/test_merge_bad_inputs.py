"""Bad inputs to a merge (issue #17): every one is an exception of a stated type whose message names the argument
and the value, raised before anything is written, and leaving every input and every existing folder unchanged."""

import copy
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import decomp
from models import tiny

QUERY = "bert.encoder.layer.0.attention.self.query"
DENSE = "bert.encoder.layer.0.intermediate.dense"


@dataclass
class Workspace:
    root: Path
    states: dict        # name -> state dict (the originals; cases get copies)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    states = {}
    for i, name in enumerate(("base", "t0", "t1")):
        model = tiny("bert", seed=0)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * i * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / name)
        states[name] = load_file(root / name / "model.safetensors")
    fisher = {k: v.abs() for k, v in states["t0"].items() if v.is_floating_point()}
    decomp.Fisher(fisher, kind="exact", num_examples=2).save(root / "good.fisher")
    (root / "corrupt.fisher").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (root / "corrupt.grams").write_bytes(b"garbage")
    return Workspace(root, states)


def snapshot(*folders) -> dict:
    """relative path -> sha256 of every file (and every folder) under the folders."""
    seen = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return seen


def pair(w):
    return [copy.deepcopy(w.states["t0"]), copy.deepcopy(w.states["t1"])]


def fishers(w):
    """One Fisher per model: |θ|, finite and >= 0."""
    return [{k: v.abs() for k, v in w.states[n].items() if v.is_floating_point()} for n in ("t0", "t1")]


def fishers_with(w, model, key, index, value):
    """The Fishers with one entry of one model's replaced by `value`."""
    result = fishers(w)
    result[model][key] = result[model][key].clone()
    result[model][key][index] = value
    return result


def grams(w, module=QUERY, gram=None, second=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g, dtype=torch.float64)
    good = {module: x.T @ x}
    return [good if gram is None else {module: gram}, good if second is None else second]


def asymmetric():
    gram = torch.eye(16, dtype=torch.float64)
    gram[0, 1] = 0.5
    return gram


def with_nan(w):
    state = copy.deepcopy(w.states["t1"])
    state[QUERY + ".bias"][3] = math.nan
    return [copy.deepcopy(w.states["t0"]), state]


def merge_save(w, out, models=None, **arguments):
    """decomp.merge, then save_merged into `out`: a case that got through would write there."""
    state = decomp.merge(pair(w) if models is None else models, **arguments)
    decomp.save_merged(state, out, like=w.root / "base")


def save_into(w, out, prepare=None, **arguments):
    """save_merged of a plain average into `out`, after prepare(out) made what is there."""
    if prepare is not None:
        prepare(out)
    state = decomp.merge(pair(w), method="average")
    decomp.save_merged(state, out, like=w.root / "base", **arguments)


def foreign(out):
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")


def earlier_merge(out):
    out.mkdir()
    (out / "README.md").write_text("# Merged with decomp\n")
    (out / "model.safetensors").write_bytes(b"an earlier merge")


def a_file(out):
    out.write_text("not a folder")


def huge(w):
    state = copy.deepcopy(w.states["t0"])
    state[QUERY + ".weight"] = state[QUERY + ".weight"] * 1e6
    return [state, copy.deepcopy(state)]


# (call, exception type, patterns the message must hold: the argument and the value)
CASES = {
    "weights summing to zero": (lambda w, o: merge_save(w, o, method="average", weights=[1, -1]), ValueError,
                                [r"weights=\[1.0, -1.0\]", "sum to 0", "'average'"]),
    "fisher weights summing to zero": (lambda w, o: merge_save(w, o, method="fisher", weights=[0.5, -0.5],
                                                               fishers=fishers(w)), ValueError,
                                       [r"weights=\[0.5, -0.5\]", "sum to 0", "'fisher'"]),
    "regmean weights summing to zero": (lambda w, o: merge_save(w, o, method="regmean", weights=[2, -2],
                                                                grams=grams(w)), ValueError,
                                        [r"weights=\[2.0, -2.0\]", "sum to 0"]),
    "NaN weight": (lambda w, o: merge_save(w, o, method="average", weights=[math.nan, 1]), ValueError,
                   [r"weights\[0\]", "nan"]),
    "infinite weight": (lambda w, o: merge_save(w, o, method="task_arithmetic", base=w.root / "base",
                                                weights=[1, math.inf]), ValueError, [r"weights\[1\]", "inf"]),
    "string weight": (lambda w, o: merge_save(w, o, method="average", weights=["a", 1]), ValueError,
                      [r"weights\[0\]", "'a'"]),
    "boolean weight": (lambda w, o: merge_save(w, o, method="average", weights=[True, 1]), ValueError,
                       [r"weights\[0\]", "True"]),
    "weights as a string": (lambda w, o: merge_save(w, o, method="average", weights="11"), ValueError,
                            ["weights", "'11'"]),
    "one weight for two models": (lambda w, o: merge_save(w, o, method="average", weights=[1.0]), ValueError,
                                  ["weights", r"got 1: \[1.0\]"]),
    "weights for slerp": (lambda w, o: merge_save(w, o, method="slerp", weights=[1, 1]), ValueError,
                          [r"weights=\[1, 1\]", "'slerp'"]),
    "density as a string": (lambda w, o: merge_save(w, o, method="ties", base=w.root / "base", density="0.2"),
                            ValueError, ["density", "'0.2'", r"\(0, 1\]"]),
    "density zero": (lambda w, o: merge_save(w, o, method="ties", base=w.root / "base", density=0), ValueError,
                     ["density", "got 0"]),
    "density above one": (lambda w, o: merge_save(w, o, method="dare", base=w.root / "base", density=1.5),
                          ValueError, ["density", "1.5"]),
    "favor out of range": (lambda w, o: merge_save(w, o, method="fisher", fishers=fishers(w), favor=7), ValueError,
                           ["favor", "got 7", r"\[0, 2\)"]),
    "t out of range": (lambda w, o: merge_save(w, o, method="slerp", t=2), ValueError, ["t must", "got 2"]),
    "scale as a string": (lambda w, o: merge_save(w, o, method="task_arithmetic", base=w.root / "base",
                                                  scale="big"), ValueError, ["scale", "'big'"]),
    "della probabilities": (lambda w, o: merge_save(w, o, method="della", base=w.root / "base", density=0.05,
                                                    epsilon=0.07), ValueError, ["density=0.05", "epsilon=0.07"]),
    "unknown method": (lambda w, o: merge_save(w, o, method="tise"), ValueError, ["method", "'tise'", "'ties'"]),
    "models as a string": (lambda w, o: merge_save(w, o, models="t0", method="average"), ValueError,
                           ["models", "'t0'"]),
    "heads": (lambda w, o: merge_save(w, o, method="average", heads="bogus",
                                      models=[w.states["t0"], {**w.states["t1"], "classifier.bias": torch.zeros(5)}]),
              ValueError, ["heads", "'bogus'"]),
    "missing": (lambda w, o: merge_save(w, o, method="average", missing="maybe"), ValueError, ["missing", "'maybe'"]),
    "Fisher with NaN": (lambda w, o: merge_save(w, o, method="fisher",
                                                fishers=fishers_with(w, 1, QUERY + ".weight", (2, 3), math.nan)),
                        ValueError, [r"fishers\[1\]", f"'{QUERY}.weight'", r"entry \(2, 3\) is nan"]),
    "Fisher negative": (lambda w, o: merge_save(w, o, method="fisher",
                                                fishers=fishers_with(w, 0, QUERY + ".bias", (4,), -1.0)),
                        ValueError, [r"fishers\[0\]", f"'{QUERY}.bias'", r"entry \(4,\) is -1.0", ">= 0"]),
    "Fisher infinite": (lambda w, o: merge_save(w, o, method="fisher",
                                                fishers=fishers_with(w, 0, "classifier.weight", (0, 0), math.inf)),
                        ValueError, [r"fishers\[0\]", "'classifier.weight'", "inf"]),
    "Fisher of another shape": (lambda w, o: merge_save(w, o, method="fisher", fishers=[
        {**fishers(w)[0], "classifier.bias": torch.ones(7)}, fishers(w)[1]]), ValueError,
        [r"fishers\[0\]", "'classifier.bias'", r"\(7,\)"]),
    "Fisher not a mapping": (lambda w, o: merge_save(w, o, method="fisher", fishers=[[1.0, 2.0], fishers(w)[1]]),
                             ValueError, [r"fishers\[0\]", "list"]),
    "fishers as a string": (lambda w, o: merge_save(w, o, method="fisher", fishers="f.safetensors"), ValueError,
                            ["fishers", "'f.safetensors'"]),
    "corrupt Fisher file": (lambda w, o: merge_save(w, o, method="fisher",
                                                    fishers=[w.root / "corrupt.fisher", w.root / "good.fisher"]),
                            ValueError, [r"fishers\[0\]", "corrupt.fisher"]),
    "missing Fisher file": (lambda w, o: merge_save(w, o, method="fisher",
                                                    fishers=[w.root / "good.fisher", w.root / "absent.fisher"]),
                            FileNotFoundError, [r"fishers\[1\]", "absent.fisher"]),
    "Gram of the wrong width": (lambda w, o: merge_save(w, o, method="regmean", grams=grams(
        w, gram=torch.eye(5, dtype=torch.float64))), ValueError,
        [r"grams\[0\]", f"'{QUERY}'", r"shape \(5, 5\)", r"\[16, 16\]"]),
    "Gram not square": (lambda w, o: merge_save(w, o, method="regmean", grams=grams(
        w, module=DENSE, gram=torch.ones(24, 16, dtype=torch.float64))), ValueError,
        [r"grams\[0\]", f"'{DENSE}'", r"shape \(24, 16\)"]),
    "Gram not symmetric": (lambda w, o: merge_save(w, o, method="regmean", grams=grams(w, gram=asymmetric())),
                           ValueError, [r"grams\[0\]", f"'{QUERY}'", "not symmetric", "0.5"]),
    "Gram with NaN": (lambda w, o: merge_save(w, o, method="regmean", grams=grams(
        w, gram=torch.full((16, 16), math.nan, dtype=torch.float64))), ValueError,
        [r"grams\[0\]", f"'{QUERY}'", r"entry \(0, 0\) is nan"]),
    "Gram with a negative diagonal": (lambda w, o: merge_save(w, o, method="regmean", grams=grams(
        w, gram=-torch.eye(16, dtype=torch.float64))), ValueError, [r"grams\[0\]", "negative diagonal", "-1.0"]),
    "Grams of one layer in two widths": (lambda w, o: merge_save(w, o, method="regmean", grams=grams(
        w, module=DENSE, second={DENSE: torch.eye(24, dtype=torch.float64)})), ValueError,
        [r"grams\[1\]", f"'{DENSE}'", r"\[24, 24\]", r"\[16, 16\]"]),
    "Grams of another model": (lambda w, o: merge_save(w, o, method="regmean", grams=grams(
        w, second={"encoder.fc": torch.eye(4)})), ValueError, [r"grams\[1\]", "'encoder.fc'", "another model"]),
    "corrupt Gram file": (lambda w, o: merge_save(w, o, method="regmean", grams=[w.root / "corrupt.grams",
                                                                                  grams(w)[1]]),
                          ValueError, [r"grams\[0\]", "corrupt.grams"]),
    "grams not a list": (lambda w, o: merge_save(w, o, method="regmean", grams={"a": 1}), ValueError,
                         ["grams", "'a'"]),
    "a model with NaN": (lambda w, o: merge_save(w, o, models=with_nan(w), method="average"), ValueError,
                         [f"'{QUERY}.bias'", "model 1", r"entry \(3,\) is nan"]),
    "overflowing the dtype": (lambda w, o: merge_save(w, o, method="task_arithmetic", base=w.root / "base",
                                                      scale=1e300), ValueError,
                              ["overflows torch.float32", "'scale': 1e\\+300"]),
    "a folder decomp did not write": (lambda w, o: save_into(w, o, foreign, overwrite=True), FileExistsError,
                                      ["out_dir=", "out'", "did not write"]),
    "an earlier merge without overwrite": (lambda w, o: save_into(w, o, earlier_merge), FileExistsError,
                                           ["out_dir=", "out'", "overwrite=True"]),
    "a file as the target": (lambda w, o: save_into(w, o, a_file, overwrite=True), FileExistsError,
                             ["out_dir=", "not a folder"]),
    "unknown dtype": (lambda w, o: save_into(w, o, dtype="float8"), ValueError, ["dtype", "'float8'"]),
    "overflow once saved as float16": (lambda w, o: decomp.save_merged(
        decomp.merge(huge(w), method="average"), o, like=w.root / "base", dtype="float16"), ValueError,
        [f"'{QUERY}.weight'", "torch.float16", "inf"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_clear_error_and_changes_nothing(workspace, tmp_path, name):
    call, error, patterns = CASES[name]
    originals = {n: {k: v.clone() for k, v in s.items()} for n, s in workspace.states.items()}
    before = snapshot(workspace.root)
    out = tmp_path / "out"
    with pytest.raises(error) as raised:
        call(workspace, out)
    message = str(raised.value)
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    assert snapshot(workspace.root) == before
    existing = snapshot(tmp_path)
    assert all(".partial-" not in p and ".old-" not in p for p in existing), existing
    if name not in ("a folder decomp did not write", "an earlier merge without overwrite", "a file as the target"):
        assert not out.exists()
    for n, state in workspace.states.items():
        assert all(torch.equal(state[k], originals[n][k]) for k in state)


def test_there_are_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_existing_targets_are_left_exactly_as_they_were(workspace, tmp_path):
    for prepare in (foreign, earlier_merge, a_file):
        out = tmp_path / prepare.__name__
        prepare(out)
        before = snapshot(tmp_path)
        with pytest.raises(FileExistsError):
            save_into(workspace, out, overwrite=prepare is not earlier_merge)
        assert snapshot(tmp_path) == before


def test_overwrite_replaces_only_an_earlier_merge_and_a_failure_leaves_it(workspace, tmp_path):
    out = tmp_path / "merged"
    save_into(workspace, out)
    first = snapshot(out)
    with pytest.raises(ValueError, match="overflows|not finite"):   # a failed replacement keeps the earlier merge
        decomp.save_merged(decomp.merge(huge(workspace), method="average"), out, like=workspace.root / "base",
                           dtype="float16", overwrite=True)
    assert snapshot(out) == first and [p.name for p in tmp_path.iterdir()] == ["merged"]
    state = decomp.merge(pair(workspace), method="average", weights=[0.2, 0.8])
    decomp.save_merged(state, out, like=workspace.root / "base", overwrite=True)
    assert snapshot(out) != first and [p.name for p in tmp_path.iterdir()] == ["merged"]
    nested = tmp_path / "a" / "b" / "out"
    with pytest.raises(ValueError):
        decomp.save_merged(decomp.merge(huge(workspace), method="average"), nested, like=workspace.root / "base",
                           dtype="float16")
    assert not (tmp_path / "a").exists()


def test_merge_recipe_refuses_the_target_before_reading_any_model(workspace, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: average\nmodels: [nowhere0, nowhere1]\n")
    foreign(tmp_path / "out")
    with pytest.raises(FileExistsError, match="did not write"):
        decomp.merge_recipe(recipe, tmp_path / "out", overwrite=True)
    earlier_merge(tmp_path / "again")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        decomp.merge_recipe(recipe, tmp_path / "again")


def test_regmean_with_a_zero_or_singular_gram_takes_the_average_where_the_data_is_silent(workspace):
    models = pair(workspace)
    zero = torch.zeros(16, 16, dtype=torch.float64)
    merged = decomp.merge(models, method="regmean", grams=[{QUERY: zero}, {QUERY: zero}])
    average = (models[0][QUERY + ".weight"].double() + models[1][QUERY + ".weight"].double()) / 2
    torch.testing.assert_close(merged[QUERY + ".weight"], average.float(), rtol=1e-6, atol=1e-7)
    assert "rank 0 < 16" in merged.notes[QUERY + ".weight"]
    # inputs spanning only the first 4 input dimensions: exact fit there, the average along the other 12
    g = torch.Generator().manual_seed(3)
    xs = [torch.cat([torch.randn(30, 4, generator=g, dtype=torch.float64), torch.zeros(30, 12, dtype=torch.float64)],
                    1) for _ in range(2)]
    merged = decomp.merge(models, method="regmean", alpha=1.0, grams=[{QUERY: x.T @ x} for x in xs])
    W = merged[QUERY + ".weight"].double()
    X = torch.cat(xs)
    Y = torch.cat([x @ m[QUERY + ".weight"].double().T for x, m in zip(xs, models)])
    fit = torch.linalg.lstsq(X[:, :4], Y).solution.T
    torch.testing.assert_close(W[:, :4], fit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(W[:, 4:], average[:, 4:], rtol=1e-5, atol=1e-6)
    assert "rank 4 < 16" in merged.notes[QUERY + ".weight"]
