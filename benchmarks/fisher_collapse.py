"""Why Fisher merging collapsed on review_or_plot in the merging benchmark (issue #19, item 2): Fisher mass and each
model's effective share of the merge, the per-example spread of squared gradient norms, merged accuracy as the Fisher
estimate grows and under the fisher method's options, and a remedy chosen on validation next to task arithmetic.

    python benchmarks/fisher_collapse.py [--examples 100 300 1000] [--exact 100] [--spread 100] [--tasks ...]
    python benchmarks/fisher_collapse.py --render     # the md and figure again from the saved json

Reads the seed-0 fine-tunes of the merging benchmark (benchmarks/.cache/merging/seed0/models, never written here).
Writes benchmarks/results/fisher_collapse.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
import _harness as h  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODELS = Path(__file__).resolve().parent / ".cache" / "merging" / "seed0" / "models"
HEAD = "classifier."
MAX_LENGTH, FISHER_BATCH, EVAL_BATCH = 64, 32, 64
SCALES = [1, 2, 3, 4, 6, 8]
LAMBDAS = [0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0]
GROUPS = ["word embeddings", "position embeddings", "type embeddings", "query", "key", "value", "attention output",
          "FFN intermediate", "FFN output", "LayerNorms", "pooler", "classifier head (not merged)"]


def group_of(key: str) -> str:
    """The layer type of a BertForSequenceClassification parameter name."""
    rules = [("classifier.", "classifier head (not merged)"), ("LayerNorm", "LayerNorms"),
             ("word_embeddings", "word embeddings"), ("position_embeddings", "position embeddings"),
             ("token_type_embeddings", "type embeddings"), ("attention.self.query", "query"),
             ("attention.self.key", "key"), ("attention.self.value", "value"),
             ("attention.output.dense", "attention output"), ("intermediate.dense", "FFN intermediate"),
             ("output.dense", "FFN output"), ("pooler.", "pooler")]
    return next(group for pattern, group in rules if pattern in key)


# ---- data ---------------------------------------------------------------------------------------------------------

def batches(tokenizer, texts, labels, size: int, sort: bool = False) -> list:
    """Tokenized batches with labels. sort=True orders the examples by length first (less padding: evaluation only,
    where the order does not matter; predictions of padded and unpadded examples agree)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i])) if sort else list(range(len(texts)))
    out = []
    for start in range(0, len(order), size):
        rows = order[start:start + size]
        encoded = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=MAX_LENGTH,
                            return_tensors="pt")
        out.append({**encoded, "labels": torch.tensor([labels[i] for i in rows])})
    return out


def load_data(names: list, tokenizer, limits: dict) -> tuple:
    """task -> split -> (texts, labels) (the benchmark's fixed splits, validation and test cut to their first
    limits[split] examples when given: a busy 2-core machine scores a full test split in minutes), and the
    tokenized evaluation batches."""
    from decomp.app.tasks import BENCHMARK_TASKS, FULL, splits
    tasks = {t.name: t for t in BENCHMARK_TASKS}
    data = {name: splits(tasks[name], FULL) for name in tqdm(names, desc="splits")}
    data = {name: {split: tuple(x[:limits.get(split)] for x in part) for split, part in parts.items()}
            for name, parts in data.items()}
    evaluation = {name: {split: batches(tokenizer, *data[name][split], EVAL_BATCH, sort=True)
                         for split in ("validation", "test")} for name in names}
    return data, evaluation


# ---- per-model statistics ---------------------------------------------------------------------------------------

def fisher_sum(model, chunk: list, kind: str) -> dict:
    """Σ over the chunk's examples of the per-example squared gradients (compute_fisher gives the mean)."""
    import decomp
    count = sum(len(b["labels"]) for b in chunk)
    fisher = decomp.compute_fisher(model, chunk, kind=kind, progress=False)
    return {k: fisher[k] * count for k in fisher.keys()}


def add_into(total: dict, part: dict) -> dict:
    for k, v in part.items():
        total[k] = total[k] + v if k in total else v.clone()
    return total


