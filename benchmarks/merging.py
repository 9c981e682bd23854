"""The paper-style merging table: six real tasks, one MiniLM start, every method of decomp.merge, coefficients
chosen on validation, 95% bootstrap intervals on every number.

    python benchmarks/merging.py [--workdir benchmarks/.cache/merging]

Fine-tuned models are cached in the workdir, so an interrupted run resumes without re-training. Writes
benchmarks/results/merging.{md,json} and merging.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BOOTSTRAP = 1000


def intervals(correct: dict, individual: dict, names: list, seed: int = 0) -> dict:
    """95% percentile intervals of each task's accuracy and of the mean normalised accuracy (paired with the
    individual models on the same resampled test examples)."""
    rng = np.random.default_rng(seed)
    samples = {name: [] for name in names}
    normalised = []
    draws = {name: rng.integers(0, len(correct[name]), (BOOTSTRAP, len(correct[name]))) for name in names}
    for b in range(BOOTSTRAP):
        ratios = []
        for name in names:
            picked = draws[name][b]
            accuracy = correct[name][picked].mean()
            samples[name].append(accuracy)
            ratios.append(accuracy / max(individual[name][picked].mean(), 1e-9))
        normalised.append(np.mean(ratios))
    result = {name: np.percentile(values, [2.5, 97.5]).tolist() for name, values in samples.items()}
    result["normalised mean"] = np.percentile(normalised, [2.5, 97.5]).tolist()
    result["normalised samples"] = np.array(normalised)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / ".cache" / "merging")
    args = parser.parse_args()
    from decomp.app.demo import BENCHMARK_TASKS, FULL, Demo
    start = time.perf_counter()
    demo = Demo(args.workdir, quick=False, tasks=BENCHMARK_TASKS, decompose=False)
    results = demo.run()
    wall = time.perf_counter() - start
    names = [t.name for t in BENCHMARK_TASKS]
    correct = {method: {n: demo.correct[method][n].numpy().astype(float) for n in names} for method in demo.correct}
    individual = correct["each fine-tuned model alone"]
    rows = results["merging"]["rows"]
    # rows are keyed by their label (several rows share a method id: the three Fishers, the two component merges)
    spans = {row["label"]: intervals(correct[row["label"]], individual, names) for row in rows}
    best = max((r for r in rows if r["method"] != "fine_tuned"), key=lambda r: r["normalised mean"])
    for row in rows:
        span = spans[row["label"]]
        for name in names:
            row[name] = f"{row[name]:.3f} [{span[name][0]:.3f}, {span[name][1]:.3f}]"
        low, high = span["normalised mean"]
        difference = span["normalised samples"] - spans[best["label"]]["normalised samples"]
        tie = np.percentile(difference, 2.5) <= 0 <= np.percentile(difference, 97.5)
        row["normalised mean"] = f"{row['normalised mean']:.3f} [{low:.3f}, {high:.3f}]"
        row["vs best merge"] = "best" if row is best else ("tie" if tie else "worse" if np.mean(difference) < 0
                                                              else "better")
    info = h.machine()
    tasks = results["merging"]["tasks"]
    columns = ["label", "method", "chosen", *names, "normalised mean", "vs best merge"]
    text = (f"# Merging benchmark\n\nMachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}; wall time "
            f"{wall / 60:.0f} min ("
            + ", ".join(f"{step} {seconds / 60:.1f} min" for step, seconds in results["timings"].items())
            + "; fine-tuned models cached from an earlier run are not re-trained).\n\n"
            f"all-MiniLM-L6-v2 fine-tuned separately on each task ({FULL['epochs']} epochs, learning rate "
            f"{FULL['learning_rate']}, word embeddings frozen); the encoders merged, each task keeping its own head. "
            f"Coefficients chosen on the validation split (mean accuracy over tasks), never on test. Test accuracy with "
            f"95% bootstrap intervals ({BOOTSTRAP} resamples); 'normalised mean' is the mean over tasks of accuracy / "
            f"the fine-tuned model's, resampled paired with it; 'vs best merge' is a tie when the paired interval of "
            f"the difference to the best merge contains 0. Fisher merges use {FULL['fisher']} training examples per "
            f"task; components use each model's top principal components of sketched gradients.\n\n"
            + h.markdown_table(tasks, ["name", "description", "train", "validation", "test"]) + "\n"
            + h.markdown_table(rows, columns)
            + "\n![normalised accuracy](merging.png)\n")
    import shutil
    shutil.copy(demo.figures["merging"], h.RESULTS / "merging.png")
    print(text)
    h.save("merging", {"machine": info, "wall_seconds": wall, "tasks": tasks,
                       "rows": rows, "timings": results["timings"]}, text)


if __name__ == "__main__":
    main()
