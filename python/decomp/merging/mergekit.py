"""mergekit configurations, read unchanged: ``decomp merge config.yml`` and ``merge_recipe`` take a mergekit YAML file
(recognised by its ``merge_method:`` key) and run the same merge with decomp's methods.

Checked against mergekit's source (github.com/arcee-ai/mergekit: mergekit/config.py, merge_methods/registry.py,
generalized_task_arithmetic.py, linear.py, slerp.py, model_stock.py, sparsify.py) and docs/merge_methods.md.
A parameter is looked up as mergekit does: the model's own ``parameters:``, then the top-level ``parameters:``,
then mergekit's default (``density`` 1, ``gamma`` 0.01, ``epsilon`` 0.15, ``lambda`` 1, ``normalize`` and
``rescale`` by method, as below). Weights w_m are the models' ``weight``; τ_m their task vectors.

=================  =========================================================================================
mergekit           decomp
=================  =========================================================================================
linear             average, weights w (normalize: true, the default); normalize: false only when Σ w = 1
task_arithmetic    task_arithmetic, weights w (w / Σ w with normalize: true), scale = lambda
ties               ties, trim per_tensor, density, normalize (default true), scale = lambda
dare_ties          dare_ties, density, normalize (default false), scale = lambda
dare_linear        dare, density, weights w (w / Σ w with normalize: true), scale = lambda
breadcrumbs        breadcrumbs, density, gamma, weights w (w / Σ w with normalize: true), scale = lambda
breadcrumbs_ties   breadcrumbs_ties, density, gamma, normalize (default false), scale = lambda
della              della, density, epsilon, normalize (default true), scale = lambda
della_linear       della_linear, density, epsilon, weights w (w / Σ w with normalize: true), scale = lambda
slerp              slerp, models [base_model, the other], t
model_stock        model_stock, filter_wise
=================  =========================================================================================

Any other name of ``decomp.merge_methods()`` (fisher, regmean, tsv, iso_c, ...) is accepted too: ``weight`` per
model, the method's own parameters (decomp's names) at the top level. decomp's extensions, one more key each:

* ``fishers: [f0.safetensors, ...]``: one Fisher file (``decomp fisher``) per entry of ``models:``; with
  ``merge_method: linear`` this makes the merge decomp's Fisher-weighted average (method ``fisher``, the weights
  as λ); with ``merge_method: fisher`` or ``components`` they are that method's Fishers.
* ``grams: [g0.safetensors, ...]``: one safetensors file of Grams (module name -> [in, in], as
  ``decomp.collect_grams`` returns, saved with safetensors.torch.save_file) per entry of ``models:``; with
  ``linear`` (or ``regmean``) this makes the merge RegMean.
* ``heads``, ``missing`` and ``plugins`` as in decomp's recipes.

Where decomp differs, by design: drops (dare_*, della*) are drawn from decomp's seeded hash (top-level ``seed``,
default 0) rather than torch.bernoulli, and ``rescale: true`` (mergekit's default for them) is decomp's rescaling by
the papers' 1/p per entry, where mergekit matches each tensor's L1 norm; decomp's per-tensor TIES trim keeps
round(density · n) entries (mergekit ⌊density · n⌋) and its sign election gives an entry whose weighted sum is
exactly 0 no sign (mergekit +); every merge is computed in float64.

Reported, never silently ignored:

* errors (ValueError naming the key): ``slices`` and ``modules`` (layer stacking, partial layer ranges),
  layer-wise gradients (``t: [0, 0.5, 1]``) and filtered values (``- filter: mlp``), per-model values of a
  parameter decomp's method holds once (``density``, ``gamma``, ``epsilon``: "decomp does not support per-model
  density; use one value"), ``rescale: false`` on dare/della and ``rescale: true`` on ties/breadcrumbs,
  ``tokenizer_source: union`` and ``tokenizer:`` beyond ``source``, ``chat_template``, LoRA references
  (``model+lora``), mergekit methods decomp lacks (nuslerp, multislerp, karcher, sce, ram, passthrough, ...), and
  unknown keys or parameters;
* warnings (harmless, the merge is the same): ``int8_mask`` (a memory option; decomp computes in float64),
  ``rescale`` on task_arithmetic (mergekit ignores it there), and ``density`` given to task_arithmetic or linear.

``dtype`` (or ``out_dtype``, which wins) is the dtype of the saved weights (float16, bfloat16, float32, mergekit's
fp16 / bf16 ...). Models are local paths (relative to the config's folder, or absolute); a Hub name is an error
saying so. The output takes its config from ``base_model`` (else the first model), as mergekit's donor, and its
tokenizer from ``tokenizer_source`` (base, or one of the models) or the same model.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .registry import merge_methods, suggestion


@dataclass(frozen=True)
class Family:
    """How a mergekit method maps onto a decomp one: its name, its sparsification (None, magnitude, random,
    outliers, della), whether it elects signs, and mergekit's defaults of normalize and rescale."""
    decomp: str
    sparsify: Optional[str]
    consensus: bool
    normalize: bool
    rescale: bool


