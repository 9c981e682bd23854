"""Tiny random Hugging Face models built from configs, padded batches, and the per-example autograd oracle."""

from __future__ import annotations

import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, T5Config, T5ForConditionalGeneration)

import decomp
from decomp.gradients.outputs import _sample, uniforms
from decomp.kernels.hashing import STREAM_KRON_IN, STREAM_KRON_OUT

VOCAB = 61


def tiny(kind: str, seed: int = 0, num_labels: int = 3):
    torch.manual_seed(seed)
    if kind == "bert":
        config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=24, max_position_embeddings=40, num_labels=num_labels, type_vocab_size=2)
        model = BertForSequenceClassification(config)
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=40,
                            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(config)
    elif kind == "t5":
        config = T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2,
                          relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0)
        model = T5ForConditionalGeneration(config)
    elif kind == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=40)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # random biases and norm scales, so that no rule passes by their default values
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def padded_batch(kind: str, lengths, *, left: bool = False, seed: int = 1) -> dict:
    """Random token ids padded to the longest example (pad id 0, never drawn as a real token)."""
    g = torch.Generator().manual_seed(seed)
    N, T = len(lengths), max(lengths)
    ids = torch.zeros(N, T, dtype=torch.long)
    mask = torch.zeros(N, T, dtype=torch.long)
    for n, L in enumerate(lengths):
        where = slice(T - L, T) if left else slice(0, L)
        ids[n, where] = torch.randint(1, VOCAB, (L,), generator=g)
        mask[n, where] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind == "bert":
        batch["labels"] = torch.randint(0, 3, (N,), generator=g)
        batch["token_type_ids"] = (torch.arange(T)[None, :] >= T // 2).long().expand(N, T).clone() * mask
    elif kind == "t5":
        labels = torch.randint(1, VOCAB, (N, 5), generator=g)
        labels[0, 3:] = -100
        batch["labels"] = labels
    return batch


def example(batch: dict, n: int) -> dict:
    """Example n alone, without its padding."""
    keep = batch["attention_mask"][n].bool()
    single = {k: v[n:n + 1][:, keep] for k, v in batch.items() if k in ("input_ids", "attention_mask",
                                                                         "token_type_ids")}
    if "labels" in batch:
        labels = batch["labels"][n:n + 1]
        single["labels"] = labels[:, labels[0] != -100] if labels.dim() == 2 else labels
    return single


def log_probs_and_targets(model, single: dict):
    """(log-probs [P, C], gold targets [P]) of the P predicted positions of one unpadded example, float64."""
    if isinstance(model, BertForSequenceClassification):
        logits = model(input_ids=single["input_ids"], attention_mask=single["attention_mask"],
                       token_type_ids=single["token_type_ids"]).logits
        return logits.log_softmax(-1), single["labels"]
    if isinstance(model, T5ForConditionalGeneration):
        logits = model(input_ids=single["input_ids"], attention_mask=single["attention_mask"],
                       labels=single["labels"]).logits[0]
        return logits.log_softmax(-1), single["labels"][0]
    logits = model(input_ids=single["input_ids"], attention_mask=single["attention_mask"]).logits[0]
    return logits[:-1].log_softmax(-1), single["input_ids"][0, 1:]


def per_example_grads(model64, batch: dict, n: int, *, kind: str, seed: int = 0, index: int = None):
    """[(weight, {name: gradient})] of example n, by plain autograd on the unpadded example: one entry per class
    for exact (weighted by p), one for the gold labels (empirical) or for labels drawn like decomp draws them."""
    single = example(batch, n)
    log_probs, gold = log_probs_and_targets(model64, single)
    params = dict(model64.named_parameters())
    index = n if index is None else index
    if kind == "empirical":
        choices = [(1.0, gold)]
    elif kind == "sampled":
        u = uniforms(seed, torch.tensor([index]), torch.arange(log_probs.shape[0]))[0]
        choices = [(1.0, _sample(log_probs.detach(), u))]
    else:
        p = log_probs.detach().exp()[0]
        choices = [(float(p[c]), torch.tensor([c])) for c in range(p.shape[0])]
    result = []
    for weight, targets in choices:
        total = log_probs.gather(1, targets.view(-1, 1)).sum()
        grads = torch.autograd.grad(total, list(params.values()), retain_graph=True, allow_unused=True)
        result.append((weight, {name: torch.zeros_like(p) if g is None else g
                                for (name, p), g in zip(params.items(), grads)}))
    return result


def float64_copy(model):
    copy = type(model)(model.config).double().eval()
    copy.load_state_dict(model.state_dict())
    return copy


def reference_sketch(per_example: list, blocks: list) -> torch.Tensor:
    """The sketch layout `blocks` applied to materialised per-example gradients (float64, the oracle's projections)."""
    rows = []
    for grads in per_example:
        parts = []
        for block in blocks:
            if block["kind"] == "kron":
                rows_, cols = block["shape"]
                S_out = decomp.reference.projection_matrix(block["k_out"], rows_, seed=block["seed"], stream=STREAM_KRON_OUT,
                                                    dtype=torch.float64)
                S_in = decomp.reference.projection_matrix(block["k_in"], cols, seed=block["seed"], stream=STREAM_KRON_IN,
                                                   dtype=torch.float64)
                parts.append((S_out @ grads[block["name"]] @ S_in.T).reshape(-1))
            else:
                flat = torch.cat([grads[m["name"]].reshape(-1) for m in block["members"]])
                parts.append(decomp.reference.sketch_dense(flat[None], k=block["size"], seed=block["seed"])[0])
        rows.append(torch.cat(parts))
    return torch.stack(rows)
