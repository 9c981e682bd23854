"""The demo's merging comparison: every candidate of candidates.CANDIDATES merges the fine-tuned encoders (each task
keeps its head), its coefficient chosen on the validation splits, and is scored on the test splits.

Memory stays near a few models: the merges read the fine-tunes and the base from safetensors files one tensor at a
time; the statistics (Fishers, Grams, component Fishers) wait on disk in a temporary folder and are read one tensor
at a time too; one model evaluates every merge (its head swapped per task); only the best merge so far is kept."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from . import assets
from .candidates import CANDIDATES, COMPONENTS
from .stored import StoredTensors
from ..gradients.outputs import FISHER_KINDS

HEAD = "classifier."
MAX_LENGTH = 64
BATCH = 32
BASELINES = ("each fine-tuned model alone", "pre-trained encoder + task heads")


def encoder_of(state) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(HEAD)}


class Comparison:
    """folders: task name -> the fine-tuned classifier's save_pretrained folder; data: task name -> split ->
    (texts, labels). Each fine-tune is loaded while its statistics and its own score are taken, and let go; one
    of them then evaluates every merge, its head swapped per task."""

    def __init__(self, tasks, folders: dict, tokenizer, data: dict, sizes: dict, stages, candidates=None):
        self.tasks, self.names = tasks, [task.name for task in tasks]
        self.folders = {name: str(folders[name]) for name in self.names}
        self.tokenizer, self.data, self.sizes, self.stages = tokenizer, data, sizes, stages
        self.heads: dict = {}     # task name -> its classifier head (a module)
        self.evaluator = None
        self.correct: dict = {}   # row label -> task -> [N] bool of the test split (for bootstrap intervals)
        self.rows: list = []
        self.candidates = list(CANDIDATES if candidates is None else candidates)
        self.needed = {name for candidate in self.candidates for name in candidate.inputs.values()}

    def load(self, name: str):
        from transformers import BertForSequenceClassification
        model = BertForSequenceClassification.from_pretrained(self.folders[name]).eval()
        # the fine-tunes kept their word embeddings frozen (finetune's default): the statistics leave them out too,
        # as the merges leave them at the base's values; their component directions were half of each model's size
        model.get_input_embeddings().weight.requires_grad_(False)
        return model

    def run(self) -> dict:
        with tempfile.TemporaryDirectory(prefix="decomp-demo-") as work:
            statistics = self.statistics(Path(work))
            with self.stages("individual models and the pre-trained encoder"):
                self.rows = self.baselines(statistics["base"])
            with self.stages("merging with every method (coefficients chosen on validation)"):
                self.rows += [self.search(candidate, statistics) for candidate in self.candidates]
        individual = self.rows[0]
        for row in self.rows:
            row["normalised mean"] = float(np.mean([row[n] / individual[n] for n in self.names]))
        return {"tasks": [{"name": t.name, "description": t.description, "labels": t.labels,
                           **{split: len(self.data[t.name][split][0]) for split in ("train", "validation", "test")}}
                          for t in self.tasks], "rows": self.rows}

    # ---- statistics the merges need, written to disk -------------------------------------------------------------

    def batches(self, name: str) -> list:
        """The first `fisher` training examples of a task, tokenized, in batches with their labels."""
        texts, labels = self.data[name]["train"]
        return [{**self.tokenizer(texts[i:i + BATCH], padding=True, truncation=True, max_length=MAX_LENGTH,
                                  return_tensors="pt"), "labels": torch.tensor(labels[i:i + BATCH])}
                for i in range(0, self.sizes["fisher"], BATCH)]

    def statistics(self, work: Path) -> dict:
        """statistic name -> one per model: Fishers of each kind, Grams, component Fishers (those the candidates
        need); and the base's file."""
        import decomp
        from transformers import BertForSequenceClassification
        base = BertForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2).state_dict()
        found = {"base": str(StoredTensors.write(base, work / "base.safetensors").path), "grams": [],
                 "component fishers": [], **{f"fisher {kind}": [] for kind in FISHER_KINDS}}
        del base
        kinds = [kind for kind in FISHER_KINDS if f"fisher {kind}" in self.needed]
        with self.stages(f"Fisher files ({', '.join(kinds) or 'none needed'}) and Gram matrices"):
            for name in self.names:
                model, batches = self.load(name), self.batches(name)
                for kind in kinds:
                    path = decomp.compute_fisher(model, batches, kind=kind, progress=False).save(
                        work / f"{name}-fisher-{kind}.safetensors")
                    found[f"fisher {kind}"].append(StoredTensors(path))
                if "grams" not in self.needed:
                    continue
                with torch.no_grad():   # Grams need the layers' inputs only, no graph
                    grams = decomp.collect_grams(model, batches, progress=False)
                found["grams"].append(StoredTensors.write(grams, work / f"{name}-grams.safetensors"))
                del grams
        if "component fishers" not in self.needed:
            return found
        with self.stages("component Fishers (PCA of each model's sketched gradients, second pass)"):
            for name in self.names:
                found["component fishers"].append(self.component_fishers(name, work))
        return found

    def component_fishers(self, name: str, work: Path) -> list:
        """The component Fishers of the first COMPONENTS principal components of a model's sketched gradients,
        one file each, each direction dropped as soon as its Fisher is written."""
        import decomp
        model, batches = self.load(name), self.batches(name)
        sketch = decomp.sketch_gradients(model, batches, output="logprob", progress=False)
        components = decomp.pca(sketch, COMPONENTS, center=False)
        directions = components.parameter_directions(model, batches, unit=True, progress=False)
        stored = []
        for c in range(len(directions)):
            (fisher,) = decomp.component_fishers([directions[c]], len(sketch))
            directions[c] = None
            stored.append(StoredTensors.write(fisher, work / f"{name}-component-{c}.safetensors"))
            del fisher
        return stored

    # ---- scoring -------------------------------------------------------------------------------------------------

    def score(self, encoder: dict, split: str, label: str = "") -> dict:
        """Accuracy per task of `encoder` with each task's own head (test predictions kept under `label`)."""
        from .finetune import correct
        missing, unexpected = self.evaluator.load_state_dict(encoder, strict=False)
        if unexpected or any(not key.startswith(HEAD) for key in missing):
            raise ValueError(f"a merged encoder does not fit the evaluator: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}")
        result = {}
        for name in self.names:
            self.evaluator.classifier = self.heads[name]
            texts, labels = self.data[name][split]
            if split == "validation":   # the coefficients may be chosen on the split's first examples only
                texts, labels = texts[:self.sizes.get("selection")], labels[:self.sizes.get("selection")]
            right = correct(self.evaluator, self.tokenizer, texts, labels, max_length=MAX_LENGTH)
            if split == "test":
                self.correct.setdefault(label, {})[name] = right
            result[name] = float(right.float().mean())
        return result

    def baselines(self, base: str) -> list:
        """Each fine-tuned model on its own task (its head kept), then the pre-trained encoder with the heads."""
        from .finetune import correct
        alone, pre_trained = BASELINES
        for name in self.names:
            model = self.load(name)
            self.heads[name] = model.classifier
            self.correct.setdefault(alone, {})[name] = correct(model, self.tokenizer, *self.data[name]["test"],
                                                               max_length=MAX_LENGTH)
            del model
        self.evaluator = self.load(self.names[0])
        each = {name: float(right.float().mean()) for name, right in self.correct[alone].items()}
        return [{"label": alone, "method": "fine_tuned", "parameters": {}, "chosen": "", "baseline": True, **each},
                {"label": pre_trained, "method": "pre_trained", "parameters": {}, "chosen": "", "baseline": True,
                 **self.score(encoder_of(StoredTensors(base)), "test", pre_trained)}]

    def search(self, candidate, statistics: dict) -> dict:
        """The candidate's options scored on validation; the best one scored on test."""
        import decomp
        options = candidate.options(self.sizes, len(self.names))
        inputs = {keyword: statistics[name] for keyword, name in candidate.inputs.items()}
        models = [self.folders[name] for name in self.names]

        def merged(parameters: dict) -> dict:
            return encoder_of(decomp.merge(models, method=candidate.method, heads="per_task", **inputs, **parameters))

        best = None
        for parameters, encoder in self.tried(candidate, options, merged, statistics["base"]):
            validation = float(np.mean(list(self.score(encoder, "validation").values())))
            if best is None or validation > best[0]:
                best = (validation, parameters, encoder)
            del encoder
        validation, parameters, encoder = best
        row = {"label": candidate.label, "method": candidate.method, "parameters": parameters,
               "chosen": candidate.describe(parameters, options), "baseline": False, "validation mean": validation,
               **self.score(encoder, "test", candidate.label), "peak_memory_mib": self.stages.lap()}
        self.stages.log(f"{self.stages.prefix}  {' '.join(filter(None, (candidate.label, row['chosen'])))}: "
                        f"validation mean {validation:.3f}"
                        + ("" if row["peak_memory_mib"] is None else f", peak {row['peak_memory_mib']:.0f} MiB"))
        return row

    @staticmethod
    def tried(candidate, options: list, merged, base: str):
        """(parameters, encoder) of every option, made one at a time. A method whose `scale` is the one searched
        gives θ_0 + scale·Δ, so it is merged once (scale 1) and every scale tried is that merge rescaled, equal to
        merging at that scale up to float32 rounding (the SVD merges of eight models take a minute each here)."""
        if candidate.search != "scale":
            yield from ((parameters, merged(parameters)) for parameters in options)
            return
        unit = merged({**options[0], "scale": 1.0})
        start = encoder_of(StoredTensors(base))
        for parameters in options:
            scale = parameters["scale"]
            yield parameters, {key: start[key] + scale * (value - start[key]) if key in start else value
                               for key, value in unit.items()}

    def plot(self, path: Path) -> Path:
        """Bars of each row's normalised mean accuracy."""
        from ..analysis.plots import _pyplot, _save
        plt = _pyplot()
        figure, axis = plt.subplots(figsize=(8, 0.45 * len(self.rows) + 1))
        labels = [r["label"] + (f" ({r['chosen']})" if r["chosen"] else "") for r in self.rows]
        values = [r["normalised mean"] for r in self.rows]
        axis.barh(range(len(self.rows)), values, color="#4c72b0")
        axis.set_yticks(range(len(self.rows)), labels)
        axis.invert_yaxis()
        axis.axvline(1.0, color="#dd8452", linestyle="--")
        axis.set_xlabel(f"test accuracy / the fine-tuned model's, mean over the {len(self.names)} tasks")
        axis.set_xlim(min(0.5, min(values) - 0.05), max(1.05, max(values) + 0.02))
        figure.tight_layout()
        return _save(figure, path)