def squared_norms(model, tokenizer, texts, labels) -> list:
    """Each example's squared gradient norm of log p(gold | x) (= the sum of its one-example empirical Fisher) by
    plain autograd, one example at a time: the word-embedding table's gradient is taken from its output (only the
    example's token rows are nonzero), which spares a dense 30522 x 384 gradient per example."""
    table = model.get_input_embeddings()
    table.weight.requires_grad_(False)
    seen = {}
    hook = table.register_forward_hook(lambda module, inputs, out: seen.setdefault("out", out.requires_grad_()))
    params = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    norms = []
    try:
        for i in tqdm(range(len(texts)), desc="  per-example norms", leave=False):
            seen.clear()
            batch = tokenizer(texts[i:i + 1], truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
            logits = model(**batch).logits
            loss = logits.log_softmax(-1)[0, labels[i]]
            p = logits.detach().softmax(-1)[0]
            grads = torch.autograd.grad(loss, [p for _, p in params] + [seen["out"]])
            tokens, where = batch["input_ids"][0].unique(return_inverse=True)
            per_token = torch.zeros(len(tokens), grads[-1].shape[-1]).index_add_(0, where, grads[-1][0])
            head = sum(float(g.double().square().sum()) for (k, _), g in zip(params, grads) if k.startswith(HEAD))
            rest = sum(float(g.double().square().sum()) for g in grads[:-1]) + float(per_token.double().square().sum())
            norms.append({"all": rest, "encoder": rest - head, "top": float(p.max()), "gold": float(p[labels[i]]),
                          "right": float(p.argmax() == labels[i])})
    finally:
        hook.remove()
        table.weight.requires_grad_(True)
    return norms


def empirical_fishers(model, tokenizer, texts, labels, stops: list) -> dict:
    """The empirical Fisher on the first n training examples for each n in stops (nested prefixes: each example's
    gradient taken once, the prefix means combined)."""
    total, fishers, done = {}, {}, 0
    for stop in stops:
        if stop > done:
            chunk = batches(tokenizer, texts[done:stop], labels[done:stop], FISHER_BATCH)
            add_into(total, fisher_sum(model, chunk, "empirical"))
            done = stop
        fishers[stop] = {k: v / stop for k, v in total.items()}
    return fishers


def measure(folder: Path, tokenizer, data: dict, args) -> tuple:
    """One fine-tune: its encoder and head, Fishers keyed (kind, nominal examples) (empirical prefixes, exact; a
    task with fewer training examples uses all it has), per-example norms, confidence on training examples."""
    from transformers import BertForSequenceClassification
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    texts, labels = data["train"]
    stops = sorted({min(n, len(texts)) for n in args.examples})
    spread = min(args.spread, len(texts))
    norms = squared_norms(model, tokenizer, texts[:spread], labels[:spread])
    prefixes = empirical_fishers(model, tokenizer, texts, labels, stops)
    fishers = {("empirical", n): prefixes[min(n, len(texts))] for n in args.examples}
    n_exact = min(args.exact, len(texts))
    exact = fisher_sum(model, batches(tokenizer, texts[:n_exact], labels[:n_exact], FISHER_BATCH), "exact")
    fishers[("exact", args.exact)] = {k: v / n_exact for k, v in exact.items()}
    # confidence on the examples of the per-example norms (their logits come with the gradients)
    stats = {"train examples": len(texts), "empirical examples": stops, "exact examples": n_exact,
             "spread examples": spread, "confidence": float(np.mean([n["top"] for n in norms])),
             "gold probability": float(np.mean([n["gold"] for n in norms])),
             "train accuracy": float(np.mean([n["right"] for n in norms])), "per-example norms": norms}
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(HEAD)}
    return stats, fishers, state, model.classifier


# ---- mass, shares, spread -----------------------------------------------------------------------------------------

def mass(fisher: dict) -> dict:
    """Total Fisher mass (sum of entries), the merged part's, and the share of each layer type."""
    per_group = {g: 0.0 for g in GROUPS}
    for k, v in fisher.items():
        per_group[group_of(k)] += float(v.double().sum())
    total = sum(per_group.values())
    return {"total": total, "merged": total - per_group[GROUPS[-1]],
            "shares": {g: per_group[g] / total if total > 0 else 0.0 for g in GROUPS}}


def spread_stats(norms: list) -> dict:
    """Distribution of per-example squared gradient norms (all parameters)."""
    values = np.sort(np.array([n["all"] for n in norms]))[::-1]
    top = max(1, int(round(0.1 * len(values))))
    median = float(np.median(values))
    return {"median": median, "p90": float(np.percentile(values, 90)), "max": float(values[0]),
            "max/median": float(values[0] / median) if median > 0 else float("inf"),
            "top 10% share": float(values[:top].sum() / values.sum()),
            "encoder share of norm": float(sum(n["encoder"] for n in norms) / sum(n["all"] for n in norms))}


def per_tensor_normalised(fisher: dict) -> dict:
    """Each tensor of a Fisher divided by its mean: every model brings the same mass to every tensor."""
    return {k: v / v.mean() if float(v.mean()) > 0 else v for k, v in fisher.items()}


def globally_normalised(fisher: dict) -> dict:
    """The fisher method's normalize=True: the Fisher divided by its mean over the merged tensors."""
    mean = sum(float(v.double().sum()) for v in fisher.values()) / sum(v.numel() for v in fisher.values())
    return {k: v / mean for k, v in fisher.items()}


def shares(fishers: list, states: list, base: dict) -> dict:
    """Each model's effective share of a Fisher merge, w_m = F_m / Σ_k F_k entry by entry (1/M where every F is zero:
    the merge averages there): its mean over merged entries per layer type and overall (with and without the word
    embeddings, frozen in fine-tuning, so identical in every model); `own`, the τ_m²-weighted mean of w_m (the
    fraction of its own task vector τ_m that the merge keeps); `projection`, <θ_F - θ_0, τ_m> / |τ_m|² (the others'
    task vectors included); `sum projection`, <Σ_k τ_k, τ_m> / |τ_m|² (task arithmetic's is λ times it)."""
    M = len(states)
    per_group = {g: [np.zeros(M), 0] for g in GROUPS[:-1]}
    own_group = {g: [np.zeros(M), np.zeros(M)] for g in GROUPS[:-1]}   # Σ w τ², Σ τ² per layer type
    own, norm2, projection, sum_projection = (np.zeros(M) for _ in range(4))
    for key in base:
        F = torch.stack([f[key] for f in fishers]).float()
        total = F.sum(0)
        w = torch.where(total > 0, F / torch.where(total > 0, total, torch.ones_like(total)), torch.full_like(F, 1 / M))
        tau = torch.stack([s[key] - base[key] for s in states]).float()
        flat = lambda x: x.flatten(1).double().sum(1).numpy()  # noqa: E731 - per-model sums
        group = per_group[group_of(key)]
        group[0] += flat(w)
        group[1] += w[0].numel()
        own_group[group_of(key)][0] += flat(w * tau.square())
        own_group[group_of(key)][1] += flat(tau.square())
        own += flat(w * tau.square())
        norm2 += flat(tau.square())
        projection += flat((w * tau).sum(0) * tau)
        sum_projection += flat(tau.sum(0) * tau)
        del F, w, tau
    groups = {g: (s / n).tolist() for g, (s, n) in per_group.items() if n}
    counts = {g: n for g, (_, n) in per_group.items()}
    merged = sum(counts.values())
    overall = sum(np.array(groups[g]) * counts[g] for g in groups) / merged
    rest = merged - counts["word embeddings"]
    without = (overall * merged - np.array(groups["word embeddings"]) * counts["word embeddings"]) / rest
    safe = np.where(norm2 > 0, norm2, 1.0)
    return {"mean share": overall.tolist(), "mean share without word embeddings": without.tolist(),
            "per layer type": groups, "own": (own / safe).tolist(),
            "own per layer type": {g: (a / np.where(b > 0, b, 1.0)).tolist() for g, (a, b) in own_group.items()
                                   if b.sum() > 0}, "projection": (projection / safe).tolist(),
            "sum projection": (sum_projection / safe).tolist()}


