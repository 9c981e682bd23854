"""mergekit configurations read unchanged (issue #19, item 5): each config below has the shape mergekit's own
documentation shows (README, examples/*.yml, docs/merge_methods.md), with tiny local models; the result must equal
decomp.merge with the mapped method and parameters, through merge_recipe and through the command line."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import save_file

import decomp
from decomp.merging import merge_recipe
from decomp.merging.methods.ties import disjoint_mean
from models import tiny

NAMES = ("base", "orca", "platypus", "wizard")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A base and three fine-tunes of a tiny BERT classifier, saved as save_pretrained folders."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    root = tmp_path_factory.mktemp("mergekit")
    backend = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "film": 2}, unk_token="[UNK]"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    for i, name in enumerate(NAMES):
        model = tiny("bert", seed=0)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * i * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def write(folder, text, name="config.yml"):
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def models(folder, *names):
    return [str(folder / n) for n in names]


def assert_same(state, expected):
    assert set(state) == set(expected)
    for key in expected:
        assert torch.equal(state[key], expected[key]), key


# (mergekit config, the decomp call it maps onto: method, models, base, weights, parameters)
CASES = {
    "linear": ("""
        models:
          - model: orca
            parameters:
              weight: 1.0
          - model: platypus
            parameters:
              weight: 0.3
          - model: wizard
            parameters:
              weight: 0.5
        merge_method: linear
        dtype: float16
        """, "average", ("orca", "platypus", "wizard"), None, [1.0, 0.3, 0.5], {}),
    "task_arithmetic": ("""
        models:
          - model: orca
            parameters:
              weight: 0.7
          - model: platypus
            parameters:
              weight: 0.3
        merge_method: task_arithmetic
        base_model: base
        parameters:
          lambda: 0.8
        dtype: float32
        """, "task_arithmetic", ("orca", "platypus"), "base", [0.7, 0.3], {"scale": 0.8}),
    "task_arithmetic normalized": ("""
        models:
          - model: base
          - model: orca
            parameters:
              weight: 1.0
          - model: platypus
            parameters:
              weight: 3.0
        merge_method: task_arithmetic
        base_model: base
        parameters:
          normalize: true
        """, "task_arithmetic", ("orca", "platypus"), "base", [0.25, 0.75], {"scale": 1.0}),
    "ties": ("""
        models:
          - model: orca
            parameters:
              density: 0.5
              weight: 1.0
          - model: platypus
            parameters:
              density: 0.5
              weight: 0.5
          - model: wizard
            parameters:
              density: 0.5
              weight: 0.3
        merge_method: ties
        base_model: base
        parameters:
          normalize: true
          int8_mask: true
        dtype: float16
        """, "ties", ("orca", "platypus", "wizard"), "base", [1.0, 0.5, 0.3],
        {"density": 0.5, "trim": "per_tensor", "normalize": True, "scale": 1.0}),
    "dare_ties": ("""
        models:
          - model: base
          - model: orca
            parameters:
              density: 0.53
              weight: 0.4
          - model: platypus
            parameters:
              density: 0.53
              weight: 0.3
        merge_method: dare_ties
        base_model: base
        parameters:
          int8_mask: true
        dtype: bfloat16
        """, "dare_ties", ("orca", "platypus"), "base", [0.4, 0.3],
        {"density": 0.53, "normalize": False, "scale": 1.0, "seed": 0}),
    "dare_linear": ("""
        models:
          - model: orca
            parameters:
              weight: 0.6
          - model: platypus
            parameters:
              weight: 0.4
        merge_method: dare_linear
        base_model: base
        parameters:
          density: 0.6
          lambda: 1.2
        """, "dare", ("orca", "platypus"), "base", [0.6, 0.4], {"density": 0.6, "scale": 1.2, "seed": 0}),
    "breadcrumbs": ("""
        models:
          - model: orca
            parameters:
              weight: 1.0
              density: 0.9
              gamma: 0.01
          - model: platypus
            parameters:
              weight: 1.0
              density: 0.9
              gamma: 0.01
        merge_method: breadcrumbs
        base_model: base
        """, "breadcrumbs", ("orca", "platypus"), "base", [1.0, 1.0], {"density": 0.9, "gamma": 0.01, "scale": 1.0}),
    "breadcrumbs_ties": ("""
        models:
          - model: orca
            parameters:
              weight: 0.5
          - model: platypus
            parameters:
              weight: 0.5
        merge_method: breadcrumbs_ties
        base_model: base
        parameters:
          density: 0.8
          gamma: 0.05
        """, "breadcrumbs_ties", ("orca", "platypus"), "base", [0.5, 0.5],
        {"density": 0.8, "gamma": 0.05, "normalize": False, "scale": 1.0}),
    "della": ("""
        models:
          - model: orca
            parameters:
              weight: 1.0
              density: 0.5
              epsilon: 0.1
          - model: platypus
            parameters:
              weight: 1.0
              density: 0.5
              epsilon: 0.1
        merge_method: della
        base_model: base
        parameters:
          lambda: 0.9
        """, "della", ("orca", "platypus"), "base", [1.0, 1.0],
        {"density": 0.5, "epsilon": 0.1, "normalize": True, "scale": 0.9, "seed": 0}),
    "della_linear": ("""
        models:
          - model: orca
            parameters:
              weight: 0.5
          - model: platypus
            parameters:
              weight: 0.5
        merge_method: della_linear
        base_model: base
        parameters:
          density: 0.4
          normalize: true
        """, "della_linear", ("orca", "platypus"), "base", [0.5, 0.5],
        {"density": 0.4, "epsilon": 0.15, "scale": 1.0, "seed": 0}),
    "slerp": ("""
        models:
          - model: orca
          - model: platypus
        merge_method: slerp
        base_model: orca
        parameters:
          t: 0.3
        dtype: float16
        """, "slerp", ("orca", "platypus"), None, None, {"t": 0.3}),
    "model_stock": ("""
        models:
          - model: orca
          - model: platypus
          - model: wizard
        merge_method: model_stock
        base_model: base
        parameters:
          filter_wise: false
        dtype: bfloat16
        """, "model_stock", ("orca", "platypus", "wizard"), "base", None, {"filter_wise": False}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_mergekit_config_runs_the_mapped_decomp_merge(folder, name):
    text, method, names, base, weights, parameters = CASES[name]
    config = write(folder, text, f"{name.replace(' ', '_')}.yml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = merge_recipe(config)
    assert ("int8_mask" in text) == any("int8_mask" in str(w.message) for w in caught)
    expected = decomp.merge(models(folder, *names), method=method, base=folder / base if base else None,
                            weights=weights, **parameters)
    assert_same(state, expected)
    assert state.recipe["method"] == method


def test_mergekit_ties_and_dare_ties_are_the_sum_or_the_mean_of_the_agreeing_entries():
    """mergekit's generalized task arithmetic: Σ w τ mask, divided by Σ w mask when normalize is true."""
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    weights = [1.0, 0.5, 0.3]
    weighted = torch.stack([w * t for w, t in zip(weights, taus)])
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    mask = (torch.sign(weighted) == majority).double()
    summed = (weighted * mask).sum(0)
    divisor = (torch.tensor(weights, dtype=torch.float64)[:, None, None] * mask).sum(0)
    torch.testing.assert_close(disjoint_mean(taus, weights, normalize=False), summed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(disjoint_mean(taus, weights), summed / torch.where(divisor == 0, 1.0, divisor),
                               rtol=1e-12, atol=1e-12)


def test_dtype_is_honoured_and_the_card_holds_the_mergekit_config(folder, tmp_path):
    from transformers import BertForSequenceClassification
    config = write(folder, CASES["ties"][0], "ties_saved.yml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = merge_recipe(config, tmp_path / "out")
    saved = BertForSequenceClassification.from_pretrained(tmp_path / "out", torch_dtype="auto")
    assert saved.dtype == torch.float16
    for key, value in saved.state_dict().items():
        assert torch.equal(value, state[key].to(torch.float16)), key
    card = (tmp_path / "out" / "README.md").read_text()
    assert '"merge_method": "ties"' in card and '"method": "ties"' in card and '"trim": "per_tensor"' in card
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_the_command_line_reads_a_mergekit_config(folder, tmp_path):
    from transformers import BertForSequenceClassification
    config = write(folder, CASES["task_arithmetic"][0], "cli.yml")
    result = subprocess.run([sys.executable, "-m", "decomp", "merge", str(config), "-o", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    saved = BertForSequenceClassification.from_pretrained(tmp_path / "out").state_dict()
    expected = decomp.merge(models(folder, "orca", "platypus"), method="task_arithmetic", base=folder / "base",
                            weights=[0.7, 0.3], scale=0.8)
    for key, value in expected.items():
        assert torch.equal(saved[key], value), key
    bad = write(folder, "models:\n  - model: orca\nmerge_method: nuslerp\n", "cli_bad.yml")
    result = subprocess.run([sys.executable, "-m", "decomp", "merge", str(bad), "-o", str(tmp_path / "never")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "'nuslerp' is not supported" in result.stderr, result.stderr
    assert not (tmp_path / "never").exists()


def fisher_file(folder, name, seed):
    from decomp.gradients.fisher import Fisher
    from transformers import BertForSequenceClassification
    model = BertForSequenceClassification.from_pretrained(folder / name)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.rand(p.shape, generator=g) for k, p in model.named_parameters()}
    path = folder / f"{name}.fisher.safetensors"
    if not path.exists():
        Fisher(tensors, kind="exact", num_examples=4, model=name).save(path)
    return path


def gram_file(folder, name, seed):
    from transformers import BertForSequenceClassification
    model = BertForSequenceClassification.from_pretrained(folder / name)
    g = torch.Generator().manual_seed(seed)
    grams = {}
    for module, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear):
            x = torch.randn(3 * layer.in_features, layer.in_features, generator=g, dtype=torch.float64)
            grams[module] = x.T @ x
    path = folder / f"{name}.grams.safetensors"
    save_file(grams, str(path))
    return path, grams


def test_fishers_or_grams_turn_a_linear_config_into_a_fisher_or_regmean_merge(folder):
    linear = CASES["linear"][0]
    fishers = [fisher_file(folder, n, i) for i, n in enumerate(("orca", "platypus", "wizard"))]
    config = write(folder, linear + "fishers: [orca.fisher.safetensors, platypus.fisher.safetensors, "
                   "wizard.fisher.safetensors]\n", "fisher.yml")
    state = merge_recipe(config)
    names = models(folder, "orca", "platypus", "wizard")
    assert_same(state, decomp.merge(names, method="fisher", weights=[1.0, 0.3, 0.5], fishers=fishers))
    grams = [gram_file(folder, n, i) for i, n in enumerate(("orca", "platypus", "wizard"))]
    config = write(folder, linear + "grams: [orca.grams.safetensors, platypus.grams.safetensors, "
                   "wizard.grams.safetensors]\n", "regmean.yml")
    state = merge_recipe(config)
    assert_same(state, decomp.merge(names, method="regmean", weights=[1.0, 0.3, 0.5], grams=[g for _, g in grams]))
    config = write(folder, """
        models:
          - model: orca
          - model: platypus
        merge_method: regmean
        parameters:
          alpha: 0.5
        grams: [orca.grams.safetensors, platypus.grams.safetensors]
        """, "regmean_direct.yml")
    assert_same(merge_recipe(config), decomp.merge(names[:2], method="regmean", alpha=0.5,
                                                   grams=[g for _, g in grams[:2]]))
    ours = write(folder, """
        method: regmean
        models: [orca, platypus]
        grams: [orca.grams.safetensors, platypus.grams.safetensors]
        parameters: {alpha: 0.5}
        dtype: bfloat16
        """, "regmean_decomp.yml")
    assert_same(merge_recipe(ours), decomp.merge(names[:2], method="regmean", alpha=0.5,
                                                 grams=[g for _, g in grams[:2]]))


# mergekit's own examples, unchanged, and the name of what decomp reports
UNSUPPORTED = {
    "examples/ties.yml (gradients, filters)": ("""
        models:
          - model: orca
            parameters:
              density: [1, 0.7, 0.1] # density gradient
              weight: 1.0
          - model: platypus
            parameters:
              density: 0.5
              weight: [0, 0.3, 0.7, 1] # weight gradient
          - model: wizard
            parameters:
              density: 0.33
              weight:
                - filter: mlp
                  value: 0.5
                - value: 0
        merge_method: ties
        base_model: base
        parameters:
          normalize: true
          int8_mask: true
        dtype: float16
        """, ValueError, "the entry of platypus: weight=\\[0, 0.3, 0.7, 1\\]: layer-wise gradients"),
    "examples/gradient-slerp.yml (slices)": ("""
        slices:
          - sources:
              - model: orca
                layer_range: [0, 2]
              - model: platypus
                layer_range: [0, 2]
        merge_method: slerp
        base_model: orca
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5 # fallback for rest of tensors
        dtype: float16
        """, ValueError, "slices \\(layer ranges"),
    "filtered t": ("models:\n  - model: orca\n  - model: platypus\nmerge_method: slerp\nbase_model: orca\n"
                   "parameters:\n  t:\n    - filter: self_attn\n      value: 0.2\n    - value: 0.5\n",
                   ValueError, "t=\\[.*layer-wise gradients and filtered values are not supported"),
    "per-model density": ("models:\n  - model: orca\n    parameters: {weight: 1.0, density: 0.5}\n"
                          "  - model: platypus\n    parameters: {weight: 1.0, density: 0.3}\n"
                          "merge_method: ties\nbase_model: base\n", ValueError,
                          "decomp does not support per-model density \\(orca: 0.5, platypus: 0.3\\); use one value"),
    "per-model epsilon": ("models:\n  - model: orca\n    parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}\n"
                          "  - model: platypus\n    parameters: {weight: 1.0, density: 0.5}\n"
                          "merge_method: della\nbase_model: base\n", ValueError,
                          "per-model epsilon \\(orca: 0.1, platypus: 0.15\\)"),
    "union tokenizer": ("models:\n  - model: orca\n    parameters: {weight: 1}\nmerge_method: linear\n"
                        "tokenizer_source: union\n", ValueError, "tokenizer_source: union"),
    "tokenizer tokens": ("models:\n  - model: orca\n    parameters: {weight: 1}\nmerge_method: linear\n"
                         "tokenizer:\n  source: base\n  tokens: {}\n", ValueError, "tokenizer: \\['tokens'\\]"),
    "tokenizer union by default": ("models:\n  - model: orca\n    parameters: {weight: 1}\nmerge_method: linear\n"
                                   "tokenizer: {}\n", ValueError, "tokenizer: source \\(mergekit's default\\): union"),
    "chat template": ("models:\n  - model: orca\n    parameters: {weight: 1}\nmerge_method: linear\n"
                      "chat_template: chatml\n", ValueError, "chat_template is not supported"),
    "dare without rescale": ("models:\n  - model: orca\n    parameters: {weight: 1, density: 0.5}\n"
                             "merge_method: dare_ties\nbase_model: base\nparameters: {rescale: false}\n",
                             ValueError, "rescale: false on 'dare_ties' is not supported"),
    "ties with rescale": ("models:\n  - model: orca\n    parameters: {weight: 1, density: 0.5}\n"
                          "merge_method: ties\nbase_model: base\nparameters: {rescale: true}\n",
                          ValueError, "rescale: true on 'ties' is not supported"),
    "linear sum": ("models:\n  - model: orca\n    parameters: {weight: 1}\n  - model: platypus\n"
                   "    parameters: {weight: 1}\nmerge_method: linear\nparameters: {normalize: false}\n",
                   ValueError, "normalize: false on linear"),
    "missing weight": ("models:\n  - model: orca\n  - model: platypus\n    parameters: {weight: 1}\n"
                       "merge_method: linear\n", ValueError, "needs a weight for every model .*orca has none"),
    "mergekit-only method": ("models:\n  - model: orca\nmerge_method: sce\nbase_model: base\n", ValueError,
                             "merge_method 'sce' is not supported \\(a mergekit method decomp does not have\\)"),
    "unknown parameter": ("models:\n  - model: orca\n    parameters: {weight: 1, densty: 0.5}\n"
                          "merge_method: ties\nbase_model: base\n", ValueError,
                          "takes no per-model parameter 'densty' \\(did you mean 'density'\\?\\)"),
    "both method keys": ("method: ties\nmodels:\n  - model: orca\nmerge_method: ties\nbase_model: base\n",
                         ValueError, "either decomp's method: or mergekit's merge_method:"),
    "unknown key": ("models:\n  - model: orca\nmerge_method: linear\nbase_modle: base\n", ValueError,
                    "unknown key 'base_modle' .*did you mean 'base_model'"),
    "hub name": ("models:\n  - model: mistralai/Mistral-7B-v0.1\n    parameters: {weight: 1}\n"
                 "merge_method: linear\n", FileNotFoundError,
                 "'mistralai/Mistral-7B-v0.1' is not a local folder .*does not download from the Hub"),
    "lora": ("models:\n  - model: orca+some/lora\n    parameters: {weight: 1}\nmerge_method: linear\n", ValueError,
             "LoRA references \\(model\\+lora\\) are not supported"),
    "slerp without base": ("models:\n  - model: orca\n  - model: platypus\nmerge_method: slerp\n"
                           "parameters: {t: 0.5}\n", ValueError, "'slerp' needs base_model"),
    "bad dtype": ("models:\n  - model: orca\n    parameters: {weight: 1}\nmerge_method: linear\ndtype: float8\n",
                  ValueError, "dtype must be one of .*got 'float8'"),
    "string lambda": ("models:\n  - model: orca\n    parameters: {weight: 1}\nmerge_method: task_arithmetic\n"
                      "base_model: base\nparameters: {lambda: big}\n", ValueError,
                      "lambda must be a number; got 'big'"),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_what_decomp_does_not_support_is_reported_by_name(folder, tmp_path, name):
    text, error, message = UNSUPPORTED[name]
    config = write(folder, text, "unsupported.yml")
    with pytest.raises(error, match=message):
        merge_recipe(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_harmless_options_are_warnings(folder):
    config = write(folder, """
        models:
          - model: orca
            parameters:
              weight: 1.0
              density: 0.5
        merge_method: task_arithmetic
        base_model: base
        parameters:
          int8_mask: true
          rescale: true
        """, "harmless.yml")
    with pytest.warns(UserWarning) as caught:
        state = merge_recipe(config)
    messages = " ".join(str(w.message) for w in caught)
    assert "int8_mask" in messages and "rescale has no effect" in messages and "density has no effect" in messages
    assert_same(state, decomp.merge(models(folder, "orca"), method="task_arithmetic", base=folder / "base",
                                    weights=[1.0]))


def test_tokenizer_source_and_the_donor_config(folder, tmp_path):
    config = write(folder, CASES["task_arithmetic"][0] + "tokenizer_source: platypus\n", "tokenizer.yml")
    merge_recipe(config, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    decomp_recipe = json.loads(card.split("```json")[1].split("```")[0])["decomp"]
    assert decomp_recipe["like"].endswith("base") and decomp_recipe["tokenizer"].endswith("platypus")
    assert (tmp_path / "out" / "tokenizer.json").exists()
