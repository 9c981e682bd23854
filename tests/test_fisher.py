"""compute_fisher against a per-example autograd loop (batch size 1, float64, unpadded) on tiny models."""

import pytest
import torch

import decomp
from models import float64_copy, padded_batch, per_example_grads, tiny

LENGTHS = [5, 3, 7, 1]
# float32 forward/backward against float64 gives ~1e-6 relative; a dropped use or a wrong rule gives O(1).
RELATIVE = 1e-5
# gradients that are exactly zero in exact arithmetic (a key bias, under softmax's shift invariance) come out as
# float32 cancellation noise, ~(u * sum|G|)^2 ~ 1e-14 of the largest entries: the floor below is far above it
# and far below any real error.
FLOOR = 1e-9


def reference_fisher(model, batch, kind, seed=0):
    model64 = float64_copy(model)
    N = batch["input_ids"].shape[0]
    total = {name: torch.zeros_like(p) for name, p in model64.named_parameters()}
    for n in range(N):
        for weight, grads in per_example_grads(model64, batch, n, kind=kind, seed=seed):
            for name, g in grads.items():
                total[name] += weight * g * g
    return {name: t / N for name, t in total.items()}


def assert_fisher_close(fisher, expected):
    assert set(fisher) == set(expected)
    scale = max(float(t.abs().max()) for t in expected.values())
    for name, ref in expected.items():
        error = float((fisher[name].double() - ref).norm())
        assert error <= RELATIVE * float(ref.norm()) + FLOOR * scale * ref.numel() ** 0.5, \
            f"{name}: error {error:.3g}, reference norm {float(ref.norm()):.3g}"


CASES = [("bert", "exact"), ("bert", "empirical"), ("bert", "sampled"), ("gpt2", "empirical"), ("gpt2", "sampled"),
         ("llama", "empirical"), ("llama", "sampled"), ("t5", "empirical"), ("t5", "sampled")]


@pytest.mark.parametrize("kind,fisher_kind", CASES)
def test_fisher_equals_per_example_autograd(kind, fisher_kind):
    model = tiny(kind)
    batch = padded_batch(kind, LENGTHS)
    fisher = decomp.compute_fisher(model, [batch], kind=fisher_kind, progress=False)
    assert fisher.num_examples == len(LENGTHS) and fisher.kind == fisher_kind
    assert_fisher_close(fisher, reference_fisher(model, batch, fisher_kind))


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_left_padding_and_batch_split_give_the_same_fisher(kind):
    model = tiny(kind)
    right = padded_batch(kind, LENGTHS)
    expected = reference_fisher(model, right, "empirical")
    if kind != "bert":  # BERT pools position 0, so left padding changes its output; decoders pad either way
        left = padded_batch(kind, LENGTHS, left=True)
        for fisher_kind in ("empirical", "sampled"):
            assert_fisher_close(decomp.compute_fisher(model, [left], kind=fisher_kind, progress=False),
                                reference_fisher(model, right, fisher_kind))
    halves = [{k: v[:2] for k, v in right.items()}, {k: v[2:] for k, v in right.items()}]
    assert_fisher_close(decomp.compute_fisher(model, halves, kind="empirical", progress=False), expected)


# bfloat16 against float32 on the same (bfloat16-representable) weights: the forward and backward passes round to
# 8 bits of mantissa (eps = 2^-7), which compounds over the layers; the squares double the relative error. A few
# percent of each tensor's norm, with a floor for the gradients that vanish in exact arithmetic (a key bias) and
# in bfloat16 are rounding noise ~(eps * sum|G|)^2: a dropped use, or squares accumulated in bfloat16, is O(1).
BF16_RELATIVE = 0.08
BF16_FLOOR = 1e-4


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_bfloat16_model_keeps_its_rules_and_accumulates_in_float32(kind):
    model16 = tiny(kind).to(torch.bfloat16)
    model32 = tiny(kind).to(torch.bfloat16).float()      # the same weights, computed in float32
    batch = padded_batch(kind, LENGTHS)
    fisher16 = decomp.compute_fisher(model16, [batch], kind="empirical", progress=False)
    fisher32 = decomp.compute_fisher(model32, [batch], kind="empirical", progress=False)
    assert not [rule for rule in fisher16.coverage.values() if rule.startswith("fallback")]  # the audit keeps them
    assert all(t.dtype == torch.float32 for t in fisher16.values())
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())                     # the model is untouched
    scale = max(float(t.abs().max()) for t in fisher32.values())
    for name, ref in fisher32.items():
        error = float((fisher16[name] - ref).norm())
        assert error <= BF16_RELATIVE * float(ref.norm()) + BF16_FLOOR * scale * ref.numel() ** 0.5, \
            f"{name}: error {error:.3g}, float32 norm {float(ref.norm()):.3g}"
    # sums in float32: the mean over 16 copies of the batch is the batch's own to float32 rounding (sums kept in
    # bfloat16 would drift by ~eps = 0.8% as they grow)
    repeated = decomp.compute_fisher(model16, [batch] * 16, kind="empirical", progress=False)
    for name, once in fisher16.items():
        torch.testing.assert_close(repeated[name], once, rtol=1e-5, atol=1e-6 * scale)


