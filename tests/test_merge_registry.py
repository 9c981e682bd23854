"""The merge-method registry: methods registered without a file work from decomp.merge, a YAML recipe and the CLI;
parameters are validated from their declarations; recipes are checked against the registry's schema."""

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import decomp
from decomp.merging import Parameter, merge_methods, merge_recipe, recipe_schema, register_merge_method
from decomp.merging.registry import Interval, unregister_merge_method

BUILT_INS = {"average": {}, "task_arithmetic": {"scale": 1.0},
             "ties": {"density": 0.2, "trim": "global", "scale": 1.0, "normalize": True},
             "dare": {"density": 0.1, "seed": 0, "scale": 1.0},
             "dare_ties": {"density": 0.1, "seed": 0, "scale": 1.0, "normalize": True},
             "fisher": {"floor": 0.0, "floor_relative": None, "normalize": False, "normalize_per_tensor": False,
                        "favor": None, "favor_weight": 0.5, "scale": 1.0},
             "regmean": {"alpha": 0.9}, "data_tsv": {"scale": 1.0, "isotropic": False}}


def states(M=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"dense.weight": (6, 5), "dense.bias": (6,)}
    base = {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    models = [{k: v + 0.3 * torch.randn(*v.shape, generator=g, dtype=torch.float64) for k, v in base.items()}
              for _ in range(M)]
    return base, models


def max_abs_by_hand(base, models, scale):
    """θ_0 + scale · (per entry, the task vector entry of largest magnitude)."""
    out = {}
    for key in base:
        taus = torch.stack([m[key] - base[key] for m in models])
        pick = taus.abs().argmax(0, keepdim=True)
        out[key] = base[key] + scale * taus.gather(0, pick)[0]
    return out


def max_abs_formula(key, values, context):
    """Largest-magnitude task vector entry: θ_0 + scale · τ_(argmax_m |τ_m|), entry by entry."""
    base, taus = context.task_vectors(key, values)
    stacked = torch.stack(taus)
    return base + context.params["scale"] * stacked.gather(0, stacked.abs().argmax(0, keepdim=True))[0]


@pytest.fixture
def max_abs():
    method = register_merge_method("max_abs", max_abs_formula, needs=("base",), parameters=[
        Parameter("scale", 1.0, "coefficient of the step", float, Interval(0, 10))])
    yield method
    unregister_merge_method("max_abs")


def test_a_registered_method_works_from_merge_and_a_recipe(max_abs, tmp_path):
    base, models = states()
    merged = decomp.merge(models, method="max_abs", base=base, scale=0.5)
    expected = max_abs_by_hand(base, models, 0.5)
    for key in base:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-12, atol=1e-12)
    assert merged.recipe["parameters"] == {"scale": 0.5}
    assert "max_abs" in merge_methods() and "coefficient of the step" in str(merge_methods()["max_abs"])
    from safetensors.torch import save_file
    for name, state in [("base", base)] + [(f"m{i}", m) for i, m in enumerate(models)]:
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: max_abs\nbase: base.safetensors\nmodels: [m0.safetensors, m1.safetensors, "
                      "m2.safetensors]\nparameters: {scale: 0.5}\n")
    from_recipe = merge_recipe(recipe)
    assert all(torch.equal(from_recipe[k], merged[k]) for k in base)


def test_register_as_a_decorator_and_its_errors():
    @register_merge_method("negate_average", parameters={"factor": 1.0})
    def negate_average(key, values, context):
        """-factor · Σ λ_m θ_m / Σ λ_m."""
        return -context.params["factor"] * context.mean(values)

    try:
        assert callable(negate_average) and negate_average.__name__ == "negate_average"
        base, models = states(M=2)
        merged = decomp.merge(models, method="negate_average", factor=2)
        torch.testing.assert_close(merged["dense.bias"], -(models[0]["dense.bias"] + models[1]["dense.bias"]))
        with pytest.raises(ValueError, match="already registered"):
            register_merge_method("negate_average", negate_average)
        register_merge_method("negate_average", negate_average, replace=True)
        with pytest.raises(ValueError, match="needs must be among base, fishers, grams, components"):
            register_merge_method("other", negate_average, needs=("basis",))
        with pytest.raises(ValueError, match="identifier"):
            register_merge_method("not a name", negate_average)
    finally:
        unregister_merge_method("negate_average")
    assert "negate_average" not in merge_methods()


