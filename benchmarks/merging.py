"""The paper-style merging table: eight real tasks, one MiniLM start fine-tuned with several seeds, every method of
decomp.merge that takes several models, coefficients chosen on validation, paired 95% bootstrap intervals.

    python benchmarks/merging.py [--seeds 0 1 2] [--workdir benchmarks/.cache/merging]

Fine-tuned models are cached per seed in the workdir, and so are each finished seed's merges (results.json,
correct.pt) and analysis (analysis.json, reused unless --rerun), so an interrupted run resumes and seeds can run one at
a time. Seed 0 runs every candidate; the others run the published baselines, ours, averaging and RegMean
(the Fisher merges' statistics cost more than all the other merges together) unless --all-methods.
Writes benchmarks/results/merging.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BOOTSTRAP = 2000
INDIVIDUAL = "each fine-tuned model alone"
# the published methods ours must beat; the best of them on validation is "the best baseline" of a seed
BASELINES = ("task arithmetic", "TIES (top 20%, global trim)", "TSV-M", "Iso-C", "Iso-CTS (common 80%)")
OURS = ("data-subspace TSV (ours)", "data-subspace TSV, isotropic (ours)", "data-subspace Iso-CTS (ours)")
CONTENDERS = BASELINES + OURS + ("average", "RegMean")


def normalised_samples(correct: dict, individual: dict, names: list, rng) -> np.ndarray:
    """[BOOTSTRAP] mean over tasks of accuracy / the fine-tuned model's accuracy, each task's test examples resampled
    (the same draws for every method, so differences between methods are paired)."""
    draws = {name: rng.integers(0, len(correct[name]), (BOOTSTRAP, len(correct[name]))) for name in names}
    ratios = [correct[n][draws[n]].mean(1) / np.maximum(individual[n][draws[n]].mean(1), 1e-9) for n in names]
    return np.mean(ratios, axis=0)


def task_intervals(correct: dict, names: list, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {n: np.percentile(correct[n][rng.integers(0, len(correct[n]), (BOOTSTRAP, len(correct[n])))].mean(1),
                             [2.5, 97.5]) for n in names}


def analyse_seed(results: dict, correct: dict, names: list, seed: int) -> dict:
    """Per row: test accuracy per task, normalised mean, its interval, and its paired difference to the seed's best
    baseline (chosen on validation)."""
    rows = results["merging"]["rows"]
    correct = {label: {n: correct[label][n].numpy().astype(float) for n in names} for label in correct}
    samples = {label: normalised_samples(correct[label], correct[INDIVIDUAL], names, np.random.default_rng(seed))
               for label in correct}
    baselines = [r for r in rows if r["label"] in BASELINES]
    best = max(baselines, key=lambda r: r["validation mean"])
    analysed = {}
    for row in rows:
        difference = samples[row["label"]] - samples[best["label"]]
        spans = task_intervals(correct[row["label"]], names, seed)
        analysed[row["label"]] = {
            "method": row["method"], "chosen": row["chosen"], "parameters": row["parameters"],
            "validation mean": row.get("validation mean"), "normalised mean": row["normalised mean"],
            "normalised interval": np.percentile(samples[row["label"]], [2.5, 97.5]).tolist(),
            "vs best baseline": float(np.mean(difference)),
            "vs best baseline interval": np.percentile(difference, [2.5, 97.5]).tolist(),
            "difference samples": difference,
            **{n: {"accuracy": row[n], "interval": spans[n].tolist()} for n in names}}
    return {"best baseline": best["label"], "rows": analysed, "tasks": results["merging"]["tasks"],
            "timings": results["timings"]}


def across_seeds(seeds: dict) -> dict:
    """Per row present in every seed: the seeds' normalised means, their mean, and the seed-averaged difference to
    each seed's best baseline with its 95% interval (test examples resampled independently within each seed)."""
    labels = [label for label in next(iter(seeds.values()))["rows"] if all(label in s["rows"] for s in seeds.values())]
    summary = {}
    for label in labels:
        rows = [s["rows"][label] for s in seeds.values()]
        averaged = np.mean([r["difference samples"] for r in rows], axis=0)
        summary[label] = {"normalised means": [r["normalised mean"] for r in rows],
                          "mean": float(np.mean([r["normalised mean"] for r in rows])),
                          "vs best baseline": float(np.mean(averaged)),
                          "vs best baseline interval": np.percentile(averaged, [2.5, 97.5]).tolist(),
                          "above zero in seeds": sum(r["vs best baseline interval"][0] > 0 for r in rows)}
    return summary