def test_coverage_names_every_parameter_and_its_rule():
    gpt2 = decomp.coverage(tiny("gpt2"))
    assert gpt2["transformer.wte.weight"] == "embedding+linear"      # tied with lm_head, summed before squaring
    assert gpt2["transformer.h.0.attn.c_attn.weight"] == "conv1d"
    assert gpt2["transformer.h.0.ln_1.weight"] == "norm" and gpt2["transformer.h.0.ln_1.bias"] == "bias"
    llama = decomp.coverage(tiny("llama"))
    assert llama["model.layers.0.input_layernorm.weight"] == "norm"
    t5 = tiny("t5")
    static = decomp.coverage(t5)
    assert set(static) == {name for name, _ in t5.named_parameters()}
    audited = decomp.coverage(t5, [padded_batch("t5", LENGTHS)])
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert static[bias] == "embedding" and audited[bias].startswith("fallback")  # its ids have no batch dimension
    assert audited["shared.weight"] == "embedding+linear"


def test_frozen_parameters_are_left_out_and_the_model_is_restored():
    model = tiny("bert")
    model.train()
    model.bert.embeddings.requires_grad_(False)
    fisher = decomp.compute_fisher(model, [padded_batch("bert", LENGTHS)], kind="empirical", progress=False)
    assert not any(name.startswith("bert.embeddings") for name in fisher)
    assert model.training and all(p.requires_grad == (not n.startswith("bert.embeddings"))
                                  for n, p in model.named_parameters())


def test_fisher_save_load_roundtrip(tmp_path):
    model = tiny("bert")
    fisher = decomp.compute_fisher(model, [padded_batch("bert", LENGTHS)], kind="exact", progress=False)
    path = fisher.save(tmp_path / "fisher.safetensors")
    loaded = decomp.Fisher.load(path)
    assert loaded.kind == "exact" and loaded.num_examples == 4 and loaded.coverage == fisher.coverage
    assert all(torch.equal(loaded[name], fisher[name]) for name in fisher)
    assert not list(tmp_path.glob("*.partial"))


def test_bad_input_gives_clear_errors():
    model = tiny("bert")
    batch = padded_batch("bert", LENGTHS)
    with pytest.raises(ValueError, match="no examples"):
        decomp.compute_fisher(model, [], progress=False)
    unlabeled = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(ValueError, match="needs gold labels"):
        decomp.compute_fisher(model, [unlabeled], kind="empirical", progress=False)
    with pytest.raises(ValueError, match="kind must be"):
        decomp.compute_fisher(model, [batch], kind="diagonal", progress=False)
    with pytest.raises(ValueError, match="whole vocabulary"):
        decomp.compute_fisher(tiny("gpt2"), [padded_batch("gpt2", LENGTHS)], kind="exact", progress=False)
    poisoned = tiny("bert")
    with torch.no_grad():
        poisoned.classifier.bias[1] = float("nan")
    with pytest.raises(FloatingPointError, match="example 0"):
        decomp.compute_fisher(poisoned, [batch], kind="empirical", progress=False)


