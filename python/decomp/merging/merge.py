"""Merging fine-tuned models of one base, tensor by tensor, exactly as each method was published.

θ* from fine-tuned θ_1..θ_M of one base θ_0, task vectors τ_m = θ_m - θ_0, per-model weights λ_m:

  average          Σ λ_m θ_m / Σ λ_m
  task_arithmetic  θ_0 + scale Σ λ_m τ_m                                     (Ilharco et al., 2023)
  ties             trim each τ_m to its top `density` by magnitude (trim="global": over the whole flattened
                   task vector, as in the paper; "per_tensor": within each tensor), elect the sign of
                   Σ λ_m τ̂_m, average the agreeing entries (weighted by λ), θ_0 + scale τ*   (Yadav et al., 2023)
  dare             drop each entry of τ_m with probability 1 - density, rescale by 1/density (seeded by the
                   counter-based hash of (seed, model, tensor, entry)), then task arithmetic   (Yu et al., 2024)
  dare_ties        the same drop and rescale, then TIES' sign election and disjoint mean
  fisher           Σ λ_m F_m θ_m / Σ λ_m F_m, F floored (absolute `floor`, or `floor_relative` x the mean of
                   F_m), optionally each F_m divided by its mean (`normalize`), optionally one model favoured
                   (`favor` = its index gets weight `favor_weight`, the rest share the remainder)
                                                                             (Matena & Raffel, 2022)
  regmean          per Linear weight W* = (Σ G̃_m)^-1 Σ G̃_m W_m (in the [in, out] layout), G̃ = Gram of the
                   layer's inputs with off-diagonals scaled by `alpha`; other tensors averaged   (Jin et al., 2023)
  components       Fisher merging whose Fishers are each model's component-restricted Fishers
                   F_{m,S} = Σ_{c in S_m} (component Fisher c), from decomp.component_fishers

Models are read one tensor at a time (safetensors files are opened lazily), so memory stays near one model
plus a few tensors; TIES' global trim takes two streaming passes for its thresholds first.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..kernels.hashing import STREAM_DARE, hash32

METHODS = ("average", "task_arithmetic", "ties", "dare", "dare_ties", "fisher", "regmean", "components")
NEEDS_BASE = ("task_arithmetic", "ties", "dare", "dare_ties")
HISTOGRAM_BINS = 65536


# --- sources: models read lazily, tensor by tensor ---------------------------------------------------------------

class Source:
    """Uniform, lazy access to the tensors of an nn.Module, a state dict, a safetensors file or a folder."""

    def __init__(self, model, name: str):
        self.name = name
        if isinstance(model, torch.nn.Module):
            self._tensors = model.state_dict()
            self.path = getattr(getattr(model, "config", None), "_name_or_path", None)
            self.model = model
        elif isinstance(model, Mapping):
            self._tensors, self.path, self.model = dict(model), None, None
        else:
            self.path, self.model = Path(model), None
            self._tensors = {}
            for file in _safetensors_files(self.path):
                reader = SafetensorsReader(file)
                self._tensors.update({key: reader for key in reader.entries})
        self.keys = list(self._tensors)

    def get(self, key: str) -> Tensor:
        value = self._tensors[key]
        return value if isinstance(value, Tensor) else value.get(key)

    def shape(self, key: str) -> tuple:
        value = self._tensors[key]
        return tuple(value.shape) if isinstance(value, Tensor) else tuple(value.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        value = self._tensors[key]
        return value.dtype if isinstance(value, Tensor) else value.dtype(key)

    def fingerprint(self) -> str:
        """A content hash (sha256 of the safetensors files, or of the tensors' bytes)."""
        digest = hashlib.sha256()
        if self.path is not None and Path(self.path).exists():
            for file in _safetensors_files(Path(self.path)):
                with open(file, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
            return digest.hexdigest()
        for key in sorted(self.keys):
            digest.update(key.encode())
            digest.update(self.get(key).detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


class SafetensorsReader:
    """Reads single tensors from a safetensors file with plain reads (no memory map), so that what a merge has
    read is freed when it is done with it and resident memory tracks the tensors in use."""

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        header.pop("__metadata__", None)
        self.start = 8 + size
        self.entries = header

    def dtype(self, key: str) -> torch.dtype:
        return self.DTYPES[self.entries[key]["dtype"]]

    def get(self, key: str) -> Tensor:
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        with open(self.path, "rb") as handle:
            handle.seek(self.start + begin)
            data = bytearray(handle.read(end - begin))
        if not data:
            return torch.empty(entry["shape"], dtype=self.dtype(key))
        return torch.frombuffer(data, dtype=self.dtype(key)).reshape(entry["shape"])


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"model {path} does not exist")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model folder {path} holds no .safetensors file")
    return files


# --- the merge -----------------------------------------------------------------------------------------------

class MergedState(dict):
    """The merged state dict; ``.heads[m]`` holds the tensors kept per task (shapes differing across models),
    ``.recipe`` what was done, and ``.notes`` per-tensor decisions (which tensors were copied or averaged)."""
    heads: dict
    recipe: dict
    notes: dict


def merge(models: Sequence, *, method: str, base=None, weights: Optional[Sequence[float]] = None,
          fishers: Optional[Sequence] = None, heads=None, missing: str = "error", progress: bool = False,
          **params) -> MergedState:
    """Merges `models` (nn.Modules, state dicts, safetensors files or save_pretrained folders) by `method`.

    weights: per-model λ (default 1 each; average and fisher normalise by their sum). heads: what to do with
    tensors whose shapes differ across models (classification heads with different label counts): None raises,
    "per_task" keeps each model's in ``result.heads[m]``, an int takes that model's. Integer buffers are copied
    (and must agree). missing: "error" (default) when an input lacks a tensor the others hold, or "skip" to
    leave such tensors out (listed in ``result.notes``); tensors only the base holds are always left out. Every input is checked before any tensor is merged; an error names the first mismatching
    tensor. Method parameters: see this module's docstring."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if not isinstance(models, (list, tuple)) or len(models) < 1:
        raise ValueError("models must be a non-empty list of models, state dicts or paths")
    sources = [Source(m, f"model {i}") for i, m in enumerate(models)]
    base_source = Source(base, "base") if base is not None else None
    if method in NEEDS_BASE and base_source is None:
        raise ValueError(f"method={method!r} works on task vectors: pass base= (the model they were fine-tuned from)")
    M = len(sources)
    weights = [1.0] * M if weights is None else [float(w) for w in weights]
    if len(weights) != M:
        raise ValueError(f"weights must hold one λ per model ({M}); got {len(weights)}")
    plan = _plan(sources, base_source, heads, missing)
    spec = _method(method, params, M)
    fisher_maps = _fishers(method, fishers, sources, plan["merged"], params)
    context = {"sources": sources, "base": base_source, "weights": weights, "params": spec, "fishers": fisher_maps,
               "plan": plan, "averaged": []}
    if method in ("ties",) and spec["trim"] == "global":
        context["thresholds"] = _global_thresholds(context, spec["density"])
    result = MergedState()
    result.heads, result.notes = {m: {} for m in range(M)}, {}
    iterator = plan["merged"]
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc=f"Merging ({method})", unit="tensor")
    for key in iterator:
        result[key] = _merge_tensor(method, key, context)
    for key, source_index in plan["copied"].items():
        result[key] = sources[source_index].get(key).clone()
        result.notes[key] = f"copied from model {source_index} ({plan['why'][key]})"
    for key in plan["per_task"]:
        for m, source in enumerate(sources):
            result.heads[m][key] = source.get(key).clone()
    result.notes.update({key: f"left out: {why}" for key, why in plan["skipped"].items()})
    result.notes.update({key: "averaged: not in every model's Fisher" for key in context["averaged"]})
    result.recipe = {"method": method, "weights": weights, "parameters": {k: v for k, v in spec.items()
                                                                         if k != "select"},
                     "heads": heads, "models": [s.path and str(s.path) for s in sources],
                     "base": base_source.path and str(base_source.path) if base_source else None}
    return result


def _plan(sources, base, heads, missing: str = "error") -> dict:
    """Which keys are merged, copied or kept per task; raises on the first incompatibility. Keys only the base
    holds (stale buffers of an older save) are left out; keys some inputs lack are an error, or with
    missing="skip" left out of the result and listed in its notes."""
    if missing not in ("error", "skip"):
        raise ValueError(f"missing must be 'error' or 'skip'; got {missing!r}")
    merged, copied, per_task, why, skipped = [], {}, [], {}, {}
    inputs = sources + ([base] if base is not None else [])
    every = set.intersection(*(set(s.keys) for s in inputs))
    for source in inputs[1:]:
        absent = [k for k in sources[0].keys if k not in source.keys]
        extra = [k for k in source.keys if k not in sources[0].keys and (source is not base)]
        for key in absent + extra:
            if missing == "skip":
                skipped[key] = f"not in every input (e.g. {source.name})"
                continue
            raise ValueError(f"{source.name} and model 0 hold different tensors: {key!r} is "
                             f"{'missing from ' + source.name if key in absent else 'only in ' + source.name} "
                             f"({len(absent)} missing, {len(extra)} extra); merge models of one architecture, "
                             f"or pass missing='skip' to leave such tensors out")
    for key in sources[0].keys:
        if key not in every:
            continue
        shapes = [s.shape(key) for s in sources]
        dtypes = [s.dtype(key) for s in sources]
        if len(set(shapes)) > 1 or (base is not None and base.shape(key) != shapes[0] and
                                    heads is None):
            if heads is None:
                raise ValueError(f"tensor {key!r} has different shapes across models ({shapes}); a head with "
                                 f"different label counts: pass heads='per_task' or heads=<index of a model>")
            if heads == "per_task":
                per_task.append(key)
            else:
                copied[key] = _model_index(heads, len(sources))
                why[key] = "shapes differ across models; heads= names this model"
            continue
        if not dtypes[0].is_floating_point:
            values = [s.get(key) for s in sources]
            if any(not torch.equal(values[0], v) for v in values[1:]):
                raise ValueError(f"integer tensor {key!r} differs across models; it cannot be merged")
            copied[key] = 0
            why[key] = "integer buffer, equal in all models"
            continue
        if base is not None and base.shape(key) != shapes[0]:
            copied[key] = _model_index(heads, len(sources)) if heads != "per_task" else 0
            why[key] = "shape differs from the base"
            continue
        merged.append(key)
    if base is not None:
        skipped.update({k: "only in the base" for k in base.keys if all(k not in s.keys for s in sources)})
    return {"merged": merged, "copied": copied, "per_task": per_task, "why": why, "skipped": skipped}


def _model_index(heads, M: int) -> int:
    if isinstance(heads, bool) or not isinstance(heads, int) or not 0 <= heads < M:
        raise ValueError(f"heads must be None, 'per_task' or a model index in [0, {M}); got {heads!r}")
    return heads


def _method(method: str, params: dict, M: int) -> dict:
    """The method's parameters with defaults, checked; unknown parameters are errors."""
    defaults = {
        "average": {}, "task_arithmetic": {"scale": 1.0},
        "ties": {"density": 0.2, "trim": "global", "scale": 1.0},
        "dare": {"density": 0.1, "seed": 0, "scale": 1.0},
        "dare_ties": {"density": 0.1, "seed": 0, "scale": 1.0},
        "fisher": {"floor": 0.0, "floor_relative": None, "normalize": False, "favor": None, "favor_weight": 0.5},
        "regmean": {"grams": None, "alpha": 0.9},
        "components": {"select": None, "floor": 0.0, "floor_relative": None, "normalize": False, "favor": None,
                       "favor_weight": 0.5},
    }[method]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"method={method!r} takes {sorted(defaults) or 'no parameters'}; got unknown {unknown}")
    spec = {**defaults, **params}
    if "density" in spec and not 0 < float(spec["density"]) <= 1:
        raise ValueError(f"density must be in (0, 1]; got {spec['density']!r}")
    if spec.get("trim", "global") not in ("global", "per_tensor"):
        raise ValueError(f"trim must be 'global' or 'per_tensor'; got {spec['trim']!r}")
    if method == "regmean":
        if spec["grams"] is None or len(spec["grams"]) != M:
            raise ValueError(f"method='regmean' needs grams=[one decomp.collect_grams(...) per model] ({M})")
        if not 0 <= float(spec["alpha"]) <= 1:
            raise ValueError(f"alpha must be in [0, 1]; got {spec['alpha']!r}")
    if spec.get("favor") is not None:
        _model_index(spec["favor"], M)
        if not 0 <= float(spec["favor_weight"]) <= 1:
            raise ValueError(f"favor_weight must be in [0, 1]; got {spec['favor_weight']!r}")
    return spec


def _fishers(method, fishers, sources, keys, params) -> Optional[list]:
    if method not in ("fisher", "components"):
        if fishers is not None:
            raise ValueError(f"fishers= is used by method='fisher' and 'components', not {method!r}")
        return None
    M = len(sources)
    if fishers is None or len(fishers) != M:
        raise ValueError(f"method={method!r} needs fishers=[one per model] ({M}); got "
                         f"{'none' if fishers is None else len(fishers)}")
    if method == "components":
        select = params.get("select")
        if select is None or len(select) != M:
            raise ValueError("method='components' needs select=[component indices per model] and fishers=[the "
                             "component Fishers of each model (decomp.component_fishers)]")
        combined = []
        for m, (per_component, chosen) in enumerate(zip(fishers, select)):
            if not chosen:
                raise ValueError(f"select[{m}] is empty: choose at least one component of model {m}")
            bad = [c for c in chosen if not 0 <= c < len(per_component)]
            if bad:
                raise ValueError(f"select[{m}] names component {bad[0]}, but model {m} has {len(per_component)}")
            combined.append({k: sum(per_component[c][k] for c in chosen) for k in per_component[chosen[0]]})
        fishers = combined
    loaded = []
    for m, fisher in enumerate(fishers):
        if isinstance(fisher, (str, Path)):
            from ..gradients.fisher import Fisher
            fisher = Fisher.load(fisher)
        for key in keys:
            if key in fisher and tuple(fisher[key].shape) != sources[m].shape(key):
                raise ValueError(f"the Fisher of model {m} has {key!r} of shape {tuple(fisher[key].shape)}, the "
                                 f"model {sources[m].shape(key)}: a Fisher of another model?")
        if not any(key in fisher for key in keys):
            raise ValueError(f"the Fisher of model {m} holds none of the model's tensors: a Fisher of another model?")
        loaded.append(fisher)
    return loaded


# log-magnitude bins of the global-trim histogram, fixed in advance so that no pass is spent on the range: values
# outside it fall into the end bins, which the second pass buckets the same way, so the threshold stays exact
LOG_RANGE = (math.log(1e-45), math.log(3.5e38))


def _global_thresholds(context, density: float) -> list[float]:
    """For each model, the magnitude at or above which `density` of its whole task vector lies, in two streaming
    passes over the tensors (each read once per pass): a histogram of log-magnitudes finds the bin holding the
    order statistic, then that bin's values give it exactly."""
    sources, base, keys = context["sources"], context["base"], context["plan"]["merged"]
    M = len(sources)
    edges = torch.linspace(*LOG_RANGE, HISTOGRAM_BINS + 1, dtype=torch.float64)[1:-1]

    def magnitudes(key):
        """(model, bucket of each non-zero |τ| entry, those entries) for every model, the base read once."""
        origin = base.get(key).double()
        for m, source in enumerate(sources):
            magnitude = (source.get(key).double() - origin).abs().flatten()
            magnitude = magnitude[magnitude > 0]
            yield m, torch.bucketize(torch.log(magnitude), edges), magnitude

    counts = torch.zeros(M, HISTOGRAM_BINS, dtype=torch.int64)
    for key in keys:
        for m, buckets, _ in magnitudes(key):
            counts[m] += torch.bincount(buckets, minlength=HISTOGRAM_BINS)
    total = sum(math.prod(sources[0].shape(k)) for k in keys)
    keep = max(1, int(round(density * total)))
    above = torch.flip(torch.cumsum(torch.flip(counts, [1]), 1), [1])   # [M, bins]: values in bins >= b
    chosen = {}   # model -> (bin, how many of its values are needed)
    for m in range(M):
        if int(above[m, 0]) > keep:   # else fewer non-zero entries than kept: keep them all (threshold 0)
            b = int((above[m] >= keep).nonzero().max())
            chosen[m] = (b, keep - (int(above[m, b + 1]) if b + 1 < HISTOGRAM_BINS else 0))
    inside = {m: [] for m in chosen}
    if chosen:
        for key in keys:
            for m, buckets, magnitude in magnitudes(key):
                if m in chosen:
                    inside[m].append(magnitude[buckets == chosen[m][0]])
    return [float(torch.topk(torch.cat(inside[m]), chosen[m][1]).values.min()) if m in chosen else 0.0
            for m in range(M)]


def _trim(tau: Tensor, density: float, threshold: Optional[float]) -> Tensor:
    """Keeps the top `density` of |tau| (per tensor when threshold is None, else at or above the global
    threshold); entries tied with the last kept magnitude are kept too."""
    if threshold is None:
        k = max(1, int(round(density * tau.numel())))
        if k >= tau.numel():
            return tau
        cut = torch.topk(tau.abs().flatten(), k).values.min()
        return torch.where(tau.abs() >= cut, tau, torch.zeros_like(tau))
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau)) if threshold > 0 else tau