def verdict(low: float, high: float) -> str:
    return "better" if low > 0 else "worse" if high < 0 else "tie"


def span(pair) -> str:
    return f"[{pair[0]:+.3f}, {pair[1]:+.3f}]"


def render(seeds: dict, summary: dict, names: list, info: dict, wall: float, sizes: dict) -> str:
    first_seed, first = next(iter(seeds.items()))
    order = sorted(summary, key=lambda label: -summary[label]["mean"])
    seed_columns = [f"seed {s}" for s in seeds]
    overview = [{"label": label, **{f"seed {s}": f"{seeds[s]['rows'][label]['normalised mean']:.3f}" for s in seeds},
                 "mean over seeds": f"{summary[label]['mean']:.3f}",
                 "vs best baseline (seed mean)": f"{summary[label]['vs best baseline']:+.3f} "
                                                 f"{span(summary[label]['vs best baseline interval'])}",
                 "verdict": verdict(*summary[label]["vs best baseline interval"]),
                 "seeds above zero": f"{summary[label]['above zero in seeds']}/{len(seeds)}"} for label in order]
    detail = []
    for label, row in first["rows"].items():
        detail.append({"label": label, "method": row["method"], "chosen": row["chosen"],
                       **{n: f"{row[n]['accuracy']:.3f} [{row[n]['interval'][0]:.3f}, {row[n]['interval'][1]:.3f}]"
                          for n in names},
                       "normalised mean": f"{row['normalised mean']:.3f} [{row['normalised interval'][0]:.3f}, "
                                          f"{row['normalised interval'][1]:.3f}]",
                       "vs best baseline": f"{row['vs best baseline']:+.3f} {span(row['vs best baseline interval'])}"})
    best = ", ".join(f"seed {s}: {v['best baseline']}" for s, v in seeds.items())
    timing = "; ".join(f"seed {s}: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seed["timings"].items())
                       for s, seed in seeds.items())
    return (f"# Merging benchmark\n\nMachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}; wall "
            f"time {wall / 60:.0f} min over the seeds ({timing}), on a machine shared with other jobs."
            f"\n\nall-MiniLM-L6-v2 fine-tuned separately on each of {len(names)} tasks ({sizes['epochs']} "
            f"epoch{'s' if sizes['epochs'] != 1 else ''} of {sizes['train']} examples, "
            f"learning rate {sizes['learning_rate']}, word embeddings frozen), once per seed (the seed sets the heads' "
            f"initialisation and the data order; the splits are fixed); the encoders merged, each task keeping its own"
            f" head. Every coefficient is chosen on validation examples (the first {sizes.get('selection', 'all')} of "
            f"each task's validation split; mean accuracy over tasks), never on test. "
            f"'normalised' is the mean over tasks of test accuracy / the fine-tuned model's. Intervals: 95% paired "
            f"bootstrap ({BOOTSTRAP} resamples of each test set). The best baseline of a seed is the best on "
            f"validation of {', '.join(BASELINES)} ({best}); 'vs best baseline' is the paired difference of normalised"
            f" means. Over seeds, the differences are averaged (each seed's test examples resampled independently).\n\n"
            + h.markdown_table(first["tasks"], ["name", "description", "train", "validation", "test"])
            + "\n## Every seed\n\n"
            + h.markdown_table(overview, ["label", *seed_columns, "mean over seeds", "vs best baseline (seed mean)",
                                          "seeds above zero", "verdict"])
            + f"\nFigure: merging.png (normalised accuracy per seed).\n\n## Seed {first_seed}, per task\n\n"
            + h.markdown_table(detail, ["label", "method", "chosen", *names, "normalised mean", "vs best baseline"]))


