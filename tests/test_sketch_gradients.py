"""sketch_gradients against the reference sketch of per-example gradients materialised by autograd."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import decomp
from decomp import reference
from decomp.gradients.sketch import derived_seed
from models import float64_copy, padded_batch, per_example_grads, reference_sketch, tiny

LENGTHS = [5, 3, 7, 1]
SMALL = dict(k_out=4, k_in=4, k_vector=64)   # tiny models: sides of 16+ get Kronecker blocks
# float32 against float64 through a forward, a backward and the projections: ~1e-6 relative per block
RELATIVE = 1e-5


def reference_rows(model, batch, sketch, output_kind="empirical"):
    """[N, K] float64: the decomp layout applied to per-example gradients from plain autograd."""
    model64 = float64_copy(model)
    per_example = [per_example_grads(model64, batch, n, kind=output_kind)[0][1]
                   for n in range(batch["input_ids"].shape[0])]
    return reference_sketch(per_example, sketch.blocks)


def assert_rows_close(features, expected, blocks):
    for block in blocks:
        got = features[:, block["start"]:block["start"] + block["size"]].double()
        want = expected[:, block["start"]:block["start"] + block["size"]]
        error = float((got - want).norm())
        assert error <= RELATIVE * float(want.norm()) + 1e-12, f"block {block['name']}: error {error:.3g}"


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "t5"])
def test_features_equal_reference_sketch_of_autograd_gradients(kind):
    model = tiny(kind)
    batch = padded_batch(kind, LENGTHS)
    sketch = decomp.sketch_gradients(model, [batch], output="logprob", progress=False, seed=3, **SMALL)
    kinds = {b["kind"] for b in sketch.blocks}
    assert kinds == {"kron", "vector"}
    assert sketch.features.shape == (4, sum(b["size"] for b in sketch.blocks))
    assert torch.equal(sketch.indices, torch.arange(4))
    assert_rows_close(sketch.features, reference_rows(model, batch, sketch), sketch.blocks)
    if kind == "bert":
        assert torch.equal(sketch.labels, batch["labels"]) and sketch.predictions.shape == (4,)
    else:
        assert sketch.labels is None and sketch.predictions is None


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_bfloat16_model_is_sketched_in_float32(kind):
    """A bfloat16 model keeps its rules (the audit allows bfloat16 rounding) and its rows match the float32
    model's on the same weights to bfloat16 accuracy (a few percent of each block's norm, see test_fisher.py)."""
    model16 = tiny(kind).to(torch.bfloat16)
    model32 = tiny(kind).to(torch.bfloat16).float()
    batch = padded_batch(kind, LENGTHS)
    sketch16 = decomp.sketch_gradients(model16, [batch], output="logprob", progress=False, seed=3, **SMALL)
    sketch32 = decomp.sketch_gradients(model32, [batch], output="logprob", progress=False, seed=3, **SMALL)
    assert sketch16.features.dtype == torch.float32
    assert not [rule for rule in sketch16.coverage.values() if rule.startswith("fallback")]
    for block in sketch32.blocks:
        got = sketch16.features[:, block["start"]:block["start"] + block["size"]]
        want = sketch32.features[:, block["start"]:block["start"] + block["size"]]
        assert float((got - want).norm()) <= 0.05 * float(want.norm()) + 1e-6, block["name"]


def test_second_stage_and_batch_split():
    model = tiny("bert")
    batch = padded_batch("bert", LENGTHS)
    full = decomp.sketch_gradients(model, [batch], progress=False, **SMALL)
    halves = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
    split = decomp.sketch_gradients(model, halves, progress=False, **SMALL)
    torch.testing.assert_close(split.features, full.features, rtol=1e-5, atol=1e-7)
    reduced = decomp.sketch_gradients(model, [batch], progress=False, k=24, **SMALL)
    expected = reference.sketch_dense(full.features.double(), k=24, seed=derived_seed(0, "second stage"))
    torch.testing.assert_close(reduced.features.double(), expected, rtol=1e-5, atol=1e-7)


def test_outputs_change_the_gradient_and_bad_outputs_are_rejected():
    model = tiny("bert")
    batch = padded_batch("bert", LENGTHS)
    gold = decomp.sketch_gradients(model, [batch], output="logprob", progress=False, **SMALL).features
    loss = decomp.sketch_gradients(model, [batch], output="loss", progress=False, **SMALL).features
    torch.testing.assert_close(loss, -gold)
    logit = decomp.sketch_gradients(model, [batch], output="logit", target=1, progress=False, **SMALL)
    assert not torch.allclose(logit.features, gold)
    with pytest.raises(ValueError, match="output must be one of"):
        decomp.sketch_gradients(model, [batch], output="margin", progress=False)
    with pytest.raises(ValueError, match="output='logit' is defined for sequence classification"):
        decomp.sketch_gradients(tiny("gpt2"), [padded_batch("gpt2", LENGTHS)], output="logit", progress=False)
    with pytest.raises(ValueError, match="k_out must be a positive int"):
        decomp.sketch_gradients(model, [batch], k_out=0, progress=False)


def test_save_load_roundtrip(tmp_path):
    sketch = decomp.sketch_gradients(tiny("bert"), [padded_batch("bert", LENGTHS)], progress=False, **SMALL)
    path = sketch.save(tmp_path / "sketch")
    loaded = decomp.GradientSketch.load(path)
    assert torch.equal(loaded.features, sketch.features) and torch.equal(loaded.labels, sketch.labels)
    assert loaded.blocks == sketch.blocks and loaded.config == sketch.config
    assert not (tmp_path / "sketch.partial").exists()


RESUME_SCRIPT = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
import decomp
from models import padded_batch, tiny

class Killing:
    def __iter__(self):
        for i, lengths in enumerate({batches!r}):
            if i == 2:
                os.kill(os.getpid(), signal.SIGKILL)   # mid-run, after two committed batches
            yield padded_batch("bert", lengths, seed=i)

decomp.sketch_gradients(tiny("bert"), Killing(), store={store!r}, progress=False, k_out=4, k_in=4, k_vector=64)
"""