TASK_ARITHMETIC = {
    "task_arithmetic": Family("task_arithmetic", None, False, False, False),
    "ties": Family("ties", "magnitude", True, True, False),
    "dare_ties": Family("dare_ties", "random", True, False, True),
    "dare_linear": Family("dare", "random", False, False, True),
    "breadcrumbs": Family("breadcrumbs", "outliers", False, False, False),
    "breadcrumbs_ties": Family("breadcrumbs_ties", "outliers", True, False, False),
    "della": Family("della", "della", True, True, True),
    "della_linear": Family("della_linear", "della", False, False, True),
}
SPARSITY = {None: {}, "magnitude": {"density": 1.0}, "random": {"density": 1.0},
            "outliers": {"density": 1.0, "gamma": 0.01}, "della": {"density": 1.0, "epsilon": 0.15}}
MERGEKIT_ONLY = ("nuslerp", "multislerp", "karcher", "sce", "ram", "ramplus_tl", "passthrough", "arcee_fusion",
                 "nearswap")
CONFIG_KEYS = ("merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
               "tokenizer", "chat_template", "slices", "modules", "fishers", "grams", "heads", "missing", "plugins")
UNSUPPORTED_KEYS = {
    "slices": "slices (layer ranges, layer stacking) are not supported; merge whole models with models:",
    "modules": "modules (per-module merges) are not supported; merge whole models with models:",
    "chat_template": "chat_template is not supported; set it on the tokenizer of the saved merge",
}


def is_mergekit(spec: dict) -> bool:
    return "merge_method" in spec


def from_mergekit(spec: dict, root: Path) -> dict:
    """The decomp recipe (method, models with weights, base, parameters, dtype, like, tokenizer, ...) that runs the
    merge a mergekit configuration describes; ValueError naming what decomp does not support."""
    if "method" in spec:
        raise ValueError("a recipe holds either decomp's method: or mergekit's merge_method:, not both")
    for key in spec:
        if key in UNSUPPORTED_KEYS:
            raise ValueError(UNSUPPORTED_KEYS[key])
        if key not in CONFIG_KEYS:
            raise ValueError(f"unknown key {key!r} in a mergekit configuration{suggestion(key, CONFIG_KEYS)}; "
                             f"decomp reads {', '.join(k for k in CONFIG_KEYS if k not in UNSUPPORTED_KEYS)}")
    name = spec["merge_method"]
    mapped = {**{k: (lambda c, f=f: _task_arithmetic(c, f)) for k, f in TASK_ARITHMETIC.items()},
              "linear": _linear, "slerp": _slerp, "model_stock": _model_stock}
    if not isinstance(name, str) or (name not in mapped and name not in merge_methods()):
        lacking = " (a mergekit method decomp does not have)" if name in MERGEKIT_ONLY else \
            suggestion(name, [*mapped, *merge_methods()]) if isinstance(name, str) else ""
        raise ValueError(f"merge_method {name!r} is not supported{lacking}; decomp runs mergekit's "
                         f"{', '.join(mapped)} and its own "
                         f"{', '.join(m for m in merge_methods() if m not in mapped)}")
    config = Config(spec, root)
    recipe = mapped[name](config) if name in mapped else _decomp_method(config, name)
    return config.finish(recipe)


