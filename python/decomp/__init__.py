"""decomp: decompose pre-trained models into components from per-example gradients, and merge models.

The package follows the procedure, data flowing one way (app -> analysis, merging -> gradients -> kernels):

  kernels/    the native ops (``decomp.ops``), their pure-PyTorch oracle (``decomp.reference``, loaded on first
              use: production code never imports it), the native loader and the counter-based hash
  gradients/  per-example gradients from layer factors: capture rules, outputs, the one pass engine and its
              consumers (compute_fisher, sketch_gradients, collect_grams, parameter directions), the row store
  analysis/   prepare, PCA / ICA / k-means, Components and their alignment, plots
  merging/    lazy sources, the merge engine, the method registry (methods/), recipes, saving, submodel
  app/        the command line, the demo and its report, fine-tuning, the built-in assets
"""

from ._startup import guard_startup as _guard_startup

_guard_startup()   # the `decomp` command: Ctrl-C while it imports is one line and exit code 130 (see _startup.py)

from .analysis import Alignment, Components, cluster, component_fishers, ica, pca, prepare
from .gradients import Fisher, GradientSketch, Grams, collect_grams, compute_fisher, coverage, sketch_gradients
from .kernels import ops
from .kernels.native import build_info
from .merging import (MergedState, merge, merge_methods, merge_recipe, register_merge_method, save_merged,
                      search_coefficients, submodel)

__version__ = build_info()["version"]

__all__ = ["ops", "reference", "build_info", "__version__", "coverage", "Fisher", "compute_fisher", "GradientSketch",
           "sketch_gradients", "Components", "Alignment", "pca", "ica", "cluster", "prepare", "component_fishers",
           "merge", "merge_methods", "register_merge_method", "MergedState",
           "collect_grams", "Grams", "submodel", "save_merged", "merge_recipe", "search_coefficients"]


def __getattr__(name: str):
    # The oracle is imported on first use only, so that no production path loads it by accident.
    if name == "reference":
        from .kernels import reference
        return reference
    raise AttributeError(f"module 'decomp' has no attribute {name!r}")