def test_killed_run_resumes_to_identical_features(tmp_path):
    batches = [[5, 3], [7, 1], [2, 6], [4, 4]]
    data = [padded_batch("bert", lengths, seed=i) for i, lengths in enumerate(batches)]
    store = tmp_path / "store"
    script = RESUME_SCRIPT.format(tests=str(Path(__file__).parent), batches=batches, store=str(store))
    result = subprocess.run([sys.executable, "-c", script], timeout=300, capture_output=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    with open(store / "features.f32", "ab") as handle:   # a batch written but never committed
        handle.write(b"\x00" * 100)
    with pytest.raises(ValueError, match="unfinished run"):
        decomp.GradientSketch.load(store)
    resumed = decomp.sketch_gradients(tiny("bert"), data, store=store, progress=False, **SMALL)
    uninterrupted = decomp.sketch_gradients(tiny("bert"), data, progress=False, **SMALL)
    assert torch.equal(resumed.features, uninterrupted.features)
    assert torch.equal(resumed.indices, torch.arange(8))
    with pytest.raises(ValueError, match="different configuration"):
        decomp.sketch_gradients(tiny("bert"), data, store=store, progress=False, seed=1, **SMALL)


def test_text_datasets_are_tokenized_and_bad_columns_named():
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "[PAD] [UNK] the film was a fresh rotten plot summary of story".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    data = datasets.Dataset.from_dict({"review": ["the film was fresh", "a rotten plot", "story", "the summary"],
                                       "label": [0, 1, 2, 1]})
    model = tiny("bert")
    sketch = decomp.sketch_gradients(model, data, tokenizer=tokenizer, text_column="review", batch_size=3,
                                     progress=False, **SMALL)
    assert sketch.features.shape[0] == 4 and torch.equal(sketch.labels, torch.tensor([0, 1, 2, 1]))
    fisher = decomp.compute_fisher(model, data, tokenizer=tokenizer, text_column="review", kind="empirical",
                                   max_examples=2, progress=False)
    assert fisher.num_examples == 2
    with pytest.raises(ValueError, match="no text column 'text'"):
        decomp.sketch_gradients(model, data, tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match="pass tokenizer="):
        decomp.sketch_gradients(model, data, text_column="review", progress=False)
