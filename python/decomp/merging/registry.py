"""The merge-method registry: every method declares its name, parameters, needs, paper and formula.

A method is a :class:`MergeMethod`: its per-tensor formula ``(key, values, context) -> Tensor`` (values: the
models' tensors for ``key``, in float64, one per model; context: the :class:`~decomp.merging.engine.MergeContext`),
the parameters it takes (:class:`Parameter`: name, default, type, domain, one line of doc), what it needs besides
the models (any of ``NEEDS``), and an optional one-time ``prepare(context)`` whose result the formula finds in
``context.prepared``. The formula's docstring states the formula and the paper it follows.

A method also declares how much of a tensor its formula must see at once (``slices``): "entries" when each entry of
the result depends only on the same entry of the inputs (and on what ``prepare`` computed), "rows" when each row
(index of the first dimension) depends only on that row, None (the default) when it needs the whole tensor; or a
function ``(key, context) -> one of those`` when that depends on the tensor or the parameters. The engine then
hands the formula blocks of whole rows of about a million entries (``context.rows`` says which), so that a merge
of a large embedding holds a few blocks in float64 instead of several whole copies; the result is the same, bit
for bit, as the formula on the whole tensor (tests/test_merge_slices.py checks every built-in method).

Built-in methods live in ``decomp/merging/methods/``, one file per family, and register themselves on import; a
user registers one without any file::

    @register_merge_method("max_abs", parameters=[Parameter("scale", 1.0, "coefficient of the step")],
                           needs=("base",))
    def max_abs(key, values, context):
        \"\"\"θ_0 + scale · (the τ_m of largest magnitude, entry by entry).\"\"\"
        ...

Parameters are validated from the declaration alone: unknown names (with a "did you mean"), wrong types and values
outside the domain are ValueErrors naming the method, the parameter, the domain and the value given.
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional

from torch import Tensor

if TYPE_CHECKING:
    from .engine import MergeContext

NEEDS = ("base", "fishers", "grams", "components")
SLICES = ("entries", "rows", None)
NEED_DOCS = {"base": "base= (the model the inputs were fine-tuned from)",
             "fishers": "fishers=[one Fisher per model] (decomp.Fisher, a mapping, or a saved file)",
             "grams": "grams=[one decomp.collect_grams(...) per model, or a safetensors file of one]",
             "components": "fishers=[one list of component Fishers per model] (decomp.component_fishers)"}
TYPE_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string", list: "a list",
              object: "any value"}


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED = _Required()   # the default of a parameter that has none


def suggestion(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or ''."""
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- domains: what values a parameter accepts, given the number of models ----------------------------------------

@dataclass(frozen=True)
class Interval:
    """low .. high, each end open or closed as in `closed` ("[]", "(]", "[)", "()")."""
    low: float = -math.inf
    high: float = math.inf
    closed: str = "[]"

    def accepts(self, value, models: int) -> bool:
        above = value >= self.low if self.closed[0] == "[" else value > self.low
        below = value <= self.high if self.closed[1] == "]" else value < self.high
        return bool(above and below)

    def describe(self, models: Optional[int] = None) -> str:
        if self.high == math.inf:
            return f"{'>=' if self.closed[0] == '[' else '>'} {self.low:g}"
        return f"in {self.closed[0]}{self.low:g}, {self.high:g}{self.closed[1]}"


@dataclass(frozen=True)
class Choice:
    options: tuple
    names_type = True   # its description says what the value is, without the type's name

    def accepts(self, value, models: int) -> bool:
        return value in self.options

    def describe(self, models: Optional[int] = None) -> str:
        return "one of " + ", ".join(repr(o) for o in self.options)


@dataclass(frozen=True)
class ModelIndex:
    """The index of one of the merged models."""
    names_type = True

    def accepts(self, value, models: int) -> bool:
        return 0 <= value < models

    def describe(self, models: Optional[int] = None) -> str:
        return f"a model index in [0, {models})" if models else "a model index"


