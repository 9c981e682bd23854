"""Merge recipes: a YAML file describing one merge, checked against a schema generated from the method registry.

A recipe (paths relative to the recipe's folder)::

    method: ties                   # any name of decomp.merge_methods()
    base: base                     # the model the others were fine-tuned from (methods that need it)
    models:                        # paths, or mappings {path, weight}
      - path: tuned0
        weight: 0.5
      - tuned1
    fishers: [f0.safetensors, f1.safetensors]    # one per model (fisher; components: one list per model)
    grams: [g0.safetensors, g1.safetensors]      # one per model (regmean): module name -> Gram [in, in], as
                                                 # decomp.collect_grams returns, saved by safetensors' save_file
    heads: per_task                # or a model index; shapes differing across models
    missing: error                 # or skip
    parameters: {density: 0.2}     # the method's parameters (decomp.merge_methods()[method].parameters)
    like: tuned0                   # the model whose config and tokenizer the output takes (default: models[0])
    tokenizer: tuned1              # the model whose tokenizer it takes instead (default: like)
    dtype: bfloat16                # the saved weights' dtype (float16, bfloat16, float32, float64; default: like's)
    plugins: [my_methods.py]       # imported first: Python files (relative to the recipe) or module names

A mergekit configuration (``merge_method:``, ``models:`` of ``model:`` and ``parameters:``, ``base_model``, ...) is
read unchanged: decomp.merging.mergekit maps it onto the recipe above (its docstring has the table, the decomp
extensions ``fishers:`` and ``grams:``, and what is not supported). The model card of a saved merge holds both.

``plugins`` is how a method registered outside decomp (``register_merge_method`` in a file of one's own) is used
from a recipe and from ``decomp merge``: each entry is imported once per process, before the recipe is checked.

Every key is checked before any model is read: an unknown key, model-entry key or method parameter is a
ValueError with the closest known name ("did you mean"), a value of the wrong type or domain a ValueError naming
it, and malformed YAML a ValueError naming the file, line and column.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from pathlib import Path
from typing import Any

from .engine import MergedState, merge
from .mergekit import from_mergekit, is_mergekit
from .registry import REQUIRED, get_method, merge_methods, suggestion
from .saving import check_target, resolve_dtype, save_merged

# top-level keys: (JSON-schema type, what it holds)
RECIPE_KEYS = {
    "method": ("string", "a merge method (decomp.merge_methods())"),
    "models": ("array", "the fine-tuned models: paths, or mappings {path, weight}"),
    "base": ("string", "the model the others were fine-tuned from"),
    "fishers": ("array", "one Fisher file per model"),
    "grams": ("array", "one safetensors file of Grams (module name -> [in, in]) per model"),
    "heads": (["string", "integer"], "'per_task' or the index of the model whose head is kept"),
    "missing": ("string", "'error' or 'skip': tensors some models lack"),
    "parameters": ("object", "the method's parameters"),
    "like": ("string", "the model whose config and tokenizer the output takes"),
    "tokenizer": ("string", "the model whose tokenizer the output takes (default: like)"),
    "dtype": ("string", "the saved weights' dtype: float16, bfloat16, float32 or float64"),
    "plugins": ("array", "Python files or modules imported first (they register methods)"),
}
MODEL_KEYS = {"path": ("string", "the model: a save_pretrained folder or a safetensors file"),
              "weight": ("number", "its λ")}
JSON_TYPES = {float: "number", int: "integer", bool: "boolean", str: "string", list: "array"}
_PYTHON = {"string": (str, "a string"), "array": (list, "a list"), "object": (dict, "a mapping"),
           "number": ((int, float), "a number"), "integer": (int, "an integer")}
_imported: dict[str, Any] = {}


def recipe_schema() -> dict:
    """The JSON Schema of a recipe, generated from the registry: the top-level keys, the model entries, and for each
    registered method the parameters it takes (with defaults, types and docs)."""
    methods = merge_methods()
    per_method = [{"if": {"properties": {"method": {"const": name}}},
                   "then": {"properties": {"parameters": _parameters_schema(method)}}}
                  for name, method in methods.items()]
    model = {"type": "object", "required": ["path"], "additionalProperties": False,
             "properties": {k: {"type": t, "description": d} for k, (t, d) in MODEL_KEYS.items()}}
    properties = {k: {"type": t, "description": d} for k, (t, d) in RECIPE_KEYS.items()}
    properties["method"]["enum"] = list(methods)
    properties["models"]["items"] = {"oneOf": [{"type": "string"}, {"$ref": "#/$defs/model"}]}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "decomp merge recipe",
            "type": "object", "required": ["method", "models"], "additionalProperties": False,
            "properties": properties, "$defs": {"model": model}, "allOf": per_method}


def _parameters_schema(method) -> dict:
    """The JSON Schema of one method's `parameters:` mapping."""
    properties = {}
    for p in method.parameters:
        entry = {"description": f"{p.doc} ({p.expected()})"}
        entry.update({"type": JSON_TYPES[p.type]} if p.type in JSON_TYPES else {})
        entry.update({"default": p.default} if p.default is not REQUIRED else {})
        properties[p.name] = entry
    required = [p.name for p in method.parameters if p.default is REQUIRED]
    return {"type": "object", "additionalProperties": False, "properties": properties,
            **({"required": required} if required else {})}


def read_recipe(recipe_path) -> dict:
    """The recipe as a mapping, its plugins imported and every key checked (see the module's docstring); a mergekit
    configuration comes back as the decomp recipe it maps onto."""
    return _read(recipe_path)[1]


