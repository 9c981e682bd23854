"""The merge engine: checks every input before any work, plans which tensors are merged, copied or kept per task,
then streams the merged tensors one at a time through the registered method's formula.

θ* from fine-tuned θ_1..θ_M of one base θ_0, task vectors τ_m = θ_m - θ_0, per-model weights λ_m; the methods and
their formulas are in ``decomp/merging/methods/`` (``decomp.merge_methods()`` lists them with their parameters).
Models are read one tensor at a time (safetensors files are opened lazily), so memory stays near one model plus a
few tensors; a method that needs a global statistic (TIES' thresholds) computes it in its ``prepare`` step. A
method whose formula works entry by entry, or row by row (its ``slices`` declaration), is given large tensors in
blocks of whole rows of about SLICE_ENTRIES entries, with the same result bit for bit: the float64 transients of
the formula on a 30522 x 384 word embedding (1.7 GB for TIES) shrink to a few blocks'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .registry import NEED_DOCS, MergeMethod, get_method, merge_methods
from .sources import Source

# entries per block when a method is given a tensor in blocks of rows: small enough that a formula's float64
# transients (a dozen blocks for TIES) stay near 100 MB, large enough that per-block overhead does not show
SLICE_ENTRIES = 1 << 20


class MergedState(dict):
    """The merged state dict; ``.heads[m]`` holds the tensors kept per task (shapes differing across models),
    ``.recipe`` what was done, and ``.notes`` per-tensor decisions (which tensors were copied or averaged)."""
    heads: dict
    recipe: dict
    notes: dict


@dataclass
class Plan:
    """What becomes of each tensor: merged by the method, copied from one model (index; `why` says why), kept per
    task (shapes differ and heads="per_task"), or left out (`skipped`: key -> why)."""
    merged: list[str] = field(default_factory=list)
    copied: dict[str, int] = field(default_factory=dict)
    per_task: list[str] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class MergeContext:
    """What a method's prepare step and formula see: the inputs (sources, the base, λ weights), the validated
    parameters (read-only), what the method needs (fishers [M] of key -> tensor, grams [M] of module -> [in, in],
    components [M] lists of component Fishers), the plan, what prepare() returned, and per-tensor notes."""
    method: MergeMethod
    sources: list[Source]
    base: Optional[Source]
    weights: list[float]
    params: Mapping[str, Any]
    plan: Plan
    fishers: Optional[list[Mapping[str, Tensor]]] = None
    grams: Optional[list[Mapping[str, Tensor]]] = None
    components: Optional[list[list[Mapping[str, Tensor]]]] = None
    prepared: Any = None
    notes: dict[str, str] = field(default_factory=dict)
    rows: Optional[slice] = None   # the rows (first dimension) of the tensor the formula is given; None: all
    held: dict = field(default_factory=dict, repr=False)   # id(mapping) -> (key, tensor) read for the tensor
    gram_widths: dict = field(default_factory=dict, repr=False)   # module -> its Gram's width (every model's)
    layouts: dict = field(default_factory=dict, repr=False)       # key -> gram_layout(key), found once

    def note(self, key: str, text: str) -> None:
        """Records a per-tensor decision (e.g. averaged for want of a Fisher); it ends in the result's notes."""
        self.notes[key] = text

    def base_value(self, key: str) -> Tensor:
        """θ_0[key] in float64 (the rows the formula is given)."""
        return self.base.get(key, self.rows).double()

    def part(self, mapping: Mapping[str, Tensor], key: str) -> Tensor:
        """mapping[key] (a Fisher's, say), restricted to the rows the formula is given. While a tensor is merged in
        blocks, each mapping's tensor is read once and held until the tensor is done, not read again per block."""
        if self.rows is None:
            return mapping[key]
        held = self.held.get(id(mapping))
        if held is None or held[0] != key:
            held = self.held[id(mapping)] = (key, mapping[key])
        return held[1][self.rows]

    def first_entry(self, part: Tensor) -> int:
        """The flat index, in the whole tensor, of the first entry of `part` (the block the formula is given), so
        that what is drawn per entry (DARE's drops) is keyed by its place in the whole tensor."""
        return 0 if self.rows is None else self.rows.start * math.prod(part.shape[1:])

    def blocks(self, key: str) -> list[Optional[slice]]:
        """The blocks of rows tensor `key` is handed to the method in ([None]: whole), by its ``slices``."""
        return row_blocks(self.sources[0].shape(key), self.method.slicing(key, self)) or [None]

    def gram_layout(self, key: str) -> Optional[bool]:
        """For a 2-D weight whose module has a Gram [in, in] in every model's grams: whether the weight is stored
        [in, out] (transformers' Conv1D) rather than nn.Linear's [out, in]; None when the Grams do not cover it.
        A rectangular weight's layout is the side its Gram fits (the widths were read when the Grams were
        checked); a square one's comes from collect_grams' record (decomp.Grams.stored_in_out), else from the
        sources' modules, else it is taken as nn.Linear's, noted. Found once per key."""
        if key not in self.layouts:
            self.layouts[key] = self._find_gram_layout(key)
        return self.layouts[key]

    def _find_gram_layout(self, key: str) -> Optional[bool]:
        module = key.rsplit(".", 1)[0]
        shape = self.sources[0].shape(key)
        if not key.endswith(".weight") or len(shape) != 2 or module not in self.gram_widths:
            return None
        if shape[0] != shape[1]:
            return self.gram_widths[module] == shape[0]
        for record in [getattr(g, "stored_in_out", None) for g in self.grams] + \
                      [s.stored_in_out() for s in (*self.sources, *([self.base] if self.base else []))]:
            if record is not None:
                return module in record
        self.note(key, "square weight of unknown layout (the Grams are not collect_grams' own and no source is a "
                       "model): taken as nn.Linear's [out, in]")
        return False

    def task_vectors(self, key: str, values: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """(θ_0[key], [τ_m = θ_m - θ_0 for each model]) in float64."""
        base = self.base_value(key)
        return base, [v - base for v in values]

    def mean(self, values: list[Tensor], weights: Optional[Sequence[float]] = None) -> Tensor:
        """Σ λ_m v_m / Σ λ_m (λ: the merge's weights unless given)."""
        weights = self.weights if weights is None else weights
        return sum(w * v for w, v in zip(weights, values)) / sum(weights)


def row_blocks(shape: tuple, slices: Optional[str]) -> Optional[list[slice]]:
    """Blocks of whole rows of about SLICE_ENTRIES entries covering a tensor of `shape`, or None when it is merged
    whole: small tensors, methods that need whole tensors, and 1-D tensors of row-wise methods (one row)."""
    numel = math.prod(shape)
    if slices is None or not shape or numel <= SLICE_ENTRIES or (slices == "rows" and len(shape) == 1):
        return None
    step = max(1, SLICE_ENTRIES // max(math.prod(shape[1:]), 1))
    return [slice(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def merge(models: Sequence, *, method: str, base=None, weights: Optional[Sequence[float]] = None,
          fishers: Optional[Sequence] = None, grams: Optional[Sequence] = None, heads=None, missing: str = "error",
          progress: bool = False, **params) -> MergedState:
    """Merges `models` (nn.Modules, state dicts, safetensors files or save_pretrained folders) by `method`, a name
    of ``decomp.merge_methods()``; `params` are that method's parameters.

    weights: per-model λ, finite numbers (default 1 each; average, fisher, components and regmean divide by their
    sum, which must not be zero). fishers / grams: one per model, for the methods that need them (a Fisher: key ->
    tensor of the parameter's shape, finite and >= 0, or a file of Fisher.save; a Grams mapping: module name ->
    [in, in], finite and symmetric, or a safetensors file of one). heads: what to do with tensors whose shapes
    differ across models (classification heads with different label counts): None raises, "per_task" keeps each
    model's in ``result.heads[m]``, an int takes that model's. Integer buffers are copied (and must agree). missing:
    "error" (default) when an input lacks a tensor the others hold, or "skip" to leave such tensors out (listed in
    ``result.notes``); tensors only the base holds are always left out. Every input is checked before any tensor
    is merged; an error names the first mismatching tensor. A merged tensor that is not finite (NaN or inf, or
    overflowing the models' dtype) is a ValueError naming it: such a merge is never returned."""
    declaration = get_method(method)
    if not isinstance(models, (list, tuple)) or len(models) < 1:
        raise ValueError(f"models must be a non-empty list of models, state dicts or paths; got {models!r}"[:300])
    M = len(models)
    values = declaration.validate(params, M)
    weights = check_weights(weights, declaration, M)
    sources = [Source(m, f"model {i}") for i, m in enumerate(models)]
    base_source = Source(base, "base") if base is not None else None
    _check_needs(declaration, base_source, fishers, grams)
    plan = make_plan(sources, base_source, heads, missing)
    context = MergeContext(declaration, sources, base_source, weights, values, plan)
    _attach_inputs(context, fishers, grams)
    if declaration.prepare is not None:
        context.prepared = declaration.prepare(context)
    result = _run(context, progress)
    result.recipe = {"method": method, "weights": weights, "parameters": dict(values), "heads": heads,
                     "models": [s.path and str(s.path) for s in sources],
                     "base": base_source.path and str(base_source.path) if base_source else None}
    return result


def _run(context: MergeContext, progress: bool) -> MergedState:
    """Streams the merged tensors (each input read once per tensor), then copies, per-task heads and notes."""
    sources, plan = context.sources, context.plan
    result = MergedState()
    result.heads, result.notes = {m: {} for m in range(len(sources))}, {}
    keys = plan.merged
    if progress:
        from tqdm.auto import tqdm
        keys = tqdm(keys, desc=f"Merging ({context.method.name})", unit="tensor")
    for key in keys:
        result[key] = _merge_tensor(key, context)
    for key, source_index in plan.copied.items():
        result[key] = sources[source_index].get(key).clone()
        if result[key].is_floating_point() and not bool(torch.isfinite(result[key]).all()):
            raise ValueError(f"tensor {key!r} of model {source_index} (copied: {plan.why[key]}) is not finite: "
                             f"{first_bad(result[key], ~torch.isfinite(result[key]))}")
        result.notes[key] = f"copied from model {source_index} ({plan.why[key]})"
    for key in plan.per_task:
        for m, source in enumerate(sources):
            result.heads[m][key] = source.get(key).clone()
    result.notes.update({key: f"left out: {why}" for key, why in plan.skipped.items()})
    result.notes.update(context.notes)
    return result


def _merge_tensor(key: str, context: MergeContext) -> Tensor:
    """The merged tensor `key` in the models' dtype: the formula on the whole tensor, or block by block of rows
    where the method allows it (each input read a block at a time), written into the result."""
    sources, dtype, formula = context.sources, context.sources[0].dtype(key), context.method.formula
    result = None
    try:
        for rows in context.blocks(key):
            context.rows = rows
            values = [s.get(key, rows).double() for s in sources]
            merged = formula(key, values, context)
            cast = merged.to(dtype)
            if not (bool(torch.isfinite(merged).all()) and bool(torch.isfinite(cast).all())):
                if rows is not None:   # the message names entries of the whole tensor: merge it whole (once)
                    context.rows, context.held = None, {}
                    values = [s.get(key).double() for s in sources]
                    merged = formula(key, values, context)
                    cast = merged.to(dtype)
                raise ValueError(_not_finite(key, merged, cast, values, context))
            if rows is None:
                result = cast
            else:
                result = cast.new_empty(sources[0].shape(key)) if result is None else result
                result[rows] = cast
    finally:
        context.rows, context.held = None, {}
    return result


def check_weights(weights, method: MergeMethod, M: int) -> list[float]:
    """The per-model weights as floats: one per model, finite, and for the methods that divide by their sum, not
    summing to zero."""
    if weights is None:
        return [1.0] * M
    if not method.weighted:
        raise ValueError(f"method={method.name!r} takes no per-model weights (it is defined without them); got "
                         f"weights={weights!r}")
    if isinstance(weights, (str, bytes, Mapping)) or not hasattr(weights, "__iter__"):
        raise ValueError(f"weights must be a list of numbers, one λ per model ({M}); got {weights!r}")
    values = []
    for m, weight in enumerate(weights):
        if isinstance(weight, (bool, str, bytes)) or not _is_number(weight):
            raise ValueError(f"weights[{m}] must be a number; got {weight!r}")
        if not math.isfinite(float(weight)):
            raise ValueError(f"weights[{m}] must be a finite number; got {float(weight)!r}")
        values.append(float(weight))
    if len(values) != M:
        raise ValueError(f"weights must hold one λ per model ({M}); got {len(values)}: {values}")
    if method.normalizes and abs(sum(values)) <= 1e-12 * sum(abs(w) for w in values):
        raise ValueError(f"weights={values} sum to {sum(values):g}; method={method.name!r} divides by their sum: "
                         f"give weights whose sum is not zero")
    return values


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, Tensor) or value.numel() == 1


def first_bad(tensor: Tensor, bad: Tensor) -> str:
    """'entry (i, j) is nan' for the first True entry of `bad` (a mask of tensor's shape)."""
    flat = int(bad.flatten().nonzero()[0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tensor.shape)) if tensor.dim() else ()
    return f"entry {index} is {tensor.flatten()[flat].item()!r}"


def _not_finite(key: str, merged: Tensor, cast: Tensor, values: list[Tensor], context: MergeContext) -> str:
    """Why the merged tensor `key` is not finite: an input that is not, an overflow of the formula, or of the dtype."""
    inputs = [(s.name, v) for s, v in zip(context.sources, values)]
    if context.base is not None:
        inputs.append(("the base", context.base_value(key)))
    for name, value in inputs:
        if not bool(torch.isfinite(value).all()):
            where = first_bad(value, ~torch.isfinite(value))
            return f"the merged tensor {key!r} is not finite: {name}'s is not ({where})"
    if not bool(torch.isfinite(merged).all()):
        return (f"the merged tensor {key!r} is not finite ({first_bad(merged, ~torch.isfinite(merged))}) with "
                f"method={context.method.name!r}, weights={context.weights}, parameters {dict(context.params)}")
    return (f"the merged tensor {key!r} overflows {cast.dtype} ({first_bad(merged, ~torch.isfinite(cast))}) with "
            f"method={context.method.name!r}, weights={context.weights}, parameters {dict(context.params)}: smaller "
            f"weights or parameters, or models in a wider dtype")


def _check_needs(method: MergeMethod, base, fishers, grams) -> None:
    """What the method needs is given, and nothing is given that it would ignore."""
    if "base" in method.needs and base is None:
        raise ValueError(f"method={method.name!r} works on task vectors: pass base= (the model they were "
                         f"fine-tuned from)")
    for name, given, needed_by in (("fishers", fishers, ("fishers", "components")), ("grams", grams, ("grams",))):
        if given is not None and not set(needed_by) & set(method.needs):
            users = [m.name for m in merge_methods().values() if set(needed_by) & set(m.needs)]
            listed = ", ".join(map(repr, users[:-1])) + (" and " if len(users) > 1 else "") + repr(users[-1])
            raise ValueError(f"{name}= is used by method={listed}, not {method.name!r}")


def _attach_inputs(context: MergeContext, fishers, grams) -> None:
    """Loads and checks the Fishers, component Fishers and Grams the method needs, before any tensor is merged."""
    needs, M, name = context.method.needs, len(context.sources), context.method.name
    for need, given in (("fishers", fishers), ("components", fishers), ("grams", grams)):
        if need in needs and (isinstance(given, (str, bytes, Mapping)) or not isinstance(given, Sequence)):
            argument = "grams" if need == "grams" else "fishers"
            raise ValueError(f"method={name!r} needs {NEED_DOCS[need]}; got {argument}={given!r}"[:400])
        if need in needs and len(given) != M:
            raise ValueError(f"method={name!r} needs {NEED_DOCS[need]} ({M}); got {len(given)}")
    keys = context.plan.merged
    if "fishers" in needs:
        context.fishers = [_load_fisher(f, context.sources[m], keys, f"fishers[{m}] (the Fisher of model {m})")
                           for m, f in enumerate(fishers)]
    if "components" in needs:
        if any(not isinstance(per_model, (list, tuple)) for per_model in fishers):
            raise ValueError(f"method={name!r} needs {NEED_DOCS['components']}")
        context.components = [[_load_fisher(f, context.sources[m], keys, f"fishers[{m}][{c}] (component {c} of model "
                                            f"{m})") for c, f in enumerate(per_model)]
                              for m, per_model in enumerate(fishers)]
    if "grams" in needs:
        loaded = [_load_grams(g, context.sources[m], keys, f"grams[{m}]") for m, g in enumerate(grams)]
        context.grams = [g for g, _ in loaded]
        for m, (_, widths) in enumerate(loaded[1:], 1):
            for module, width in widths.items():
                if loaded[0][1].get(module, width) != width:
                    raise ValueError(f"grams[{m}][{module!r}] is [{width}, {width}], grams[0]'s "
                                     f"[{loaded[0][1][module]}, {loaded[0][1][module]}]: one layer's Grams have one "
                                     f"width, its input's")
        # a layer's layout is read off its Gram's width, where every model's Grams cover it
        context.gram_widths = {module: width for module, width in loaded[0][1].items()
                               if all(module in widths for _, widths in loaded[1:])}


def _load_fisher(fisher, source: Source, keys: list[str], what: str) -> Mapping[str, Tensor]:
    """The Fisher (a mapping or a Fisher.save file), checked against the model: shapes, finite, >= 0."""
    if isinstance(fisher, (str, Path)):
        from ..gradients.fisher import Fisher
        try:
            fisher = Fisher.load(fisher)
        except (ValueError, OSError) as error:   # the file's own message, naming the argument first
            raise type(error)(f"{what}: {error}") from None
    if not isinstance(fisher, Mapping):
        raise ValueError(f"{what} must be a decomp.Fisher, a mapping key -> tensor or a saved file; got "
                         f"{type(fisher).__name__}")
    for key in keys:
        if key not in fisher:
            continue
        value = fisher[key]
        if not isinstance(value, Tensor):
            raise ValueError(f"{what} holds {key!r} as {type(value).__name__}, not a tensor")
        if tuple(value.shape) != source.shape(key):
            raise ValueError(f"{what} has {key!r} of shape {tuple(value.shape)}, the model "
                             f"{source.shape(key)}: a Fisher of another model?")
        bad = ~torch.isfinite(value) | (value < 0)
        if bool(bad.any()):
            raise ValueError(f"{what}: tensor {key!r} {first_bad(value, bad)}; a Fisher's entries are means of "
                             f"squares, finite and >= 0 (a corrupted file?)")
    if not any(key in fisher for key in keys):
        raise ValueError(f"{what} holds none of the model's tensors: a Fisher of another model?")
    return fisher


def _load_grams(grams, source: Source, keys: list[str], what: str) -> tuple[Mapping[str, Tensor], dict[str, int]]:
    """(the Grams, module -> its Gram's width) for the Grams given as module name -> [in, in] or a safetensors file
    of them, each of the model's layers' Grams checked against its layer: square, of the layer's input width,
    finite, symmetric to rounding, with a diagonal >= 0."""
    if isinstance(grams, (str, Path)):
        grams = _read_grams(Path(grams), what)
    if not isinstance(grams, Mapping):
        raise ValueError(f"{what} must be a mapping module name -> Gram [in, in] (decomp.collect_grams) or a "
                         f"safetensors file of one; got {type(grams).__name__}")
    layers = {key.rsplit(".", 1)[0]: key for key in keys if key.endswith(".weight") and len(source.shape(key)) == 2}
    used = [module for module in grams if module in layers]
    if not used:
        raise ValueError(f"{what} holds no Gram of the model's layers (it holds {list(grams)[:3]}, the model's "
                         f"layers are e.g. {list(layers)[:3]}): Grams of another model?")
    widths = {}
    for module in used:
        gram = grams[module]
        _check_gram(gram, source.shape(layers[module]), f"{what}[{module!r}]")
        widths[module] = int(gram.shape[0])
    return grams, widths


def _read_grams(path: Path, what: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not path.is_file():
        raise FileNotFoundError(f"{what}: Gram file {str(path)!r} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{what}: {str(path)!r} is not a readable safetensors file of Grams: {error}") from None


def _check_gram(gram, weight_shape: tuple, what: str) -> None:
    if not isinstance(gram, Tensor):
        raise ValueError(f"{what} is {type(gram).__name__}, not a tensor")
    widths = {weight_shape[1], weight_shape[0]}   # nn.Linear stores [out, in], GPT-2's Conv1D [in, out]
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] not in widths:
        raise ValueError(f"{what} has shape {tuple(gram.shape)}; the layer's weight is {weight_shape}, so its "
                         f"Gram must be [in, in] = [{weight_shape[1]}, {weight_shape[1]}]")
    gram = gram.double()
    bad = ~torch.isfinite(gram)
    if bool(bad.any()):
        raise ValueError(f"{what} is not finite: {first_bad(gram, bad)}")
    size = float(gram.abs().max())
    asymmetry = float((gram - gram.T).abs().max())
    if asymmetry > 1e-6 * size:
        raise ValueError(f"{what} is not symmetric (|G - Gᵀ| reaches {asymmetry:g}, |G| {size:g}): a Gram Xᵀ X is")
    diagonal = torch.diagonal(gram)
    if bool((diagonal < -1e-12 * size).any()):
        raise ValueError(f"{what} has a negative diagonal ({first_bad(diagonal, diagonal < -1e-12 * size)}): a Gram "
                         f"Xᵀ X has none")


# --- the plan ------------------------------------------------------------------------------------------------------

def make_plan(sources: list[Source], base: Optional[Source], heads, missing: str = "error") -> Plan:
    """Which keys are merged, copied or kept per task; raises on the first incompatibility. Keys only the base
    holds (stale buffers of an older save) are left out; keys some inputs lack are an error, or with
    missing="skip" left out of the result and listed in its notes."""
    if missing not in ("error", "skip"):
        raise ValueError(f"missing must be 'error' or 'skip'; got {missing!r}")
    plan = Plan()
    inputs = sources + ([base] if base is not None else [])
    every = set.intersection(*(set(s.keys) for s in inputs))
    for source in inputs[1:]:
        _compare_keys(sources[0], source, source is base, missing, plan)
    for key in sources[0].keys:
        if key in every:
            _place(key, sources, base, heads, plan)
    if base is not None:
        plan.skipped.update({k: "only in the base" for k in base.keys if all(k not in s.keys for s in sources)})
    return plan


def _compare_keys(first: Source, source: Source, is_base: bool, missing: str, plan: Plan) -> None:
    absent = [k for k in first.keys if k not in source.keys]
    extra = [k for k in source.keys if k not in first.keys and not is_base]
    for key in absent + extra:
        if missing == "skip":
            plan.skipped[key] = f"not in every input (e.g. {source.name})"
            continue
        raise ValueError(f"{source.name} and model 0 hold different tensors: {key!r} is "
                         f"{'missing from ' + source.name if key in absent else 'only in ' + source.name} "
                         f"({len(absent)} missing, {len(extra)} extra); merge models of one architecture, "
                         f"or pass missing='skip' to leave such tensors out")


def _place(key: str, sources: list[Source], base: Optional[Source], heads, plan: Plan) -> None:
    """Puts one key every input holds into the plan."""
    shapes = [s.shape(key) for s in sources]
    if len(set(shapes)) > 1 or (base is not None and base.shape(key) != shapes[0] and heads is None):
        if heads is None:
            raise ValueError(f"tensor {key!r} has different shapes across models ({shapes}); a head with "
                             f"different label counts: pass heads='per_task' or heads=<index of a model>")
        if heads == "per_task":
            plan.per_task.append(key)
        else:
            plan.copied[key] = _model_index(heads, len(sources))
            plan.why[key] = "shapes differ across models; heads= names this model"
    elif not sources[0].dtype(key).is_floating_point:
        values = [s.get(key) for s in sources]
        if any(not torch.equal(values[0], v) for v in values[1:]):
            raise ValueError(f"integer tensor {key!r} differs across models; it cannot be merged")
        plan.copied[key] = 0
        plan.why[key] = "integer buffer, equal in all models"
    elif base is not None and base.shape(key) != shapes[0]:
        plan.copied[key] = _model_index(heads, len(sources)) if heads != "per_task" else 0
        plan.why[key] = "shape differs from the base"
    else:
        plan.merged.append(key)


def _model_index(heads, M: int) -> int:
    if isinstance(heads, bool) or not isinstance(heads, int) or not 0 <= heads < M:
        raise ValueError(f"heads must be None, 'per_task' or a model index in [0, {M}); got {heads!r}")
    return heads


# --- choosing a coefficient ----------------------------------------------------------------------------------------

def search_coefficients(make: Callable[[float], Mapping], grid: Sequence[float], score: Callable[[Mapping], float]):
    """Tries each coefficient of `grid` (make(c) -> merged state, score(state) -> higher is better, on a held-out
    split, never the test split). Returns (best coefficient, its state, [(coefficient, score)])."""
    if not len(grid):
        raise ValueError("grid must hold at least one coefficient")
    scored, best = [], None
    for value in grid:
        state = make(value)
        result = float(score(state))
        scored.append((value, result))
        if best is None or result > best[1]:
            best = (value, result, state)
    return best[0], best[2], scored