@dataclass(frozen=True)
class PerModel:
    """A list holding one entry per merged model."""
    names_type = True

    def accepts(self, value, models: int) -> bool:
        return len(value) == models

    def describe(self, models: Optional[int] = None) -> str:
        return f"a list with one entry per model ({models})" if models else "a list with one entry per model"


# --- declarations ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Parameter:
    """One parameter of a merge method: its name, default (REQUIRED when it has none; None means optional and
    unset), type (float, int, bool, str, list or object), domain (Interval, Choice, ModelIndex, PerModel or None)
    and one line of doc."""
    name: str
    default: Any
    doc: str = ""
    type: type = float
    domain: Any = None

    def check(self, value, method: str, models: int):
        """The value, validated (an int given for a float parameter becomes a float)."""
        if value is None and self.default is None:
            return None
        expected = self.expected(models)
        if not _has_type(value, self.type):
            raise ValueError(f"method={method!r}: {self.name} must be {expected}; got {value!r} "
                             f"({type(value).__name__})")
        if self.domain is not None and not self.domain.accepts(value, models):
            raise ValueError(f"method={method!r}: {self.name} must be {expected}; got {value!r}")
        return float(value) if self.type is float else value

    def expected(self, models: Optional[int] = None) -> str:
        """What the parameter accepts, in words ("a number in (0, 1]", "a model index in [0, 3)")."""
        if self.domain is None:
            return TYPE_NAMES[self.type]
        if getattr(self.domain, "names_type", False):
            return self.domain.describe(models)
        return f"{TYPE_NAMES[self.type]} {self.domain.describe(models)}"

    def __str__(self) -> str:
        return f"{self.name}={self.default!r} ({self.expected()}){': ' + self.doc if self.doc else ''}"


def _has_type(value, kind: type) -> bool:
    if kind is object:
        return True
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):   # True is an int to Python, never a number or a count to a merge
        return False
    if kind is float:
        return isinstance(value, numbers.Real)
    if kind is int:
        return isinstance(value, numbers.Integral)
    if kind is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, kind)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method. formula(key, values, context) -> Tensor: values are the models' tensors for
    `key` in float64 ([M] list of same-shape tensors), the result has that shape. prepare(context) -> anything
    the formula needs computed once (it finds it in ``context.prepared``). doc: the formula's docstring."""
    name: str
    formula: Callable[[str, list[Tensor], "MergeContext"], Tensor] = field(repr=False)
    parameters: tuple[Parameter, ...] = ()
    needs: tuple[str, ...] = ()
    prepare: Optional[Callable[["MergeContext"], Any]] = field(default=None, repr=False)
    doc: str = field(default="", repr=False)
    weighted: bool = True   # whether it uses the per-model weights λ (decomp.merge refuses them if not)
    normalizes: bool = False   # whether it divides by Σ λ_m (decomp.merge refuses weights summing to zero)
    slices: Any = field(default=None, repr=False)   # one of SLICES, or (key, context) -> one of them

    def slicing(self, key: str, context: "MergeContext") -> Optional[str]:
        """How the formula may be given tensor `key`: "entries", "rows" or None (whole), see the module's doc."""
        slices = self.slices(key, context) if callable(self.slices) else self.slices
        if slices not in SLICES:
            raise ValueError(f"merge method {self.name!r} declares slices={slices!r} for {key!r}; it must be one "
                             f"of {SLICES}")
        return slices

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""

    def defaults(self) -> dict:
        return {p.name: p.default for p in self.parameters}

    def validate(self, params: Mapping, models: int) -> Mapping:
        """The parameters with their defaults, each checked against its declaration (read-only mapping)."""
        declared = {p.name: p for p in self.parameters}
        unknown = sorted(set(params) - set(declared))
        if unknown:
            raise ValueError(f"method={self.name!r} takes no parameter {unknown[0]!r}"
                             f"{suggestion(unknown[0], declared)}; it takes "
                             f"{', '.join(declared) or 'no parameters'} (got unknown {unknown})")
        values = {}
        for name, parameter in declared.items():
            value = params.get(name, parameter.default)
            if value is REQUIRED:
                raise ValueError(f"method={self.name!r} needs {name}= ({parameter.doc})")
            values[name] = parameter.check(value, self.name, models)
        return MappingProxyType(values)

    def __str__(self) -> str:
        needs = f" needs {', '.join(self.needs)}" if self.needs else ""
        unweighted = " (no per-model weights)" if not self.weighted else ""
        lines = [f"{self.name}{needs}{unweighted}: {self.summary}"]
        return "\n".join(lines + [f"    {p}" for p in self.parameters])


