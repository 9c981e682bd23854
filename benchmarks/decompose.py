"""Decomposition of a real fine-tuned model: do gradient components mean something, and more than activations?

all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes fresh/rotten (frozen word embeddings), then 2,000 held-out
snippets (fresh, rotten and plot summaries) sketched (gradients of log p(predicted)) and decomposed by PCA, ICA
and k-means, raw and sign-fixed + unit length; every analysis is repeated on the final [CLS] activations.
Writes benchmarks/results/decompose.{md,json} and figures.

    python benchmarks/decompose.py [--quick] [--workdir benchmarks/.cache]
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


def splits(frame, analysis_sizes, test_size, train_size, seed=0):
    """Disjoint, seeded splits: analysis (fresh, rotten, plot), test and train (fresh/rotten)."""
    shuffled = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    import pandas as pd
    analysis = pd.concat([shuffled[shuffled.category == category].head(size)
                          for category, size in analysis_sizes.items()], ignore_index=True)
    rest = shuffled[~shuffled.text.isin(set(analysis.text)) & shuffled.category.isin(["fresh", "rotten"])]
    return analysis, rest.head(test_size), rest.iloc[test_size:test_size + train_size]


def fine_tuned(workdir: Path, train, epochs, learning_rate, quick):
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging

    from decomp.app.finetune import fine_tune_classifier
    from decomp.app.assets import minilm_path
    logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    folder = workdir / f"minilm-rotten-tomatoes-{len(train)}-{epochs}-{learning_rate}"
    if (folder / "config.json").exists():
        return BertForSequenceClassification.from_pretrained(folder).eval(), tokenizer, 0.0
    model = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    start = time.perf_counter()
    fine_tune_classifier(model, tokenizer, list(train.text), list((train.category == "fresh").astype(int)),
                         epochs=epochs, learning_rate=learning_rate, progress=not quick)
    seconds = time.perf_counter() - start
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer, seconds


def analyse(features, labels3, labels2, *, seed=0):
    """AMI/NMI of PCA, ICA (assignment by largest |loading|, each sign its own class) and k-means."""
    import decomp
    rows = []
    plan = [("pca", 2, None), ("pca", 4, None), ("ica", 2, None), ("ica", 4, None), ("ica", 8, None),
            ("kmeans", 3, None), ("kmeans", 3, 8), ("kmeans", 3, 16), ("kmeans", 3, 32)]
    for method, size, whiten in plan:
        if method == "pca":
            components = decomp.pca(features, size)
        elif method == "ica":
            components = decomp.ica(features, size, seed=seed)
        else:
            components = decomp.cluster(features, size, seed=seed, whiten=whiten)
        three, two = components.align(labels3), components.align(labels2)
        label = f"{method} r={size}" if method != "kmeans" else f"k-means k={size}" + \
            (f", whitened PCA r={whiten}" if whiten else "")
        rows.append({"method": label,
                     "AMI fresh/rotten/plot": three.ami, "NMI fresh/rotten/plot": three.nmi,
                     "AMI review/plot": two.ami, "NMI review/plot": two.nmi, "components": components,
                     "alignment": three})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="600 examples, 1 epoch on 1,000; print only")
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / ".cache")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--train", type=int, default=5000)
    args = parser.parse_args()
    import datasets

    import decomp
    from decomp.app.finetune import accuracy, predict
    from decomp.app.assets import rotten_tomatoes
    from decomp.analysis.plots import plot_alignment, plot_spectrum, top_examples_markdown

    sizes = {"fresh": 700, "rotten": 700, "plot": 600}
    if args.quick:
        sizes, args.train, args.epochs = {"fresh": 200, "rotten": 200, "plot": 200}, 1000, 1
    analysis, test, train = splits(rotten_tomatoes(), sizes, 1000, args.train)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, tokenizer, train_seconds = fine_tuned(args.workdir, train, args.epochs, args.learning_rate, args.quick)
    test_accuracy = accuracy(model, tokenizer, list(test.text), list((test.category == "fresh").astype(int)))
    print(f"test accuracy {test_accuracy:.3f} (fine-tuning {train_seconds:.0f} s)", flush=True)

    texts = list(analysis.text)
    labels3 = np.array(analysis.category)
    labels2 = np.where(labels3 == "plot", "plot", "review")
    start = time.perf_counter()
    sketch = decomp.sketch_gradients(model, datasets.Dataset.from_dict({"text": texts}), tokenizer=tokenizer,
                                     output="predicted", k=2048, max_length=64, progress=not args.quick)
    sketch_seconds = time.perf_counter() - start
    _, activations = predict(model, tokenizer, texts, hidden=True)

    full = decomp.pca(sketch, min(len(texts), 2048) - 1)
    spectrum = {"components for 50%": full.components_for(0.5), "components for 90%": full.components_for(0.9),
                "effective rank": full.effective_rank(),
                "top component share": float(full.explained_variance_ratio[0])}
    sources = {
        "gradients, raw": sketch.features,
        "gradients, sign-fixed + unit": decomp.prepare(sketch, sign_by="predictions", normalize=True).features,
        "activations, raw": activations,
        "activations, sign-fixed + unit": decomp.prepare(activations, sign_by=sketch.predictions, normalize=True),
        "activations, unit": decomp.prepare(activations, normalize=True),
    }
    table, results = [], {}
    for name, features in sources.items():
        for row in analyse(features, labels3, labels2):
            results[(name, row["method"])] = row
            table.append({"features": name, **{k: v for k, v in row.items() if k not in ("components", "alignment")}})
            print(f"{name:32s} {row['method']:10s} AMI3 {row['AMI fresh/rotten/plot']:.3f} "
                  f"AMI2 {row['AMI review/plot']:.3f}", flush=True)

    # purity: ICA with 8 components on the sign-fixed gradients and on activations, top 30 on each side
    purity = {}
    for name in ("gradients, sign-fixed + unit", "activations, unit"):
        alignment = results[(name, "ica r=8")]["alignment"]
        purity[name] = alignment.best_purity()
    best = {source: max(r["AMI fresh/rotten/plot"] for (s, _), r in results.items() if s == source)
            for source in sources}
    gradient_best = max(v for k, v in best.items() if k.startswith("gradients"))
    activation_best = max(v for k, v in best.items() if k.startswith("activations"))

    info = h.machine()
    figures = {}
    if not args.quick:
        out = h.RESULTS
        figures["spectrum"] = plot_spectrum(full, out / "decompose_spectrum.png",
                                            title="Gradient features, Rotten Tomatoes").name
        method = "k-means k=3, whitened PCA r=16"
        figures["gradient alignment"] = plot_alignment(
            results[("gradients, sign-fixed + unit", method)]["alignment"], out / "decompose_alignment_gradients.png",
            title="k-means of sign-fixed gradients").name
        figures["activation alignment"] = plot_alignment(
            results[("activations, unit", method)]["alignment"], out / "decompose_alignment_activations.png",
            title="k-means of [CLS] activations").name
        figures["ICA alignment"] = plot_alignment(
            results[("gradients, sign-fixed + unit", "ica r=8")]["alignment"], out / "decompose_alignment_ica.png",
            title="ICA r=8, sign-fixed gradients").name
    columns = ["features", "method", "AMI fresh/rotten/plot", "NMI fresh/rotten/plot", "AMI review/plot",
               "NMI review/plot"]
    chosen = results[("gradients, sign-fixed + unit", "ica r=8")]["components"]
    text = (f"# Decomposition benchmark\n\nMachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}.\n"
            f"Model: all-MiniLM-L6-v2 fine-tuned on {len(train)} Rotten Tomatoes fresh/rotten snippets "
            f"({args.epochs} epochs, learning rate {args.learning_rate}, word embeddings frozen): test accuracy "
            f"{test_accuracy:.3f} on {len(test)} held-out snippets. Analysis set: {len(texts)} other snippets "
            f"({', '.join(f'{v} {k}' for k, v in sizes.items())}), gradients of log p(predicted) for every parameter "
            f"sketched to {sketch.features.shape[1]} features in {sketch_seconds:.0f} s. Baseline: the same analyses "
            f"of the final [CLS] hidden state. Assignments: PCA/ICA put each example in the (component, sign) of its "
            f"largest |loading|; AMI/NMI by scikit-learn.\n\n"
            "## Spectrum of the raw gradient features\n\n" + h.markdown_table([spectrum], list(spectrum)) +
            "\n## Alignment with fresh / rotten / plot and review / plot\n\n" + h.markdown_table(table, columns) +
            f"\nBest AMI (fresh/rotten/plot): gradients {gradient_best:.3f}, activations {activation_best:.3f} "
            f"(ratio {gradient_best / max(activation_best, 1e-9):.2f}).\n\n"
            "## Top-30 purity per subclass (best (component, sign) of ICA r=8, each side)\n\n"
            + h.markdown_table([{"features": k, **v} for k, v in purity.items()], ["features", "fresh", "rotten",
                                                                                   "plot"])
            + "\n## Top examples of ICA r=8 on sign-fixed gradients\n\n"
            + top_examples_markdown(chosen, texts, labels=list(labels3), k=3)
            + "".join(f"\n![{k}]({v})\n" for k, v in figures.items()))
    print(text)
    if not args.quick:
        h.save("decompose", {"machine": info, "test_accuracy": test_accuracy, "train_seconds": train_seconds,
                             "sketch_seconds": sketch_seconds, "spectrum": spectrum, "rows": table,
                             "purity": purity, "best_ami": {"gradients": gradient_best,
                                                            "activations": activation_best}}, text)


if __name__ == "__main__":
    main()
