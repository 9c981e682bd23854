"""Square Conv1D weights (GPT-2's attn.c_proj, stored [in, out]) in the Gram-based merges: the layout comes from
collect_grams' record or from the sources' modules, never guessed from a square shape."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import decomp

KEY = "transformer.h.0.attn.c_proj.weight"
MODULE = KEY.rsplit(".", 1)[0]


@pytest.fixture(scope="module")
def gpt2s():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
                        eos_token_id=0)
    base, *models = [GPT2LMHeadModel(config).eval() for _ in range(4)]
    data = [{"input_ids": torch.randint(0, 50, (5, 9)), "attention_mask": torch.ones(5, 9, dtype=torch.long)}]
    data[0]["attention_mask"][1, 6:] = 0
    grams = [decomp.collect_grams(model, data, progress=False) for model in models]
    return base, models, grams


def test_collect_grams_records_which_weights_are_stored_in_out(gpt2s):
    _, _, grams = gpt2s
    assert isinstance(grams[0], decomp.Grams) and isinstance(grams[0], dict)
    assert grams[0].stored_in_out == {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                      "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"}


def test_regmean_of_a_square_conv1d_weight_solves_the_inputs_side(gpt2s, tmp_path):
    _, models, grams = gpt2s
    C = [g[MODULE] for g in grams]
    W = [m.state_dict()[KEY].double() for m in models]
    expected = torch.linalg.solve(sum(C), sum(c @ w for c, w in zip(C, W)))      # y = x W, W [in, out]
    folders = []
    for m, model in enumerate(models):
        model.save_pretrained(tmp_path / f"m{m}")
        folders.append(tmp_path / f"m{m}")
    plain = [dict(g) for g in grams]       # as safetensors' save_file keeps them: no record
    for sources, given in ((models, grams), (models, plain), (folders, plain), ([m.state_dict() for m in models], grams)):
        merged = decomp.merge(sources, method="regmean", grams=given, alpha=1.0)
        torch.testing.assert_close(merged[KEY].double(), expected, rtol=1e-6, atol=1e-7)
        assert KEY not in merged.notes
    # bare state dicts and bare Grams: the layout is unknown; taken as nn.Linear's, and said so
    guessed = decomp.merge([m.state_dict() for m in models], method="regmean", grams=plain, alpha=1.0)
    assert "unknown layout" in guessed.notes[KEY]


def test_data_tsv_of_a_square_conv1d_weight_is_the_transposed_linear_merge(gpt2s):
    base, models, grams = gpt2s
    conv1d = decomp.merge(models, method="data_tsv", base=base, grams=grams)
    # the same weights transposed into nn.Linear's [out, in], as bare state dicts (taken as nn.Linear's)
    as_linear = [{KEY: m.state_dict()[KEY].T.contiguous()} for m in models]
    linear = decomp.merge(as_linear, method="data_tsv", base={KEY: base.state_dict()[KEY].T.contiguous()},
                          grams=[{MODULE: g[MODULE]} for g in grams])
    torch.testing.assert_close(conv1d[KEY], linear[KEY].T, rtol=1e-6, atol=1e-7)


def test_grams_survive_torch_save_and_a_weights_only_load(gpt2s, tmp_path):
    _, _, grams = gpt2s
    torch.save(grams[0], tmp_path / "grams.pt")
    loaded = torch.load(tmp_path / "grams.pt", weights_only=True)
    assert isinstance(loaded, decomp.Grams) and loaded.stored_in_out == grams[0].stored_in_out
    assert set(loaded) == set(grams[0]) and all(torch.equal(loaded[k], grams[0][k]) for k in grams[0])
