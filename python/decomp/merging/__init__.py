"""Merging fine-tuned models of one base: lazy sources, the engine, the method registry, recipes and saving."""

from .merge import MergedState, merge, merge_recipe, save_merged, search_coefficients, submodel

__all__ = ["MergedState", "merge", "merge_recipe", "save_merged",
           "search_coefficients", "submodel"]