def formula_check(merged: dict, fishers: list, states: list, keys: list) -> float:
    """Largest |library merge - Σ F_m θ_m / Σ F_m| over a few tensors (is the collapse a bug of the merge?)."""
    worst = 0.0
    for key in keys:
        F = torch.stack([f[key] for f in fishers]).double()
        theta = torch.stack([s[key] for s in states]).double()
        manual = (F * theta).sum(0) / F.sum(0)
        ok = F.sum(0) > 0
        worst = max(worst, float((merged[key].double() - manual)[ok].abs().max()))
    return worst


# ---- merging and scoring ----------------------------------------------------------------------------------------

class Scorer:
    """One model evaluates every merged encoder, each task's own head swapped in; validation and test accuracy."""

    def __init__(self, folder: Path, heads: dict, evaluation: dict):
        from transformers import BertForSequenceClassification
        self.model = BertForSequenceClassification.from_pretrained(folder).eval()
        self.heads, self.evaluation = heads, evaluation
        self.seconds = 0.0

    def __call__(self, encoder: dict, split: str, names=None) -> dict:
        """Accuracy per task (and their mean) of `encoder` with each task's own head, on `names` (default all)."""
        start = time.perf_counter()
        missing, unexpected = self.model.load_state_dict(encoder, strict=False)
        if unexpected or any(not k.startswith(HEAD) for k in missing):
            raise ValueError(f"merged encoder does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
        result = {name: self.task(name, split) for name in (names or self.heads)}
        result["mean"] = float(np.mean(list(result.values())))
        self.seconds += time.perf_counter() - start
        return result

    @torch.no_grad()
    def task(self, name: str, split: str) -> float:
        self.model.classifier = self.heads[name]
        right = total = 0
        for batch in self.evaluation[name][split]:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            right += int((self.model(**inputs).logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
        return right / total


def merged_encoder(states: list, method: str, **kwargs) -> dict:
    import decomp
    return dict(decomp.merge(states, method=method, heads="per_task", **kwargs))


def rescaled(base: dict, unit: dict, s: float) -> dict:
    """θ_0 + s·(θ - θ_0): a merge's task vector scaled."""
    return {k: base[k] + s * (v - base[k]) if v.is_floating_point() else v for k, v in unit.items()}


def fixed_settings(states: list, fishers: dict, reference: tuple, score, bar, test_all: bool) -> list:
    """Plain averaging, the fisher method as the estimate grows, and its options at the benchmark's size: each
    merged once and scored on validation; on test too for averaging and the benchmark's Fisher (all: test_all)."""
    ref, name = fishers[reference], f"Fisher {reference[0]}, {reference[1]} ex."
    exact = next(key for key in fishers if key[0] == "exact")
    settings = [("average", "average", {}, True)]
    settings += [(f"Fisher {kind}, {n} ex.", "fisher", {"fishers": fishers[(kind, n)]}, (kind, n) == reference)
                 for kind, n in fishers if kind == "empirical"]
    settings += [(f"{name}, normalize", "fisher", {"fishers": ref, "normalize": True}, False),
                 (f"{name}, floor_relative=1", "fisher", {"fishers": ref, "floor_relative": 1.0}, False),
                 (f"Fisher exact, {exact[1]} ex.", "fisher", {"fishers": fishers[exact]}, False)]
    rows = []
    for label, method, kwargs, test in settings:
        bar.set_postfix_str(label)
        encoder = merged_encoder(states, method, **kwargs)
        rows.append({"label": label, "validation": score(encoder, "validation"),
                     **({"test": score(encoder, "test")} if test or test_all else {})})
        bar.update(1)
    return rows


def searched(label: str, base: dict, unit: dict, grid: list, score, bar, known=None) -> dict:
    """A merge's task vector scaled by each value of `grid`, scored on validation (`known`: scale -> a validation
    result already taken); the best one also on test."""
    curve = []
    for s in grid:
        bar.set_postfix_str(f"{label} x{s}")
        result = (known or {}).get(s) or score(rescaled(base, unit, s), "validation")
        curve.append({"scale": s, "validation": result})
        bar.update(1)
    best = max(curve, key=lambda c: c["validation"]["mean"])
    return {"label": label, "curve": curve, "chosen": best["scale"], "validation": best["validation"],
            "test": score(rescaled(base, unit, best["scale"]), "test")}


# ---- the run ----------------------------------------------------------------------------------------------------

def encoders_only(fishers: list) -> list:
    """The fishers without the heads (kept per task, never merged), sharing the tensors."""
    return [{k: v for k, v in f.items() if not k.startswith(HEAD)} for f in fishers]


def statistics(args, tokenizer, data: dict) -> tuple:
    """Per model: statistics, Fishers (kind, examples) -> list over models, encoders, heads. The models are the
    benchmark's full-size fine-tunes (the cache also holds quick ones)."""
    from decomp.app.tasks import FULL
    stats, fishers, states, heads = {}, {}, [], {}
    for name in tqdm(args.tasks, desc="Fishers per model"):
        folder = MODELS / f"{name}-{FULL['train']}-{FULL['epochs']}-{FULL['learning_rate']}" if args.models is None \
            else args.models[args.tasks.index(name)]
        stats[name], found, state, heads[name] = measure(Path(folder), tokenizer, data[name], args)
        stats[name]["folder"] = str(folder)
        for key, value in found.items():
            fishers.setdefault(key, []).append(value)
        states.append(state)
    return stats, fishers, states, heads


def analyse(stats: dict, fishers: dict, states: list, base: dict, reference: tuple, exact: tuple) -> dict:
    """Mass per model (empirical and exact), spread, and effective shares under several weightings."""
    names = list(stats)
    out = {"mass": {f"{kind} {n}": {name: mass(f) for name, f in zip(names, fishers[(kind, n)])}
                    for kind, n in (reference, exact)},
           "spread": {name: spread_stats(stats[name]["per-example norms"]) for name in names}}
    ref = encoders_only(fishers[reference])
    # made one at a time (each rescaled variant is a copy of eight Fishers)
    variants = {"raw": lambda: ref, "normalize": lambda: [globally_normalised(f) for f in ref],
                "per-tensor normalised": lambda: [per_tensor_normalised(f) for f in ref],
                "exact raw": lambda: encoders_only(fishers[exact])}
    variants.update({f"empirical {n} raw": (lambda key=(kind, n): encoders_only(fishers[key])) for kind, n in fishers
                     if kind == "empirical" and (kind, n) != reference})
    out["shares"] = {label: shares(make(), states, base) for label, make in tqdm(variants.items(), desc="shares")}
    return out


def accuracies(args, states: list, fishers: dict, base: dict, score, reference: tuple) -> dict:
    """Each fine-tune on its own task, the fixed settings, task arithmetic and the remedies (scale on validation)."""
    names = list(score.heads)
    own = {split: {n: score(states[i], split, [n])[n] for i, n in enumerate(names)} for split in ("validation", "test")}
    for split in own:
        own[split]["mean"] = float(np.mean(list(own[split].values())))
    ref = encoders_only(fishers[reference])
    steps = 4 + len(args.examples) + len(LAMBDAS) + 2 * len(SCALES)
    with tqdm(total=steps, desc="merges scored") as bar:
        rows = fixed_settings(states, {k: encoders_only(v) for k, v in fishers.items()}, reference, score, bar,
                              args.test_all)
        unit = merged_encoder(states, "task_arithmetic", base=base, scale=1.0)
        arithmetic = searched("task arithmetic", base, unit, LAMBDAS, score, bar)
        raw = merged_encoder(states, "fisher", fishers=ref)
        check = formula_check(raw, ref, states, [k for k in base if "layer.0." in k or "pooler" in k])
        known = {1: next(r["validation"] for r in rows if r["label"] == f"Fisher {reference[0]}, {reference[1]} ex.")}
        remedies = [searched("Fisher task vector x s", base, raw, SCALES, score, bar, known)]
        del raw
        normalised = [per_tensor_normalised(f) for f in ref]
        unit = merged_encoder(states, "fisher", fishers=normalised)
        del normalised
        remedies.append(searched("Fisher task vector x s, per-tensor normalised", base, unit, SCALES, score, bar))
    chosen = max(remedies, key=lambda r: r["validation"]["mean"])
    return {"fine-tuned": own, "settings": rows, "task arithmetic": arithmetic, "remedies": remedies,
            "remedy chosen": chosen["label"], "formula check max abs difference": check}


def run(args) -> dict:
    from transformers import AutoTokenizer, BertForSequenceClassification
    from decomp.app import assets
    torch.manual_seed(0)
    start, timings = time.perf_counter(), {}
    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
    data, evaluation = load_data(args.tasks, tokenizer,
                                 {"validation": args.limit_validation, "test": args.limit_test})
    stats, fishers, states, heads = statistics(args, tokenizer, data)
    timings["Fishers, norms, confidence"] = time.perf_counter() - start
    pre_trained = BertForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2).state_dict()
    base = {k: v for k, v in pre_trained.items() if not k.startswith(HEAD)}
    reference, exact = ("empirical", args.reference), ("exact", args.exact)
    analysis = analyse(stats, fishers, states, base, reference, exact)
    # a checkpoint outside the results: the statistics survive if the scoring runs out of time
    Path("/tmp/fisher_collapse.partial.json").write_text(json.dumps(
        {"models": {n: {k: v for k, v in s.items() if k != "per-example norms"} for n, s in stats.items()},
         **analysis}, default=float))
    timings["mass and shares"] = time.perf_counter() - start - sum(timings.values())
    score = Scorer(Path(stats[args.tasks[0]]["folder"]), heads, evaluation)
    results = accuracies(args, states, fishers, base, score, reference)
    timings["merges and scoring"] = time.perf_counter() - start - sum(timings.values())
    timings["of which scoring"] = score.seconds
    for name in stats:
        stats[name]["squared norms"] = [n["all"] for n in stats[name].pop("per-example norms")]
    sizes = {name: {split: len(data[name][split][0]) for split in ("train", "validation", "test")} for name in stats}
    return {"machine": h.machine(), "wall seconds": time.perf_counter() - start, "timings": timings,
            "tasks": args.tasks, "sizes": sizes, "limits": {"validation": args.limit_validation, "test": args.limit_test},
            "reference": list(reference), "exact": list(exact),
            "examples": args.examples, "models": stats, **analysis, **results}


# ---- report -----------------------------------------------------------------------------------------------------

def model_rows(r: dict) -> list:
    """Per model: confidence, Fisher mass, and the share of its own task vector each weighting keeps."""
    names, ref, ex = r["tasks"], f"{r['reference'][0]} {r['reference'][1]}", f"{r['exact'][0]} {r['exact'][1]}"
    rows = []
    for m, name in enumerate(names):
        s = r["shares"]
        rows.append({"task": name, "confidence": r["models"][name]["confidence"],
                     "gold prob.": r["models"][name]["gold probability"],
                     "train acc.": r["models"][name]["train accuracy"],
                     "mass (empirical)": r["mass"][ref][name]["total"], "mass (exact)": r["mass"][ex][name]["total"],
                     "mean share": s["raw"]["mean share without word embeddings"][m],
                     "own kept: Fisher emp.": s["raw"]["own"][m], "own kept: Fisher exact": s["exact raw"]["own"][m],
                     "own kept: normalize": s["normalize"]["own"][m],
                     "own kept: per-tensor norm.": s["per-tensor normalised"]["own"][m],
                     "projection: Fisher emp.": s["raw"]["projection"][m],
                     "projection: average": s["raw"]["sum projection"][m] / len(names),
                     "projection: task arith.": s["raw"]["sum projection"][m] * r["task arithmetic"]["chosen"]})
    return rows


def group_rows(r: dict, which: str) -> list:
    """Per model and layer type: the share of its Fisher mass (which='mass') or its mean effective share."""
    ref = f"{r['reference'][0]} {r['reference'][1]}"
    rows = []
    for m, name in enumerate(r["tasks"]):
        if which == "mass":
            rows.append({"task": name, **r["mass"][ref][name]["shares"]})
        else:
            rows.append({"task": name, **{g: v[m] for g, v in r["shares"]["raw"][which].items()}})
    return rows


def spread_rows(r: dict) -> list:
    return [{"task": name, "examples": r["models"][name]["spread examples"], **r["spread"][name]}
            for name in r["tasks"]]


def accuracy_rows(r: dict, split: str) -> list:
    """Accuracy per task and its mean over tasks on `split` of every merge scored there, with the other split's mean."""
    other = "validation" if split == "test" else "test"

    def row(label, result, chosen=""):
        return {"merge": label, "chosen on validation": chosen, **{n: result[split][n] for n in r["tasks"]},
                f"{split} mean": result[split]["mean"], f"{other} mean": result.get(other, {}).get("mean")}
    ta = r["task arithmetic"]
    results = [("each fine-tuned model alone", r["fine-tuned"], ""), *[(s["label"], s, "") for s in r["settings"]],
               ("task arithmetic", ta, f"λ={ta['chosen']}"),
               *[(m["label"], m, f"s={m['chosen']}" + (" (picked)" if m["label"] == r["remedy chosen"] else ""))
                 for m in r["remedies"]]]
    return [row(*item) for item in results if split in item[1]]


def curve_rows(r: dict) -> list:
    """Validation mean accuracy along each searched grid."""
    rows = [{"grid": r["task arithmetic"]["label"] + " (λ)", **{str(c["scale"]): c["validation"]["mean"]
                                                                 for c in r["task arithmetic"]["curve"]}}]
    rows += [{"grid": m["label"] + " (s)", **{str(c["scale"]): c["validation"]["mean"] for c in m["curve"]}}
             for m in r["remedies"]]
    return rows


def times(a: float, b: float) -> str:
    """'12x smaller than' / '3.1x larger than': a against b."""
    ratio = a / b if b else float("inf")
    return f"{1 / ratio:.3g}x smaller than" if ratio < 1 else f"{ratio:.3g}x larger than"


def findings(r: dict) -> str:
    """The mechanism in plain words, with this run's numbers (the model that keeps least of its task vector)."""
    names, M = r["tasks"], len(r["tasks"])
    ref, ex = f"{r['reference'][0]} {r['reference'][1]}", f"{r['exact'][0]} {r['exact'][1]}"
    own = dict(zip(names, r["shares"]["raw"]["own"]))
    low = min(own, key=own.get)
    i, others = names.index(low), [n for n in names if n != low]
    median = lambda values: float(np.median(values))  # noqa: E731
    typical = {n: r["spread"][n]["median"] for n in names}
    settings = {s["label"]: s for s in r["settings"]}
    fisher_ref = settings[f"Fisher {r['reference'][0]}, {r['reference'][1]} ex."]
    where = r["mass"][ref][low]["shares"]
    mass = {kind: {n: r["mass"][kind][n]["merged"] for n in names} for kind in (ref, ex)}
    return (
        f"**Mechanism.** A Fisher merge is θ_F = Σ_m w_m ⊙ θ_m with w_m = F_m / Σ_k F_k entry by entry: a convex "
        f"average, so θ_F − θ_0 = Σ_m w_m ⊙ τ_m and each model keeps only a w_m-weighted part of its task vector "
        f"τ_m (plain averaging keeps 1/M = {1 / M:.3f} of each, task arithmetic λ = {r['task arithmetic']['chosen']}"
        f" of each). The weights follow each model's Fisher, the mean squared gradient of its log likelihood, which "
        f"vanishes on the examples a model gets right with confidence. `{low}` keeps least: confidence "
        f"{r['models'][low]['confidence']:.3f} on its first training examples (the others' median "
        f"{median([r['models'][n]['confidence'] for n in others]):.3f}); its typical (median) per-example squared "
        f"gradient norm is {typical[low]:.3g}, {times(typical[low], median([typical[n] for n in others]))} the "
        f"others' median. Its total Fisher mass over the merged tensors is {mass[ref][low]:.3g} (empirical; "
        f"others' median {median([mass[ref][n] for n in others]):.3g}) and {mass[ex][low]:.3g} (exact; others' "
        f"median {median([mass[ex][n] for n in others]):.3g}), "
        f"but it comes from a handful of examples (below) and {where['type embeddings']:.0%} of it sits in the "
        f"type embeddings (a 2 x 384 table whose row 0 every token uses, so every token's gradient lands there), "
        f"{where['pooler']:.1%} in the pooler that feeds its head. Per entry, where its task vector lives, its Fisher"
        f" is small: weighted by τ², the Fisher merge keeps {own[low]:.3f} of `{low}`'s task vector (exact Fisher "
        f"{r['shares']['exact raw']['own'][i]:.3f}; in the pooler its mean share is "
        f"{r['shares']['raw']['per layer type']['pooler'][i]:.3f}) against {1 / M:.3f} under plain averaging. Its "
        f"task vector is overwritten by the others', and its test accuracy falls to {fisher_ref['test'][low]:.3f} "
        f"(fine-tuned alone {r['fine-tuned']['test'][low]:.3f}, plain average {settings['average']['test'][low]:.3f})."
        f"\n\n**Per-example spread.** On {r['models'][low]['spread examples']} training examples, `{low}`'s squared "
        f"gradient norms have max/median {r['spread'][low]['max/median']:.3g} and the top 10% of examples carry "
        f"{r['spread'][low]['top 10% share']:.0%} of the total (others' median: "
        f"{median([r['spread'][n]['max/median'] for n in others]):.3g} and "
        f"{median([r['spread'][n]['top 10% share'] for n in others]):.0%}). A confident model's empirical Fisher is "
        f"the squared gradients of its few hard examples: its scale is set by which rare mistakes fall in the sample."
        f"\n\n" + growth(r, low) + "\n\n"
        f"**Defect or inherent.** The library's merge matches Σ F_m θ_m / Σ F_m to "
        f"{r['formula check max abs difference']:.2g} (largest difference over layer 0 and the pooler): not a bug of "
        f"the implementation, but what Fisher-weighted averaging does when the models' Fisher scales differ, and its "
        f"convexity keeps every task's share below 1 even when they agree.\n")


def growth(r: dict, low: str) -> str:
    """The estimate's growth and the fisher method's options, for the model that keeps least."""
    i = r["tasks"].index(low)
    rows = {s["label"]: s for s in r["settings"]}
    grown = [(n, r["shares"]["raw" if ("empirical", n) == tuple(r["reference"]) else f"empirical {n} raw"]["own"][i],
              rows[f"Fisher empirical, {n} ex."]["validation"]) for n in r["examples"]]
    name = f"Fisher {r['reference'][0]}, {r['reference'][1]} ex."
    options = [(label, rows[f"{name}, {label}"]["validation"]) for label in ("normalize", "floor_relative=1")]
    return ("**More examples, the fisher method's options.** " + "; ".join(
        f"{n} examples: keeps {kept:.3f} of `{low}`'s task vector, validation accuracy on `{low}` {v[low]:.3f} "
        f"(mean over tasks {v['mean']:.3f})" for n, kept, v in grown)
        + ". More examples do not raise a confident model's Fisher: the typical example's gradient stays tiny. "
        + "; ".join(f"`{label}`: `{low}` {v[low]:.3f}, mean {v['mean']:.3f}" for label, v in options)
        + f" (validation). `normalize` divides each Fisher by its mean over all merged entries, so the same "
        f"type-embedding outliers that inflate `{low}`'s total also shrink its weights elsewhere (it keeps "
        f"{r['shares']['normalize']['own'][i]:.3f}); per-tensor normalisation gives each model the same mass in every"
        f" tensor and restores about 1/M ({r['shares']['per-tensor normalised']['own'][i]:.3f}).")


def render(r: dict) -> str:
    info, t = r["machine"], r["timings"]
    ref = f"the first {r['reference'][1]} training examples of each task"
    groups = [g for g in GROUPS]
    timing = ", ".join(f"{k} {v / 60:.1f} min" for k, v in t.items())
    return (
        "# The Fisher collapse, explained\n\n"
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}; wall time "
        f"{r['wall seconds'] / 60:.1f} min ({timing}). Seed-0 fine-tunes of the merging benchmark "
        f"(all-MiniLM-L6-v2, {len(r['tasks'])} tasks, word embeddings frozen in fine-tuning), the benchmark's "
        f"splits; every merge keeps each task's own head (heads='per_task': the heads are not merged). Fisher "
        f"statistics below use the empirical Fisher on {ref} and the exact Fisher on the first {r['exact'][1]}; tasks "
        f"with fewer training examples use all they have. Scales are chosen on validation only; test is reported. "
        f"Validation and test are the first {r.get('limits', {}).get('validation') or 'all'} and "
        f"{r.get('limits', {}).get('test') or 'all'} examples of each task's splits (the benchmark's splits, cut to "
        f"fit a busy 2-core machine; sizes below), so the accuracies are not those of merging.md to the digit.\n\n"
        + h.markdown_table([{"task": n, **r["sizes"][n]} for n in r["tasks"]], ["task", "train", "validation",
                                                                               "test"]) + "\n"
        + context(r) + findings(r) + "\n## Per model: confidence, Fisher mass, share of the merge\n\n"
        "'own kept' is the τ_m²-weighted mean of w_m = F_m / Σ_k F_k over the merged entries (the fraction of its "
        "own task vector a Fisher merge keeps; 'normalize' is the fisher method's option, 'per-tensor norm.' each "
        "Fisher divided by its mean within each tensor); 'mean share' is the plain mean of w_m over merged entries "
        "without the word embeddings (identical in every fine-tune); 'projection' is <θ − θ_0, τ_m> / |τ_m|² "
        "(the other tasks' vectors included).\n\n"
        + h.markdown_table(model_rows(r), list(model_rows(r)[0]))
        + "\n## Share of each model's Fisher mass per layer type (empirical)\n\n"
        + h.markdown_table(group_rows(r, "mass"), ["task", *groups])
        + "\n## Mean effective share w_m per layer type (empirical, raw)\n\n"
        + h.markdown_table(group_rows(r, "per layer type"), ["task", *groups[:-1]])
        + "\n## Share of its own task vector each model keeps, per layer type (τ²-weighted w_m; empirical, raw)\n\n"
        + h.markdown_table(group_rows(r, "own per layer type"),
                           ["task", *[g for g in groups[:-1] if g in r["shares"]["raw"]["own per layer type"]]])
        + "\n## Per-example squared gradient norms (empirical; all parameters)\n\n"
        + h.markdown_table(spread_rows(r), list(spread_rows(r)[0]))
        + "\n## Test accuracy (per task with its own head; mean over tasks)\n\n"
        + h.markdown_table(accuracy_rows(r, "test"), list(accuracy_rows(r, "test")[0]))
        + "\n## Validation accuracy of every merge scored (growth of the estimate, the fisher method's options)\n\n"
        + h.markdown_table(accuracy_rows(r, "validation"), list(accuracy_rows(r, "validation")[0]))
        + "\n## Validation mean along the searched grids\n\n"
        + h.markdown_table(curve_rows(r), list(dict.fromkeys(k for row in curve_rows(r) for k in row)))
        + "\nFigure: fisher_collapse.png.\n\n" + recommendation(r))


def recommendation(r: dict) -> str:
    """Whether a `scale` for the fisher method helps, judged on validation."""
    fisher_ref = next(s for s in r["settings"] if s["label"] == f"Fisher {r['reference'][0]}, {r['reference'][1]} ex.")
    ta = r["task arithmetic"]
    lines = ["## Recommendation\n"]
    for m in r["remedies"]:
        gain = m["validation"]["mean"] - m["curve"][0]["validation"]["mean"]
        lines.append(f"- {m['label']}: validation mean {m['curve'][0]['validation']['mean']:.3f} at s=1 → "
                     f"{m['validation']['mean']:.3f} at s={m['chosen']} ({gain:+.3f}); test mean "
                     f"{m['test']['mean']:.3f}.")
    lines.append(f"- The fisher method as the benchmark ran it ({fisher_ref['label']}): validation "
                 f"{fisher_ref['validation']['mean']:.3f}, test {fisher_ref['test']['mean']:.3f}; task arithmetic: "
                 f"validation {ta['validation']['mean']:.3f}, test {ta['test']['mean']:.3f} (λ={ta['chosen']}).")
    raw, per_tensor = r["remedies"]
    alone = raw["validation"]["mean"] - fisher_ref["validation"]["mean"]
    both = per_tensor["validation"]["mean"] - fisher_ref["validation"]["mean"]
    noise = 0.5 / np.sqrt(sum(r["sizes"][n]["validation"] for n in r["tasks"]))   # binomial s.e. at p=0.5
    lines.append(
        f"\nA `scale` parameter alone (θ_0 + scale·(θ_F − θ_0), needing `base`, as task arithmetic's) "
        f"{'helps' if alone > 2 * noise else 'does not help beyond noise'} on validation ({alone:+.3f} with the raw "
        f"Fishers; the standard error of a validation mean here is about {noise:.3f}): scaling up a merge that has "
        f"already overwritten a task's vector cannot bring it back. With per-tensor mass normalisation (each model's "
        f"Fisher divided by its mean within each tensor, so that no model's weight is set by its overall gradient "
        f"scale) and the scale chosen on validation the gain is {both:+.3f} "
        f"({'above' if both > 2 * noise else 'within'} twice the standard error), and on test "
        f"{per_tensor['test']['mean'] - fisher_ref['test']['mean']:+.3f} (review_or_plot "
        f"{fisher_ref['test']['review_or_plot']:.3f} → {per_tensor['test']['review_or_plot']:.3f}) "
        if "review_or_plot" in r["tasks"] else "")
    lines[-1] += (f"against task arithmetic's {ta['test']['mean']:.3f}. Recommendation: `scale` alone is not worth "
                  f"adding on this evidence; if the fisher method gets one, it should come with a per-tensor "
                  f"normalisation option, and even then the evidence is suggestive (one seed, small validation "
                  f"splits), not conclusive.")
    return "\n".join(lines) + "\n"


def context(r: dict) -> str:
    """How this run's merges compare with the issue's numbers."""
    ta, rows = r["task arithmetic"], {s["label"]: s for s in r["settings"]}
    curve = [c["validation"]["mean"] for c in ta["curve"]]
    return (f"**Context.** With these {len(r['tasks'])} fine-tunes every merge is far below the fine-tuned models "
            f"(test mean {r['fine-tuned']['test']['mean']:.3f}): task arithmetic's validation curve is flat "
            f"({min(curve):.3f}–{max(curve):.3f} over λ, picking λ={ta['chosen']}) and plain averaging scores "
            f"{rows['average']['test']['mean']:.3f}, so the issue's figures (task arithmetic 0.93 normalised, on the "
            f"earlier 6-task run) are not reproduced here; the Fisher merge is above both on the mean but loses "
            f"`review_or_plot` as it did in the benchmark.\n\n")


def plot(r: dict, path: Path) -> None:
    """Own-vector share vs confidence; per-example norms; validation vs scale; test accuracy per task."""
    from decomp.analysis.plots import _pyplot
    plt = _pyplot()
    names, M = r["tasks"], len(r["tasks"])
    figure, axes = plt.subplots(2, 2, figsize=(13, 9))
    a = axes[0, 0]
    for label, marker in (("raw", "o"), ("exact raw", "s"), ("per-tensor normalised", "^")):
        a.scatter([r["models"][n]["confidence"] for n in names], r["shares"][label]["own"], marker=marker,
                  label={"raw": "empirical Fisher", "exact raw": "exact Fisher"}.get(label, label))
    for n, x, y in zip(names, [r["models"][n]["confidence"] for n in names], r["shares"]["raw"]["own"]):
        a.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    a.axhline(1 / M, color="grey", linestyle="--", label="plain average (1/M)")
    a.set(yscale="log", xlabel="confidence (mean max softmax, first training examples)",
          ylabel="share of own task vector kept (τ²-weighted w_m)", title="who keeps their task vector")
    a.legend(fontsize=7)
    a = axes[0, 1]
    a.boxplot([r["models"][n]["squared norms"] for n in names], whis=(0, 100))
    a.set_xticks(range(1, M + 1), names, rotation=30, ha="right", fontsize=7)
    a.set(yscale="log", ylabel="per-example squared gradient norm (empirical)", title="per-example spread")
    a = axes[1, 0]
    for m in [r["task arithmetic"], *r["remedies"]]:
        a.plot([c["scale"] for c in m["curve"]], [c["validation"]["mean"] for c in m["curve"]], marker="o",
               label=m["label"] + (" (λ)" if m["label"] == "task arithmetic" else " (s)"))
    a.set(xscale="log", xlabel="λ or s", ylabel="validation mean accuracy", title="scale chosen on validation")
    a.legend(fontsize=7)
    a = axes[1, 1]
    rows = [("fine-tuned", r["fine-tuned"]), ("average", r["settings"][0]), ("Fisher (reference)", next(
        s for s in r["settings"] if s["label"] == f"Fisher {r['reference'][0]}, {r['reference'][1]} ex.")),
            ("task arithmetic", r["task arithmetic"]),
            ("remedy", next(m for m in r["remedies"] if m["label"] == r["remedy chosen"]))]
    width = 0.8 / len(rows)
    for i, (label, result) in enumerate(rows):
        a.bar(np.arange(M) + i * width, [result["test"][n] for n in names], width, label=label)
    a.set_xticks(np.arange(M) + 0.4 - width / 2, names, rotation=30, ha="right", fontsize=7)
    a.set(ylabel="test accuracy", title="test accuracy per task (own heads)")
    a.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=None, help="default: the benchmark's 8 tasks")
    parser.add_argument("--models", nargs="+", default=None, help="model folders, one per task (default: the cache)")
    parser.add_argument("--examples", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--reference", type=int, default=300, help="the benchmark's Fisher size (one of --examples)")
    parser.add_argument("--exact", type=int, default=32, help="examples of the exact Fisher (C - 1 backward passes "
                        "per batch: 20 for chatterbot_topics)")
    parser.add_argument("--spread", type=int, default=100, help="training examples of the per-example norms (and "
                        "of the confidence)")
    parser.add_argument("--test-all", action="store_true", help="test accuracy of every fixed setting, not only "
                        "of plain averaging and the benchmark's Fisher (validation is always scored)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared, busy machine)")
    parser.add_argument("--limit-validation", type=int, default=60, help="first validation examples per task")
    parser.add_argument("--limit-test", type=int, default=150, help="first test examples per task")
    parser.add_argument("--out", type=Path, default=h.RESULTS, help="folder of the md, json and png")
    parser.add_argument("--render", action="store_true", help="only the md and png again, from the json")
    args = parser.parse_args()
    path = args.out / "fisher_collapse.json"
    if args.render:
        results = json.loads(path.read_text())
    else:
        from decomp.app.tasks import BENCHMARK_TASKS
        args.tasks = args.tasks or [t.name for t in BENCHMARK_TASKS]
        if args.reference not in args.examples:
            parser.error("--reference must be one of --examples")
        torch.set_num_threads(args.threads)   # more threads than free cores spin and crawl on a busy machine
        results = json.loads(json.dumps(run(args), default=float))
    text = render(results)
    print(text)
    h.RESULTS = args.out
    h.save("fisher_collapse", results, text)
    plot(results, args.out / "fisher_collapse.png")


if __name__ == "__main__":
    main()
