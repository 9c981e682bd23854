"""Figures and tables of components (matplotlib, PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..gradients.writing import refuse_links, write_file


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_spectrum(components, path, *, title: str = "Explained variance", show: int = 50) -> Path:
    """Bars of the first `show` components' explained-variance ratios with the cumulative curve."""
    plt = _pyplot()
    ratio = components.explained_variance_ratio.double().numpy()[:show]
    figure, axis = plt.subplots(figsize=(7, 3.6))
    positions = np.arange(1, len(ratio) + 1)
    axis.bar(positions, ratio, color="#4c72b0", label="per component")
    axis.set_xlabel(f"component (first {len(ratio)} of {components.n_components})")
    axis.set_ylabel("fraction of variance")
    twin = axis.twinx()
    twin.plot(positions, np.cumsum(ratio), color="#dd8452", marker=".", label="cumulative")
    twin.set_ylim(0, 1.02)
    twin.set_ylabel("cumulative")
    axis.set_title(f"{title} (effective rank {components.effective_rank():.1f})")
    figure.legend(loc="center right", bbox_to_anchor=(0.88, 0.5))
    figure.tight_layout()
    return _save(figure, path)


def plot_alignment(alignment, path, *, title: str = "Top examples per component and label") -> Path:
    """Heatmap of the (component, sign) x label table of top-k counts."""
    plt = _pyplot()
    table = alignment.table / max(alignment.k, 1)
    rows = [f"{r['component']}{'+' if r['sign'] > 0 else '-'}" for r in alignment.purity]
    figure, axis = plt.subplots(figsize=(2.5 + 0.9 * len(alignment.label_names), max(2.8, 0.9 + 0.28 * len(rows))))
    image = axis.imshow(table, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    axis.set_xticks(range(len(alignment.label_names)), alignment.label_names, rotation=30, ha="right")
    axis.set_yticks(range(len(rows)), rows)
    axis.set_ylabel("component and sign")
    axis.set_title(f"{title}\nAMI {alignment.ami:.2f}, NMI {alignment.nmi:.2f}", fontsize=10)
    figure.colorbar(image, ax=axis, label=f"share of top {alignment.k}")
    figure.tight_layout()
    return _save(figure, path)


def top_examples_markdown(components, texts: Sequence[str], *, labels: Optional[Sequence] = None, k: int = 5,
                          width: int = 100) -> str:
    """A Markdown table of each component's top-k examples on each side (text truncated to `width`)."""
    lines = ["| component | sign | label | text |", "|---|---|---|---|"]
    for c in range(components.n_components):
        for sign in ((1,) if components.kind == "kmeans" else (1, -1)):
            for row in components.top_examples(c, k, sign).tolist():
                text = str(texts[row]).replace("|", "/").replace("\n", " ")
                text = text if len(text) <= width else text[:width - 1] + "…"
                label = "" if labels is None else labels[row]
                lines.append(f"| {c} | {'+' if sign > 0 else '-'} | {label} | {text} |")
    return "\n".join(lines) + "\n"


def _save(figure, path) -> Path:
    """The figure into `path` (its format from the suffix, png without one), atomically and never through a link."""
    path = Path(path)
    try:
        refuse_links(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, lambda partial: figure.savefig(partial, dpi=120, format=path.suffix[1:] or "png"),
                   what="the figure")
    finally:
        _pyplot().close(figure)
    return path