def dare_mask(seed: int, model_index: int, key: str, shape, density: float) -> Tensor:
    """Which entries DARE keeps: uniform(hash(seed, model, tensor, entry)) < density, a pure function of those."""
    numel = math.prod(shape)
    row = torch.tensor((zlib.crc32(key.encode()) ^ (model_index * 0x9E3779B1)) & 0xFFFFFFFF)
    bits = hash32(seed, STREAM_DARE, row, torch.arange(numel, dtype=torch.int64))
    uniform = ((bits >> 8).to(torch.float64) + 0.5) / 16777216.0
    return (uniform < density).reshape(shape)


def _disjoint_mean(taus: list[Tensor], weights: list[float]) -> Tensor:
    """TIES: elect each entry's sign by the weighted sum, then the weighted mean of the agreeing entries."""
    stacked = torch.stack([w * t for w, t in zip(weights, taus)])
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    weight_sum = (agree * torch.tensor(weights, dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))).sum(0)
    return torch.where(weight_sum > 0, (stacked * agree).sum(0) / weight_sum.clamp(min=1e-300),
                       torch.zeros_like(sign))


def _merge_tensor(method: str, key: str, context) -> Tensor:
    weights, spec = context["weights"], context["params"]
    values = [s.get(key).double() for s in context["sources"]]   # every input read once per tensor
    dtype = context["sources"][0].dtype(key)
    if method == "average" or (method == "regmean" and not _regmean_applies(key, context)):
        return (sum(w * v for w, v in zip(weights, values)) / sum(weights)).to(dtype)
    if method == "regmean":
        return _regmean(key, values, context).to(dtype)
    if method in ("fisher", "components"):
        return _fisher_merge(key, values, context).to(dtype)
    base = context["base"].get(key).double()
    taus = [v - base for v in values]
    if method == "task_arithmetic":
        return (base + spec["scale"] * sum(w * t for w, t in zip(weights, taus))).to(dtype)
    if method in ("dare", "dare_ties"):
        taus = [t * dare_mask(spec["seed"], m, key, t.shape, spec["density"]) / spec["density"]
                for m, t in enumerate(taus)]
        if method == "dare":
            return (base + spec["scale"] * sum(w * t for w, t in zip(weights, taus))).to(dtype)
    else:  # ties
        thresholds = context.get("thresholds")
        taus = [_trim(t, spec["density"], thresholds[m] if thresholds else None) for m, t in enumerate(taus)]
    return (base + spec["scale"] * _disjoint_mean(taus, weights)).to(dtype)


