"""Per-example gradients from layer factors, and the passes that consume them.

capture (rules and hooks) -> engine (one model pass over data, sharded, with progress and float64 reductions) ->
consumers: fisher (compute_fisher), sketch (sketch_gradients, with the row store), grams (collect_grams) and
directions (parameter directions of components).
"""

from .capture import coverage
from .fisher import Fisher, compute_fisher
from .grams import Grams, collect_grams
from .sketch import GradientSketch, sketch_gradients

__all__ = ["coverage", "Fisher", "compute_fisher", "collect_grams", "Grams", "GradientSketch", "sketch_gradients"]