def _read(recipe_path) -> tuple[dict, dict]:
    """(the YAML mapping as written, the decomp recipe it is or maps onto), checked."""
    import yaml
    recipe_path = Path(recipe_path)
    try:
        spec = yaml.safe_load(recipe_path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{recipe_path}{where}: malformed YAML: {problem}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{recipe_path} must be a YAML mapping with at least 'method' and 'models'")
    try:
        plugins = spec.get("plugins") or []
        if not isinstance(plugins, list):
            raise ValueError(f"plugins must be a list of Python files or module names; got {plugins!r}")
        for plugin in plugins:
            import_plugin(plugin, recipe_path.parent)
        written = spec
        if is_mergekit(spec):
            spec = from_mergekit(spec, recipe_path.parent)
        methods = merge_methods()
        method = methods.get(spec.get("method")) if isinstance(spec.get("method"), str) else None
        _check_keys(spec, RECIPE_KEYS, "a recipe", [p.name for p in method.parameters] if method else ())
        missing = [key for key in ("method", "models") if key not in spec]
        if missing:
            raise ValueError(f"a recipe needs {' and '.join(missing)}: (it holds {', '.join(spec) or 'nothing'})")
        _check_method(spec)
    except ValueError as error:
        raise ValueError(f"{recipe_path}: {error}") from None
    return written, spec


def _check_keys(mapping: dict, known: dict, owner: str, method_parameters=()) -> None:
    """Unknown keys are errors with the closest known one; known keys must hold their JSON type."""
    for key, value in mapping.items():
        if key not in known:
            hint = (f" ({key!r} is a parameter of the method: put it under parameters:)"
                    if key in method_parameters else suggestion(key, known))
            raise ValueError(f"unknown key {key!r} in {owner}{hint}; {owner} takes {', '.join(known)}")
        if value is None:   # an empty entry (`base:`) means unset, as if absent
            continue
        kinds = known[key][0] if isinstance(known[key][0], list) else [known[key][0]]
        if not any(isinstance(value, _PYTHON[k][0]) for k in kinds) or isinstance(value, bool):
            raise ValueError(f"{key} must be {' or '.join(_PYTHON[k][1] for k in kinds)} ({known[key][1]}); got "
                             f"{value!r}")


def _check_method(spec: dict) -> None:
    """The method exists, the model entries and parameters are ones it takes, each of its type and domain."""
    method = get_method(spec["method"])
    if not spec["models"]:
        raise ValueError("models must list at least one model")
    for entry in spec["models"]:
        if isinstance(entry, dict):
            _check_keys(entry, MODEL_KEYS, "a model entry")
            if "path" not in entry:
                raise ValueError(f"a model entry needs path: (got {entry!r})")
        elif not isinstance(entry, str):
            raise ValueError(f"a model entry is a path or a mapping {{path, weight}}; got {entry!r}")
    for key in ("fishers", "grams"):
        if spec.get(key) and len(spec[key]) != len(spec["models"]):
            raise ValueError(f"{key} must hold one file per model ({len(spec['models'])}); got {len(spec[key])}")
    resolve_dtype(spec.get("dtype"))
    method.validate(spec.get("parameters") or {}, len(spec["models"]))


def import_plugin(plugin: str, root: Path):
    """Imports a plugin once per process: a .py file (relative to `root` unless absolute) or a module name."""
    if not isinstance(plugin, str):
        raise ValueError(f"plugins must list file paths or module names; got {plugin!r}")
    if plugin.endswith(".py"):
        path = (root / plugin).resolve()
        if not path.is_file():
            raise ValueError(f"plugin {plugin} does not exist (looked for {path})")
        if str(path) not in _imported:
            name = f"decomp_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            _imported[str(path)] = module
        return _imported[str(path)]
    try:
        return importlib.import_module(plugin)
    except ImportError as error:
        raise ValueError(f"plugin {plugin!r} cannot be imported: {error}") from None


def merge_recipe(recipe_path, out_dir=None, overwrite: bool = False) -> MergedState:
    """Runs a YAML recipe, decomp's or mergekit's (see the module's docstring). With out_dir, saves the result there
    (save_pretrained form, model card with the recipe); an existing non-empty out_dir is refused unless it holds an
    earlier merge and overwrite=True (checked before any model is read)."""
    recipe_path = Path(recipe_path)
    written, spec = _read(recipe_path)
    if out_dir is not None:
        check_target(out_dir, overwrite)
    root = recipe_path.parent

    def resolve(p):
        return str((root / p).resolve()) if not Path(p).is_absolute() and (root / p).exists() else p

    entries = [m if isinstance(m, dict) else {"path": m} for m in spec["models"]]
    models = [resolve(e["path"]) for e in entries]
    weights = [e.get("weight", 1.0) for e in entries] if any("weight" in e for e in entries) else None
    inputs = {key: [resolve(f) for f in spec[key]] if spec.get(key) else None for key in ("fishers", "grams")}
    base = resolve(spec["base"]) if spec.get("base") else None
    state = merge(models, method=spec["method"], base=base, weights=weights, **inputs,
                  heads=spec.get("heads"), missing=spec.get("missing", "error"), **(spec.get("parameters") or {}))
    state.recipe["recipe_file"] = str(recipe_path)
    if out_dir is not None:
        card = spec if written is spec else {"mergekit": written, "decomp": spec}
        save_merged(state, out_dir, like=resolve(spec.get("like", models[0])), recipe=card,
                    inputs=models + ([base] if base else []), dtype=spec.get("dtype"),
                    tokenizer=resolve(spec["tokenizer"]) if spec.get("tokenizer") else None, overwrite=overwrite)
    return state