def _fisher_merge(key: str, values: list[Tensor], context) -> Tensor:
    sources, weights, spec, fishers = context["sources"], context["weights"], context["params"], context["fishers"]
    M = len(sources)
    if spec["favor"] is not None:
        rest = (1 - spec["favor_weight"]) / max(M - 1, 1)
        weights = [spec["favor_weight"] if m == spec["favor"] else rest for m in range(M)]
    average = sum(w * v for w, v in zip(weights, values)) / sum(weights)
    if any(key not in f for f in fishers):
        context["averaged"].append(key)
        return average
    scales = context.setdefault("fisher_means", [None] * M)
    numerator, denominator = 0.0, 0.0
    for m, (w, v) in enumerate(zip(weights, values)):
        F = fishers[m][key].double()
        if spec["normalize"] or spec["floor_relative"] is not None:
            if scales[m] is None:
                total = sum(float(t.double().sum()) for k, t in fishers[m].items() if k in context["plan"]["merged"])
                count = sum(t.numel() for k, t in fishers[m].items() if k in context["plan"]["merged"])
                scales[m] = total / max(count, 1)
            if spec["normalize"]:
                F = F / max(scales[m], 1e-300)
        floor = spec["floor"] if spec["floor_relative"] is None else spec["floor_relative"] * \
            (1.0 if spec["normalize"] else scales[m])
        F = F.clamp(min=floor)
        numerator = numerator + w * F * v
        denominator = denominator + w * F
    # where every model's Fisher is zero (and no floor), the average is the only sensible answer
    return torch.where(denominator > 0, numerator / torch.where(denominator > 0, denominator,
                                                                torch.ones_like(denominator)), average)