def plot(seeds: dict, summary: dict, path: Path) -> None:
    from decomp.analysis.plots import _pyplot
    plt = _pyplot()
    order = sorted(summary, key=lambda label: summary[label]["mean"])
    figure, axis = plt.subplots(figsize=(8, 0.38 * len(order) + 1.2))
    for y, label in enumerate(order):
        values = summary[label]["normalised means"]
        colour = "#c44e52" if label in OURS else "#4c72b0" if label in BASELINES else "#8c8c8c"
        axis.barh(y, summary[label]["mean"], color=colour, alpha=0.35)
        axis.scatter(values, [y] * len(values), color=colour, s=14, zorder=3)
    axis.set_yticks(range(len(order)), order)
    axis.axvline(1.0, color="#dd8452", linestyle="--")
    axis.set_xlabel("test accuracy / the fine-tuned model's, mean over tasks\n(bars: mean over seeds; dots: seeds)")
    axis.set_xlim(0.5, 1.02)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def run_seed(workdir: Path, seed: int, all_methods: bool, quick: bool) -> tuple:
    """(results, test correctness per row and task, task names, sizes) of one seed's fine-tunes and merges; saved
    beside them (results.json, correct.pt), so that the analysis can be redone without merging again. A seed saved
    with fewer candidates than asked for (contenders first, every method later) runs only the missing ones, in
    seed<N>/more (its models linked to the seed's), and adds their rows."""
    import torch
    from decomp.app.candidates import BENCHMARK_CANDIDATES
    from decomp.app.demo import BENCHMARK, BENCHMARK_TASKS, Demo
    folder = workdir / f"seed{seed}"
    names = [t.name for t in BENCHMARK_TASKS]
    wanted = [c for c in BENCHMARK_CANDIDATES if all_methods or c.label in CONTENDERS]
    results, correct = None, {}
    if (folder / "correct.pt").exists():
        results, correct = json.loads((folder / "results.json").read_text()), torch.load(folder / "correct.pt")
    missing = [c for c in wanted if c.label not in correct]
    if not missing:
        return results, correct, names, results["sizes"]
    out = folder if results is None else folder / "more"
    if out != folder and not (out / "models").exists():
        out.mkdir(parents=True, exist_ok=True)
        (out / "models").symlink_to(folder / "models", target_is_directory=True)
    demo = Demo(out, quick=quick, tasks=BENCHMARK_TASKS, decompose=False, seed=seed,
                sizes=None if quick else BENCHMARK, candidates=missing)
    added = demo.run()
    if results is None:
        results = added
    else:   # the baseline rows (each fine-tune alone, the pre-trained encoder) are the same models' again
        results["merging"]["rows"] += [row for row in added["merging"]["rows"] if row["label"] not in correct]
        results["timings"] = {k: results["timings"].get(k, 0) + added["timings"].get(k, 0)
                              for k in {*results["timings"], *added["timings"]}}
    correct = {**demo.correct, **correct}
    (folder / "results.json").write_text(json.dumps(results, indent=1, default=str))
    torch.save(correct, folder / "correct.pt")
    return results, correct, names, results["sizes"]


def main():
    from decomp.app.candidates import BENCHMARK_CANDIDATES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / ".cache" / "merging")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--all-methods", action="store_true", help="the Fisher merges in every seed, not only seed 0")
    parser.add_argument("--contenders", action="store_true", help="only the published baselines, ours, averaging and "
                        "RegMean, in every seed (seed 0 too)")
    parser.add_argument("--rerun", action="store_true", help="analyse again the seeds already analysed (from their "
                        "saved merges: delete seed<N>/correct.pt to merge again)")
    parser.add_argument("--quick", action="store_true", help="the quick demo's sizes, results under the workdir only "
                        "(a smoke test of the script)")
    args = parser.parse_args()
    seeds = {}
    for seed in args.seeds:
        cached = args.workdir / f"seed{seed}" / "analysis.json"
        everything = args.all_methods or (seed == 0 and not args.contenders)
        wanted = [c.label for c in BENCHMARK_CANDIDATES if everything or c.label in CONTENDERS]
        analysed = json.loads(cached.read_text()) if cached.exists() and not args.rerun else None
        if analysed is not None and all(label in analysed["rows"] for label in wanted):
            seeds[seed] = analysed
        else:
            results, correct, names, sizes = run_seed(args.workdir, seed, everything, args.quick)
            seeds[seed] = {**analyse_seed(results, correct, names, seed), "names": names, "sizes": sizes}
            cached.write_text(json.dumps(seeds[seed], default=lambda a: np.asarray(a).tolist()))
        for row in seeds[seed]["rows"].values():
            row["difference samples"] = np.asarray(row["difference samples"])
    names, sizes = seeds[args.seeds[0]]["names"], seeds[args.seeds[0]]["sizes"]
    summary = across_seeds(seeds)
    info = h.machine()
    wall = sum(sum(seed["timings"].values()) for seed in seeds.values())
    text = render(seeds, summary, names, info, wall, sizes)
    if args.quick:
        h.RESULTS = args.workdir
    plot(seeds, summary, h.RESULTS / "merging.png")
    print(text)
    for seed in seeds.values():
        for row in seed["rows"].values():
            row.pop("difference samples")
    h.save("merging", json.loads(json.dumps({"machine": info, "seeds": seeds, "summary": summary},
                                            default=lambda a: np.asarray(a).tolist())), text)


if __name__ == "__main__":
    main()
