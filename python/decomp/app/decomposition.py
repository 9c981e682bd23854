"""The demo's decomposition: sketched gradients of a Rotten Tomatoes classifier on fresh, rotten and plot snippets,
their spectrum, k-means and ICA of the sign-fixed gradients, and k-means of the [CLS] activations as the baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import assets

CATEGORIES = ("fresh", "rotten", "plot")
SKETCH = {"output": "predicted", "k": 2048, "max_length": 64}


def snippets(examples: int):
    """`examples` // 3 snippets of each category, seeded: (texts, categories)."""
    import pandas as pd
    frame = assets.rotten_tomatoes().sample(frac=1.0, random_state=1)
    per_class = examples // 3
    frame = pd.concat([frame[frame.category == c].head(per_class) for c in CATEGORIES], ignore_index=True)
    return list(frame.text), np.array(frame.category)


def analyses(model, tokenizer, texts: list, progress: bool = True) -> dict:
    """The sketch's spectrum and the three clusterings compared (name -> Components)."""
    import datasets

    import decomp
    from .finetune import predict
    sketch = decomp.sketch_gradients(model, datasets.Dataset.from_dict({"text": texts}), tokenizer=tokenizer,
                                     progress=progress, **SKETCH)
    _, activations = predict(model, tokenizer, texts, hidden=True)
    prepared = decomp.prepare(sketch, sign_by="predictions", normalize=True)
    return {"sketch": sketch, "spectrum": decomp.pca(sketch, min(len(texts) - 1, 200)),
            "k-means of sign-fixed gradients (whitened, r=16)": decomp.cluster(prepared, 3, whiten=16, seed=0),
            "k-means of [CLS] activations (whitened, r=16)":
                decomp.cluster(decomp.prepare(activations, normalize=True), 3, whiten=16, seed=0),
            "ICA r=8 of sign-fixed gradients": decomp.ica(prepared, 8, seed=0)}


FIGURES = (("gradient clusters", "k-means of sign-fixed gradients (whitened, r=16)", "clusters.png",
            "k-means of sign-fixed gradients"),
           ("activation clusters", "k-means of [CLS] activations (whitened, r=16)", "activation_clusters.png",
            "k-means of [CLS] activations"),
           ("ICA components", "ICA r=8 of sign-fixed gradients", "ica.png", "ICA components of sign-fixed gradients"))


def figures(found: dict, categories, folder: Path) -> dict:
    """The spectrum and each clustering's alignment with the categories, as PNG files (name -> path)."""
    from ..analysis.plots import plot_alignment, plot_spectrum
    from .report import FIGURE_FILES
    paths = {"spectrum": plot_spectrum(found["spectrum"], folder / FIGURE_FILES["spectrum"],
                                       title="Gradient features of the Rotten Tomatoes classifier")}
    for name, analysis, file, title in FIGURES:
        paths[name] = plot_alignment(found[analysis].align(categories), folder / file, title=title)
    return paths


def decompose(model, tokenizer, examples: int, folder: Path, progress: bool = True) -> tuple:
    """(results for results.json, figures) of the decomposition of `model` on `examples` snippets."""
    from ..analysis.plots import top_examples_markdown
    texts, categories = snippets(examples)
    review_or_plot = np.where(categories == "plot", "plot", "review")
    found = analyses(model, tokenizer, texts, progress)
    rows = [{"analysis": name, "AMI fresh/rotten/plot": found[name].align(categories).ami,
             "AMI review/plot": found[name].align(review_or_plot).ami,
             "top-30 purity": found[name].align(categories).best_purity()} for _, name, _, _ in FIGURES]
    spectrum, sketch = found["spectrum"], found["sketch"]
    results = {"examples": len(texts), "features": sketch.features.shape[1],
               "components for 50%": spectrum.components_for(0.5),
               "components for 90%": spectrum.components_for(0.9), "effective rank": spectrum.effective_rank(),
               "rows": rows, "top examples": top_examples_markdown(found["ICA r=8 of sign-fixed gradients"], texts,
                                                                   labels=list(categories), k=3)}
    return results, figures(found, categories, folder)