def _regmean_applies(key: str, context) -> bool:
    module = key.rsplit(".", 1)[0]
    return key.endswith(".weight") and all(module in grams for grams in context["params"]["grams"])


def _regmean(key: str, values: list[Tensor], context) -> Tensor:
    """W* = (Σ G̃_m)^-1 Σ G̃_m W_m, W in [in, out]; G̃ = α G + (1 - α) diag(G)."""
    alpha = float(context["params"]["alpha"])
    module = key.rsplit(".", 1)[0]
    left, right = 0.0, 0.0
    for m, weight in enumerate(values):
        gram = context["params"]["grams"][m][module].double()
        gram = alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))
        transposed = gram.shape[0] == weight.shape[1]  # nn.Linear stores [out, in]; Conv1D [in, out]
        right = right + gram @ (weight.T if transposed else weight)
        left = left + gram
    solution = torch.linalg.lstsq(left, right).solution if bool(torch.linalg.matrix_rank(left) < left.shape[0]) \
        else torch.linalg.solve(left, right)
    return solution.T if transposed else solution


# --- recombination of components ---------------------------------------------------------------------------------

def submodel(base, finetuned, directions: Sequence[dict], select: Sequence[int], *, mode: str = "project",
             component_fishers: Optional[Sequence[dict]] = None) -> MergedState:
    """θ_0 + P_S τ: the task vector of `finetuned` restricted to the chosen components S.

    mode="project": P_S projects τ (all floating tensors, flattened together) onto the span of the chosen
    components' parameter directions v_c (Components.parameter_directions), by least squares over their Gram
    matrix, streaming tensor by tensor. mode="fisher": each entry of τ scaled by the share of the chosen
    components in that entry's Fisher, F_S / F_all (component_fishers: all components' Fishers)."""
    if mode not in ("project", "fisher"):
        raise ValueError(f"mode must be 'project' or 'fisher'; got {mode!r}")
    chosen = list(select)
    if not chosen or any(not 0 <= c < len(directions if mode == "project" else component_fishers or [])
                         for c in chosen):
        raise ValueError(f"select must name components in [0, {len(directions)}); got {chosen}")
    base_source, tuned = Source(base, "base"), Source(finetuned, "finetuned")
    plan = _plan([tuned], base_source, None)
    result = MergedState()
    result.heads, result.notes = {0: {}}, {}
    if mode == "project":
        keys = [k for k in plan["merged"] if k in directions[chosen[0]]]
        gram = torch.zeros(len(chosen), len(chosen), dtype=torch.float64)
        inner = torch.zeros(len(chosen), dtype=torch.float64)
        for key in keys:
            tau = tuned.get(key).double() - base_source.get(key).double()
            vectors = torch.stack([directions[c][key].double().flatten() for c in chosen])
            gram += vectors @ vectors.T
            inner += vectors @ tau.flatten()
        coefficients = torch.linalg.lstsq(gram, inner[:, None]).solution[:, 0]
        for key in plan["merged"]:
            base_value = base_source.get(key)
            if key in keys:
                step = sum(float(a) * directions[c][key].double() for a, c in zip(coefficients, chosen))
                result[key] = (base_value.double() + step.reshape(base_value.shape)).to(base_value.dtype)
            else:
                result[key] = base_value.clone()
                result.notes[key] = "no component direction: kept from the base"
    else:
        if component_fishers is None:
            raise ValueError("mode='fisher' needs component_fishers=[the Fisher of every component]")
        for key in plan["merged"]:
            base_value = base_source.get(key)
            tau = tuned.get(key).double() - base_value.double()
            if key not in component_fishers[0]:
                result[key] = base_value.clone()
                result.notes[key] = "no component Fisher: kept from the base"
                continue
            everything = sum(f[key].double() for f in component_fishers)
            share = sum(component_fishers[c][key].double() for c in chosen) / everything.clamp(min=1e-300)
            result[key] = (base_value.double() + torch.where(everything > 0, share, 0.0) * tau).to(base_value.dtype)
    for key, index in plan["copied"].items():
        result[key] = tuned.get(key).clone()
    result.recipe = {"method": "submodel", "mode": mode, "select": chosen}
    return result