class ToyForSequenceClassification(torch.nn.Module):
    """Uses its embedding matrix a second time outside any module (a functional tie no hook sees)."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"is_encoder_decoder": False, "_name_or_path": "toy"})()
        self.embed = torch.nn.Embedding(11, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, input_ids, attention_mask):
        hidden = self.embed(input_ids) * attention_mask[..., None]
        pooled = hidden.sum(1) / attention_mask.sum(1, keepdim=True)
        tied = torch.nn.functional.linear(pooled, self.embed.weight[:3, :])  # unseen use of embed.weight
        return type("Output", (), {"logits": self.head(pooled) + tied})()


def test_audit_moves_an_unseen_functional_use_to_the_exact_fallback():
    torch.manual_seed(0)
    model = ToyForSequenceClassification()
    batch = {"input_ids": torch.randint(0, 11, (5, 4)), "attention_mask": torch.ones(5, 4, dtype=torch.long),
             "labels": torch.randint(0, 3, (5,))}
    batch["attention_mask"][2, 2:] = 0
    fisher = decomp.compute_fisher(model, [batch], kind="empirical", progress=False)
    assert fisher.coverage["embed.weight"].startswith("fallback: audit")
    assert fisher.coverage["head.weight"] == "linear"
    expected = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in model.named_parameters()}
    model64 = ToyForSequenceClassification().double()
    model64.load_state_dict(model.state_dict())
    for n in range(5):
        keep = batch["attention_mask"][n].bool()
        logits = model64(batch["input_ids"][n:n + 1, keep], batch["attention_mask"][n:n + 1, keep]).logits
        grads = torch.autograd.grad(logits.log_softmax(-1)[0, batch["labels"][n]], list(model64.parameters()))
        for (name, _), g in zip(model64.named_parameters(), grads):
            expected[name] += g * g / 5
    assert_fisher_close(fisher, expected)


def test_a_parameter_moved_to_the_fallback_leaves_the_hooks_of_its_module():
    """The hooks remember which of a module's parameters a rule covers; moving one to the fallback (by the audit or
    mid-pass) must reach the next lookup, else its module would still be captured for it."""
    from decomp.gradients.capture import GradientCapture
    capture = GradientCapture(ToyForSequenceClassification())
    head = capture.model.head
    assert [name for name, _, _ in capture._ruled(head)] == ["head.weight", "head.bias"]
    capture._demote(["head.weight"], "for the test")
    assert [name for name, _, _ in capture._ruled(head)] == ["head.bias"]
    assert capture.coverage()["head.weight"] == "fallback: for the test"


class SharedTableToyForSequenceClassification(torch.nn.Module):
    """One [7, 5] table looked up twice and, with heads, used as two output layers (an LM's tied embedding/head)."""

    def __init__(self, heads: bool):
        super().__init__()
        self.config = type("Config", (), {"is_encoder_decoder": False, "_name_or_path": "toy"})()
        self.first = torch.nn.Embedding(7, 5)
        self.second = torch.nn.Embedding(7, 5)
        self.second.weight = self.first.weight
        self.mix = torch.nn.Linear(5, 7)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(5, 7, bias=False) for _ in range(2 if heads else 0))
        for head in self.heads:
            head.weight = self.first.weight

    def forward(self, input_ids, attention_mask):
        mask = attention_mask[..., None].to(self.first.weight.dtype)
        hidden = torch.tanh(self.first(input_ids) + self.second((3 * input_ids + 1) % 7)) * mask
        logits = self.mix(hidden.sum(1) / mask.sum(1))
        for head in self.heads:
            logits = logits + (head(hidden) * mask).sum(1) / mask.sum(1)
        return type("Output", (), {"logits": logits})()


@pytest.mark.parametrize("heads", [True, False])
def test_a_table_looked_up_twice_and_tied_to_heads_is_squared_after_summing_its_uses(heads):
    torch.manual_seed(3)
    model = SharedTableToyForSequenceClassification(heads)
    ids = torch.tensor([[1, 1, 4, 1, 0], [2, 6, 2, 5, 3], [0, 3, 0, 0, 6], [5, 4, 4, 1, 2]])   # repeated rows
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 6, 3, 2])}
    fisher = decomp.compute_fisher(model, [batch], kind="empirical", progress=False)
    assert fisher.coverage["first.weight"] == ("embedding+linear" if heads else "embedding")
    model64 = SharedTableToyForSequenceClassification(heads).double()
    model64.load_state_dict(model.state_dict())
    expected = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in model64.named_parameters()}
    for n in range(len(ids)):
        keep = mask[n].bool()
        logits = model64(ids[n:n + 1, keep], mask[n:n + 1, keep]).logits
        grads = torch.autograd.grad(logits.log_softmax(-1)[0, batch["labels"][n]], list(model64.parameters()))
        for (name, _), g in zip(model64.named_parameters(), grads):
            expected[name] += g * g / len(ids)
    assert_fisher_close(fisher, expected)