def test_merge_methods_lists_every_built_in_with_its_parameters():
    methods = merge_methods()
    for name, defaults in BUILT_INS.items():
        assert methods[name].defaults() == defaults, name
        assert methods[name].summary and all(p.doc for p in methods[name].parameters)
    assert set(methods["components"].defaults()) == {"select", *BUILT_INS["fisher"]}
    assert methods["ties"].needs == ("base",) and methods["fisher"].needs == ("fishers",)
    assert methods["regmean"].needs == ("grams",) and methods["average"].needs == ()
    assert methods["components"].needs == ("components",)
    text = str(methods)
    assert all(name in text for name in BUILT_INS) and "density=0.2" in text and "Yadav et al., 2023" in text


def test_unknown_parameters_and_methods_suggest_the_closest_name():
    base, models = states()
    with pytest.raises(ValueError) as error:
        decomp.merge(models, method="ties", base=base, densty=0.2)
    message = str(error.value)
    assert "method='ties'" in message and "'densty'" in message and "did you mean 'density'?" in message
    assert "density, trim, scale" in message
    with pytest.raises(ValueError, match="method must be one of .*average.*did you mean 'ties'"):
        decomp.merge(models, method="tise", base=base)
    with pytest.raises(ValueError, match="takes no parameter 'scale'.*no parameters"):
        decomp.merge(models, method="average", scale=1.0)


@pytest.mark.parametrize("method,params,message", [
    ("ties", {"density": "0.2"}, "density must be a number in \\(0, 1\\]; got '0.2' \\(str\\)"),
    ("ties", {"density": 0}, "density must be a number in \\(0, 1\\]; got 0"),
    ("ties", {"density": 1.5}, "density must be a number in \\(0, 1\\]; got 1.5"),
    ("ties", {"trim": "local"}, "trim must be one of 'global', 'per_tensor'; got 'local'"),
    ("ties", {"scale": True}, "scale must be a number; got True \\(bool\\)"),
    ("dare", {"seed": 1.5}, "seed must be an integer; got 1.5 \\(float\\)"),
    ("fisher", {"favor": 5}, "favor must be a model index in \\[0, 3\\); got 5"),
    ("fisher", {"favor_weight": 2.0}, "favor_weight must be a number in \\[0, 1\\]; got 2.0"),
    ("fisher", {"normalize": "yes"}, "normalize must be true or false; got 'yes'"),
    ("fisher", {"floor": -1.0}, "floor must be a number >= 0; got -1.0"),
    ("regmean", {"alpha": 1.1}, "alpha must be a number in \\[0, 1\\]; got 1.1"),
    ("components", {}, "method='components' needs select="),
    ("components", {"select": [[0]]}, "select must be a list with one entry per model \\(3\\); got \\[\\[0\\]\\]"),
])
def test_bad_parameter_values_name_the_parameter_its_domain_and_the_value(method, params, message):
    base, models = states()
    fishers = [{k: torch.ones_like(v) for k, v in base.items()}] * 3
    inputs = {"base": base} if method in ("ties", "dare") else {}
    inputs.update({"fishers": fishers} if method == "fisher" else {})
    with pytest.raises(ValueError, match=message):
        decomp.merge(models, method=method, **inputs, **params)