# --- output -------------------------------------------------------------------------------------------------------

def save_merged(state: Mapping, out_dir, *, like, recipe: Optional[dict] = None, inputs: Sequence = ()) -> Path:
    """Writes a save_pretrained folder (safetensors weights, config, tokenizer when `like` has one) and a model card
    naming the recipe and the inputs' content hashes. Written into a temporary sibling and renamed, so a failure
    leaves no partial folder."""
    from transformers import AutoTokenizer
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    template = like if isinstance(like, torch.nn.Module) else None
    if template is None:
        from transformers import AutoConfig, AutoModel
        config = AutoConfig.from_pretrained(like)
        architecture = (config.architectures or [None])[0]
        import transformers
        cls = getattr(transformers, architecture) if architecture and hasattr(transformers, architecture) else AutoModel
        template = cls.from_pretrained(like)
    missing = [k for k in template.state_dict() if k not in state]
    if missing:
        raise ValueError(f"the merged state lacks {len(missing)} tensors of the model, e.g. {missing[0]!r} (kept per "
                         f"task?): save one task's model with its head added")
    try:
        model = type(template)(template.config)
        model.load_state_dict(dict(state), strict=True)
        model.save_pretrained(partial)
        source = getattr(template.config, "_name_or_path", None) if not isinstance(like, (str, Path)) else like
        if source:
            try:
                AutoTokenizer.from_pretrained(source).save_pretrained(partial)
            except (OSError, ValueError):
                pass   # a model without a tokenizer folder: the weights and config are still complete
        recipe = dict(recipe or getattr(state, "recipe", {}) or {})
        hashes = [{"input": str(getattr(s, "path", None) or f"model {i}"), "sha256": s.fingerprint()}
                  for i, s in enumerate(Source(x, f"input {i}") for i, x in enumerate(inputs))]
        card = ["---", "library_name: transformers", "tags: [decomp, merge]", "---", "",
                "# Merged with decomp", "", "Recipe:", "", "```json", json.dumps(recipe, indent=2, default=str),
                "```", ""]
        if hashes:
            card += ["Inputs:", ""] + [f"- {h['input']}: sha256 {h['sha256']}" for h in hashes] + [""]
        (partial / "README.md").write_text("\n".join(card))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        partial.rename(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir


def merge_recipe(recipe_path, out_dir=None) -> MergedState:
    """Runs a YAML recipe: method, models (paths, with optional weight), base, fishers, heads, parameters, like.
    With out_dir, saves the result there (save_pretrained form, model card with the recipe)."""
    import yaml
    recipe_path = Path(recipe_path)
    spec = yaml.safe_load(recipe_path.read_text())
    if not isinstance(spec, dict) or "method" not in spec or "models" not in spec:
        raise ValueError(f"{recipe_path} must be a YAML mapping with at least 'method' and 'models'")
    root = recipe_path.parent

    def resolve(p):
        return str((root / p).resolve()) if not Path(p).is_absolute() and (root / p).exists() else p

    entries = [m if isinstance(m, dict) else {"path": m} for m in spec["models"]]
    models = [resolve(e["path"]) for e in entries]
    weights = [float(e.get("weight", 1.0)) for e in entries] if any("weight" in e for e in entries) else None
    fishers = [resolve(f) for f in spec["fishers"]] if spec.get("fishers") else None
    base = resolve(spec["base"]) if spec.get("base") else None
    state = merge(models, method=spec["method"], base=base, weights=weights, fishers=fishers,
                  heads=spec.get("heads"), **(spec.get("parameters") or {}))
    state.recipe["recipe_file"] = str(recipe_path)
    if out_dir is not None:
        save_merged(state, out_dir, like=resolve(spec.get("like", models[0])), recipe=spec,
                    inputs=models + ([base] if base else []))
    return state


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
