"""The token outputs of language models: TokenLogProbs against the log_softmax it replaces, in float64."""

import pytest
import torch

from decomp.gradients import outputs
from decomp.gradients.outputs import TokenLogProbs, terms


def oracle(logits, targets, weights):
    """Σ_t w log softmax(z)[y], through the [N, L, V] log-probabilities, in float64."""
    log_probs = logits.double().log_softmax(-1)
    return (log_probs.gather(-1, targets[..., None]).squeeze(-1) * weights.double()).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 50), (1, 1, 5), (2, 5, 1)])
def test_token_log_probs_match_log_softmax_in_chunks(monkeypatch, dtype, shape):
    monkeypatch.setattr(outputs, "CHUNK_ENTRIES", 64)   # rows split across chunks, a chunk of one row at V=50
    generator = torch.Generator().manual_seed(sum(shape))
    N, L, V = shape
    logits = (4 * torch.randn(N, L, V, generator=generator)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N, L), generator=generator)
    weights = torch.rand(N, L, generator=generator) * (torch.rand(N, L, generator=generator) > 0.3)
    upstream = torch.randn(N, generator=generator)
    value = TokenLogProbs.apply(logits, targets, weights)
    (gradient,) = torch.autograd.grad((value * upstream).sum(), logits)
    exact = logits.detach().double().requires_grad_()
    expected = oracle(exact, targets, weights)
    (expected_gradient,) = torch.autograd.grad((expected * upstream.double()).sum(), exact)
    assert value.dtype == torch.float32 and gradient.dtype == dtype
    # float32 rounding of a logsumexp over V entries of size ~10, and of each softmax entry
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5 * L)
    tolerance = 1e-6 if dtype == torch.float32 else 8e-3   # bfloat16 stores the gradient with 8 bits
    torch.testing.assert_close(gradient.double(), expected_gradient, rtol=tolerance, atol=tolerance)


def test_token_log_probs_ignore_what_masked_positions_hold():
    logits = torch.randn(2, 4, 6, requires_grad=True)
    weights = torch.ones(2, 4)
    weights[1, 2:] = 0
    with torch.no_grad():
        poisoned = logits.detach().clone()
        poisoned[1, 2:] = 1e30
    first = TokenLogProbs.apply(logits, torch.zeros(2, 4, dtype=torch.long), weights)
    second = TokenLogProbs.apply(poisoned.requires_grad_(), torch.zeros(2, 4, dtype=torch.long), weights)
    torch.testing.assert_close(first, second)
    (gradient,) = torch.autograd.grad(second.sum(), poisoned)
    assert torch.isfinite(gradient).all() and not gradient[1, 2:].any()


@pytest.mark.parametrize("output", ["logprob", "loss", "predicted", "sampled"])
def test_causal_lm_terms_are_the_shifted_log_probabilities(output):
    generator = torch.Generator().manual_seed(3)
    N, T, V = 3, 6, 11
    logits = torch.randn(N, T, V, generator=generator, dtype=torch.float64).float().requires_grad_()
    ids = torch.randint(0, V, (N, T), generator=generator)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[0, :2] = 0   # left padding
    mask[2, 4:] = 0   # right padding
    batch = {"input_ids": ids, "attention_mask": mask}
    (value,) = terms("causal_lm", logits, batch, torch.arange(N), output=output, seed=5)
    (gradient,) = torch.autograd.grad(value.sum(), logits)
    # by hand: position t predicts token t + 1 where both are real; the last position predicts nothing
    log_probs = logits.detach().double()[:, :-1].log_softmax(-1).requires_grad_()
    real = mask.bool()[:, 1:] & mask.bool()[:, :-1]
    targets = ids[:, 1:]
    if output == "predicted":
        targets = log_probs.argmax(-1)
    elif output == "sampled":
        positions = (mask.cumsum(1)[:, :-1] - 1).clamp(min=0)
        targets = outputs._sample(log_probs.float(), outputs.uniforms(5, torch.arange(N), positions))
    picked = (log_probs.gather(2, targets[..., None]).squeeze(-1) * real).sum(1)
    if output == "loss":
        picked = -picked / real.sum(1)
    torch.testing.assert_close(value.double(), picked.detach(), rtol=1e-6, atol=1e-6)
    (by_hand,) = torch.autograd.grad(picked.sum(), log_probs)
    expected = torch.zeros(N, T, V, dtype=torch.float64)
    expected[:, :-1] = by_hand - by_hand.sum(-1, keepdim=True) * log_probs.detach().exp()   # through log_softmax
    torch.testing.assert_close(gradient.double(), expected, rtol=1e-6, atol=1e-6)