class Config:
    """A mergekit configuration being read: its models (local paths), base model, and parameter look-ups."""

    def __init__(self, spec: dict, root: Path):
        self.spec, self.root, self.used = spec, root, set()
        self.method = spec["merge_method"]
        self.globals = _mapping(spec.get("parameters"), "parameters")
        entries = spec.get("models")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"models must be a list of entries {{model: <path>, parameters: {{...}}}}; got "
                             f"{entries!r}")
        self.entries = [self._entry(e, i) for i, e in enumerate(entries)]
        self.base = self.path(spec["base_model"], "base_model") if spec.get("base_model") is not None else None

    def _entry(self, entry, index: int) -> tuple[str, dict]:
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise ValueError(f"models[{index}] must be a mapping with model: (and parameters:); got {entry!r}")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            hint = " (layer ranges belong to slices:, which decomp does not support)" if "layer_range" in extra \
                else suggestion(extra[0], ["model", "parameters"])
            raise ValueError(f"models[{index}] has unknown key {extra[0]!r}{hint}; an entry takes model, parameters")
        return self.path(entry["model"], f"models[{index}].model"), _mapping(entry.get("parameters"),
                                                                             f"models[{index}].parameters")

    def path(self, reference, what: str) -> str:
        """A model reference as a local path: relative to the config's folder, or absolute."""
        if not isinstance(reference, str):
            raise ValueError(f"{what} must be a path; got {reference!r}")
        local = Path(reference) if Path(reference).is_absolute() else self.root / reference
        if local.exists():
            return str(local.resolve())
        if "+" in reference:
            raise ValueError(f"{what}={reference!r}: LoRA references (model+lora) are not supported; merge the "
                             f"adapter into its model first")
        raise FileNotFoundError(f"{what}={reference!r} is not a local folder or file (looked for {local}); decomp "
                                f"merges local save_pretrained folders and does not download from the Hub: "
                                f"download it first (huggingface-cli download {reference} --local-dir <folder>)")

    def models(self, without_base: bool) -> list[tuple[str, dict]]:
        """The entries merged: every one, or (task-vector methods) those that are not the base model."""
        return [e for e in self.entries if not (without_base and e[0] == self.base)]

    def value(self, name: str, default=None, parameters: Optional[dict] = None, what: str = ""):
        """A parameter as mergekit looks it up (the model's, then the top level's, then the default), checked to be
        one value (no gradient, no filter)."""
        self.used.add(name)
        where = "parameters"
        if parameters is not None and name in parameters:
            value, where = parameters[name], what
        else:
            value = self.globals.get(name, default)
        if isinstance(value, (list, dict)):
            raise ValueError(f"{where}: {name}={value!r}: layer-wise gradients and filtered values are not "
                             f"supported; use one value for every tensor")
        return value

    def per_model(self, name: str, default, entries: list) -> object:
        """A per-model parameter that decomp's method holds once: every model's value, which must agree."""
        values = [self.value(name, default, p, f"the entry of {Path(path).name}") for path, p in entries]
        if any(v != values[0] for v in values[1:]):
            shown = ", ".join(f"{Path(path).name}: {v}" for (path, _), v in zip(entries, values))
            raise ValueError(f"decomp does not support per-model {name} ({shown}); use one value")
        return values[0]

    def weights(self, entries: list, required: bool = True) -> Optional[list]:
        values = [self.value("weight", None, p, f"the entry of {Path(path).name}") for path, p in entries]
        for (path, _), value in zip(entries, values):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"the entry of {Path(path).name}: weight must be a number; got {value!r}")
        if any(v is None for v in values):
            if required:
                missing = Path(entries[values.index(None)][0]).name
                raise ValueError(f"merge_method {self.method!r} needs a weight for every model (mergekit requires "
                                 f"it); {missing} has none")
            return None
        return values

    def finish(self, recipe: dict) -> dict:
        """The recipe with the keys every method shares, after checking that no parameter went unused."""
        spec = self.spec
        for _, parameters in self.entries:
            _no_other(parameters, self.used, f"merge_method {self.method!r} takes no per-model parameter")
        _no_other(self.globals, self.used | set(recipe.get("parameters", {})),
                  f"merge_method {self.method!r} takes no parameter")
        if self.globals.get("int8_mask"):
            warnings.warn("int8_mask is a memory option of mergekit; decomp computes in float64 and ignores it",
                          stacklevel=4)
        dtype = spec.get("out_dtype") or spec.get("dtype")
        recipe.update({"dtype": dtype} if dtype else {})
        recipe["like"] = recipe.get("base") or recipe["models"][0]["path"]
        tokenizer = self.tokenizer()
        recipe.update({"tokenizer": tokenizer} if tokenizer else {})
        for key in ("fishers", "grams", "heads", "missing", "plugins"):
            if spec.get(key) is not None and key not in recipe:
                recipe[key] = spec[key]
        return recipe

    def tokenizer(self) -> Optional[str]:
        source = self.spec.get("tokenizer_source")
        tokenizer = self.spec.get("tokenizer")
        if tokenizer is not None:
            tokenizer = _mapping(tokenizer, "tokenizer")
            if set(tokenizer) - {"source"}:
                raise ValueError(f"tokenizer: {sorted(set(tokenizer) - {'source'})} are not supported (decomp copies "
                                 f"one model's tokenizer); give only tokenizer: {{source: base}} or a model")
            source = tokenizer.get("source", "union")   # mergekit's default for a tokenizer: section
        if source is None:
            return None
        if source == "union":
            key = "tokenizer_source" if tokenizer is None else "tokenizer: source (mergekit's default)"
            raise ValueError(f"{key}: union (a vocabulary merged from every model) is not supported; use base or "
                             f"one of the models")
        if source == "base":
            if self.base is None:
                raise ValueError("tokenizer_source: base needs base_model")
            return self.base
        return self.path(source, "tokenizer_source")