class MethodTable(dict):
    """name -> MergeMethod, in registration order; prints as one block per method."""

    def __str__(self) -> str:
        return "\n".join(str(method) for method in self.values())

    __repr__ = __str__   # the table, not nested dataclass reprs, in a REPL or notebook


_REGISTRY: dict[str, MergeMethod] = {}


def register_merge_method(name: str, formula: Optional[Callable] = None, *, parameters=(), needs=(),
                          prepare: Optional[Callable] = None, weighted: bool = True, normalizes: bool = False,
                          slices=None, replace: bool = False):
    """Registers a merge method under `name`, usable by decomp.merge(method=name) and in recipes.

    As a decorator (``@register_merge_method("name", parameters=..., needs=...)``) it returns the formula
    unchanged; as a call with the formula it returns the MergeMethod. parameters: Parameter objects, or a
    mapping name -> default (the type taken from the default). needs: any of "base", "fishers", "grams",
    "components". prepare(context): computed once before any tensor, found in ``context.prepared``. weighted=False:
    the method has no use for per-model weights λ (passing them is an error); normalizes=True: it divides by
    Σ λ_m (weights summing to zero are an error). slices: "entries", "rows" or None (the default: whole tensors),
    or a function (key, context) -> one of those, see the module's doc. replace=True lets a name be
    registered again (else an error)."""
    if formula is None:
        def decorator(function: Callable) -> Callable:
            register_merge_method(name, function, parameters=parameters, needs=needs, prepare=prepare,
                                  weighted=weighted, normalizes=normalizes, slices=slices, replace=replace)
            return function
        return decorator
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a merge method's name must be an identifier; got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"merge method {name!r} is already registered; pass replace=True to replace it")
    bad = [n for n in needs if n not in NEEDS]
    if bad:
        raise ValueError(f"merge method {name!r}: needs must be among {', '.join(NEEDS)}; got {bad[0]!r}")
    if not callable(slices) and slices not in SLICES:
        raise ValueError(f"merge method {name!r}: slices must be one of {SLICES} or a function of (key, context); "
                         f"got {slices!r}")
    declared = tuple(_parameter(p, parameters) for p in parameters)
    method = MergeMethod(name, formula, declared, tuple(needs), prepare, formula.__doc__ or "", weighted, normalizes,
                         slices)
    _REGISTRY[name] = method
    return method


def _parameter(entry, parameters) -> Parameter:
    if isinstance(entry, Parameter):
        return entry
    if not isinstance(parameters, Mapping):
        raise ValueError(f"parameters must be Parameter objects or a mapping name -> default; got {entry!r}")
    default = parameters[entry]
    kind = list if isinstance(default, tuple) else type(default)
    return Parameter(entry, default, type=kind if kind in TYPE_NAMES else object)


def unregister_merge_method(name: str) -> None:
    """Removes a registered method (for tests and plugins that replace one)."""
    _REGISTRY.pop(name, None)


def merge_methods() -> MethodTable:
    """Every registered merge method (name -> MergeMethod: parameters with defaults, needs, doc)."""
    return MethodTable(_REGISTRY)


def get_method(name) -> MergeMethod:
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of {', '.join(_REGISTRY)}; got {name!r}"
                         f"{suggestion(name, _REGISTRY) if isinstance(name, str) else ''}")
    return _REGISTRY[name]
