"""Merging fine-tuned models of one base: lazy sources, the engine, the method registry, recipes and saving.

  sources.py    Source, SafetensorsReader: inputs read lazily, tensor by tensor
  engine.py     merge(), MergedState, the plan (merged / copied / per-task tensors), MergeContext,
                search_coefficients
  registry.py   register_merge_method, merge_methods, MergeMethod, Parameter (declarations and their validation)
  methods/      one file per method family, each registering its methods on import (found by pkgutil)
  recipes.py    merge_recipe: YAML recipes checked against a schema generated from the registry, plugins
  saving.py     save_merged: a save_pretrained folder with a model card
  submodel.py   submodel: θ_0 + P_S τ
"""

from . import methods  # noqa: F401  (registers the built-in methods)
from .engine import MergeContext, MergedState, merge, search_coefficients
from .recipes import merge_recipe, recipe_schema
from .registry import MergeMethod, Parameter, merge_methods, register_merge_method
from .saving import save_merged
from .submodel import submodel

__all__ = ["MergeContext", "MergeMethod", "MergedState", "Parameter", "merge", "merge_methods", "merge_recipe",
           "recipe_schema", "register_merge_method", "save_merged", "search_coefficients", "submodel"]