def _mapping(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping; got {value!r}")
    return value


def _no_other(parameters: dict, used: set, message: str) -> None:
    other = sorted(set(parameters) - used - {"int8_mask"})
    if other:
        raise ValueError(f"{message} {other[0]!r}{suggestion(other[0], used)} (decomp reads {', '.join(sorted(used))})")


def _typed(value, name: str, kind: type):
    """The value of parameter `name`, checked to be a number (kind float) or true / false (kind bool)."""
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"parameter {name} must be true or false; got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"parameter {name} must be a number; got {value!r}")
        return float(value)
    return value


def _normalized(weights: list, method: str) -> list:
    total = sum(weights)
    if not math.isfinite(total) or abs(total) < 1e-8:
        raise ValueError(f"normalize: true divides the weights {weights} by their sum {total:g} ({method}); give "
                         f"weights with a sum that is not zero")
    return [w / total for w in weights]


def _linear(config: Config) -> dict:
    entries = config.models(without_base=False)
    weights = config.weights(entries)
    normalize = _typed(config.value("normalize", True), "normalize", bool)
    if any("density" in p for _, p in entries) or "density" in config.globals:
        warnings.warn("density has no effect on linear (as in mergekit): ignored", stacklevel=4)
        config.used.add("density")
    if config.base is not None and all(path != config.base for path, _ in entries):
        raise ValueError("merge_method 'linear' does not use base_model (mergekit ignores it): list the base in "
                         "models: with a weight, or leave base_model out")
    fishers, grams = config.spec.get("fishers"), config.spec.get("grams")
    if not normalize and abs(sum(weights) - 1) > 1e-12:
        raise ValueError(f"normalize: false on linear (the unnormalised sum Σ w θ, weights summing to "
                         f"{sum(weights):g}) has no decomp counterpart; use normalize: true or weights summing to 1")
    method = "fisher" if fishers is not None else "regmean" if grams is not None else "average"
    if fishers is not None and grams is not None:
        raise ValueError("give fishers: (a Fisher-weighted average) or grams: (RegMean), not both")
    return {"method": method, "models": _entries(entries, weights), "parameters": {}}


def _task_arithmetic(config: Config, family: Family) -> dict:
    if config.base is None:
        raise ValueError(f"merge_method {config.method!r} works on task vectors: it needs base_model")
    entries = config.models(without_base=True)
    if not entries:
        raise ValueError(f"merge_method {config.method!r} needs at least one model besides base_model")
    weights = config.weights(entries)
    parameters = {"scale": _typed(config.value("lambda", 1.0), "lambda", float)}
    for name, default in SPARSITY[family.sparsify].items():
        parameters[name] = _typed(config.per_model(name, default, entries), name, float)
    normalize = _typed(config.value("normalize", family.normalize), "normalize", bool)
    rescale = _typed(config.value("rescale", family.rescale), "rescale", bool)
    if family.sparsify is None:
        if "rescale" in config.globals:
            warnings.warn("rescale has no effect on task_arithmetic (as in mergekit): ignored", stacklevel=4)
        if any("density" in p for _, p in entries) or "density" in config.globals:
            warnings.warn("density has no effect on task_arithmetic (as in mergekit): ignored", stacklevel=4)
        config.used.update({"density", "rescale"})
    elif rescale != family.rescale:
        does = "rescales dropped task vectors by 1/p, as the papers" if family.rescale else \
            "does not rescale trimmed task vectors"
        raise ValueError(f"rescale: {str(rescale).lower()} on {config.method!r} is not supported: decomp {does}")
    if family.consensus:
        parameters["normalize"] = normalize
    elif normalize:
        weights = _normalized(weights, config.method)
    if family.decomp == "ties":
        parameters["trim"] = "per_tensor"   # mergekit trims each tensor
    if family.sparsify in ("random", "della"):
        parameters["seed"] = config.value("seed", 0)
    if family.sparsify == "della" and parameters["density"] >= 1:
        parameters["epsilon"] = 0.0   # mergekit keeps every entry at density 1, whatever epsilon
    return {"method": family.decomp, "base": config.base, "models": _entries(entries, weights),
            "parameters": parameters}


def _slerp(config: Config) -> dict:
    if config.base is None:
        raise ValueError("merge_method 'slerp' needs base_model (t = 0 gives it, t = 1 the other model)")
    others = config.models(without_base=True)
    if len(others) != 1 or len(config.entries) > 2:
        raise ValueError(f"merge_method 'slerp' interpolates between base_model and exactly one other model; got "
                         f"{len(others)} others")
    t = config.value("t")
    if t is None:
        raise ValueError("merge_method 'slerp' needs t (in parameters:)")
    return {"method": "slerp", "models": [{"path": config.base}, {"path": others[0][0]}],
            "parameters": {"t": t}}


def _model_stock(config: Config) -> dict:
    if config.base is None:
        raise ValueError("merge_method 'model_stock' needs base_model")
    others = config.models(without_base=True)
    return {"method": "model_stock", "base": config.base, "models": _entries(others, None),
            "parameters": {"filter_wise": config.value("filter_wise", False)}}


def _decomp_method(config: Config, name: str) -> dict:
    """A decomp method under merge_method: per-model weights, the method's own parameters at the top level."""
    method = merge_methods()[name]
    uses_base = "base" in method.needs
    entries = config.models(without_base=uses_base)
    weights = config.weights(entries, required=False) if method.weighted else None
    parameters = {k: config.value(k) for k in config.globals if k != "int8_mask"}
    recipe = {"method": name, "models": _entries(entries, weights), "parameters": parameters}
    if config.base is not None:
        recipe["base"] = config.base
    return recipe


def _entries(entries: list, weights: Optional[list]) -> list[dict]:
    if weights is None:
        return [{"path": path} for path, _ in entries]
    return [{"path": path, "weight": float(w)} for (path, _), w in zip(entries, weights)]
