"""decomp: decompose pre-trained models into components from per-example gradients, and merge models.

The native core (decomp._C) holds the hot kernels; ``decomp.ops`` exposes them as torch operators and
``decomp.reference`` holds their pure-PyTorch counterparts (the test oracle and benchmark baseline).
``decomp.compute_fisher`` and ``decomp.sketch_gradients`` run them over a Hugging Face model and a dataset.
"""

from . import ops, reference
from ._native import build_info
from .capture import coverage
from .decompose import Alignment, Components, cluster, component_fishers, ica, pca, prepare
from .fisher import Fisher, compute_fisher
from .merge import (MergedState, collect_grams, merge, merge_recipe, save_merged, search_coefficients,
                    submodel)
from .sketch import GradientSketch, sketch_gradients

__version__ = build_info()["version"]

__all__ = ["ops", "reference", "build_info", "__version__", "coverage", "Fisher", "compute_fisher", "GradientSketch",
           "sketch_gradients", "Components", "Alignment", "pca", "ica", "cluster", "prepare", "component_fishers",
           "merge", "MergedState", "collect_grams", "submodel", "save_merged", "merge_recipe", "search_coefficients"]