def test_inputs_a_method_does_not_use_are_errors():
    base, models = states()
    with pytest.raises(ValueError, match="fishers= is used by method='fisher' and 'components', not 'ties'"):
        decomp.merge(models, method="ties", base=base, fishers=[{}] * 3)
    with pytest.raises(ValueError,
                       match="grams= is used by method='regmean', 'data_tsv' and 'data_iso_cts', not 'average'"):
        decomp.merge(models, method="average", grams=[{}] * 3)
    with pytest.raises(ValueError, match="needs grams="):
        decomp.merge(models, method="regmean")


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("text,message", [
    ("method: ties\nmodles: [a, b]\n", "unknown key 'modles' in a recipe \\(did you mean 'models'\\?\\)"),
    ("method: ties\nmodels: [a]\nparamters: {density: 0.2}\n", "did you mean 'parameters'\\?"),
    ("method: ties\nmodels: [a]\ndensity: 0.2\n", "'density' is a parameter of the method: put it under parameters"),
    ("method: ties\nmodels: [a]\nparameters: {densty: 0.2}\n", "takes no parameter 'densty' \\(did you mean 'density'"),
    ("method: ties\nmodels: [a]\nparameters: {density: '0.2'}\n", "density must be a number in \\(0, 1\\]; got '0.2'"),
    ("method: ties\nmodels: [{path: a, wieght: 2}]\n", "'wieght' in a model entry \\(did you mean 'weight'"),
    ("method: ties\nmodels: a\n", "models must be a list"),
    ("method: tise\nmodels: [a]\n", "method must be one of .*did you mean 'ties'"),
    ("models: [a]\n", "a recipe needs method:"),
    ("method: ties\nmodels: [a]\nplugins: [nowhere.py]\n", "plugin nowhere.py does not exist"),
    ("method: ties\nmodels: [a, b\nbase: c\n", "recipe.yaml, line 3, column 5: malformed YAML"),
])
def test_recipes_are_checked_before_any_model_is_read(tmp_path, text, message):
    recipe = write(tmp_path / "recipe.yaml", text)
    with pytest.raises(ValueError, match=message) as error:
        merge_recipe(recipe)
    assert str(recipe) in str(error.value)


def test_the_recipe_schema_is_generated_from_the_registry(max_abs):
    schema = recipe_schema()
    assert "max_abs" in schema["properties"]["method"]["enum"]
    assert schema["additionalProperties"] is False and set(schema["required"]) == {"method", "models"}
    by_method = {rule["if"]["properties"]["method"]["const"]: rule["then"]["properties"]["parameters"]
                 for rule in schema["allOf"]}
    assert by_method["ties"]["properties"]["density"]["default"] == 0.2
    assert by_method["max_abs"]["properties"]["scale"]["type"] == "number"
    assert by_method["components"]["required"] == ["select"] and "default" not in by_method["components"][
        "properties"]["select"]
    assert json.loads(json.dumps(schema)) == schema   # plain JSON, for editors


# the same method, registered by a file a recipe names in `plugins:` (the CLI runs in a process of its own)
PLUGIN = ("import torch\nfrom decomp.merging import Parameter, register_merge_method\n\n\n"
          "@register_merge_method('max_abs', needs=('base',), parameters=[Parameter('scale', 1.0, 'step')])\n"
          + inspect.getsource(max_abs_formula))


def test_a_plugin_method_runs_from_the_command_line(tmp_path):
    from transformers import BertForSequenceClassification
    from models import tiny
    names = ["base", "t0", "t1"]
    for i, name in enumerate(names):
        model = tiny("bert", seed=0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * i * torch.randn_like(p))
        model.save_pretrained(tmp_path / name)
    (tmp_path / "my_methods.py").write_text(PLUGIN)
    recipe = write(tmp_path / "recipe.yaml", """
        method: max_abs
        plugins: [my_methods.py]
        base: base
        models: [t0, t1]
        parameters: {scale: 0.5}
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "decomp", "merge", str(recipe), "-o", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    merged = BertForSequenceClassification.from_pretrained(tmp_path / "out").state_dict()
    states_ = [BertForSequenceClassification.from_pretrained(tmp_path / n).state_dict() for n in names]
    expected = max_abs_by_hand(states_[0], states_[1:], 0.5)
    for key, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(merged[key], value.to(merged[key].dtype))
    write(recipe, "method: max_abs\nplugins: [my_methods.py]\nbase: base\nmodels: [t0, t1]\n"
                  "parameters: {scael: 0.5}\n")
    result = subprocess.run([sys.executable, "-m", "decomp", "merge", str(recipe), "-o", str(tmp_path / "never")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2 and "did you mean 'scale'?" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "never").exists()
