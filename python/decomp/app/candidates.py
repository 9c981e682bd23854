"""The merges the demo compares. Each candidate names its method by the id decomp.merge takes, its fixed
parameters, the one parameter chosen on validation (with the values tried), the statistics it needs, and the label
the report shows; results.json records the id and the chosen parameters beside that label."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ..gradients.outputs import FISHER_KINDS

SYMBOLS = {"scale": "λ", "alpha": "α"}
SCALINGS = {False: "raw", True: "normalised"}   # Fisher merges with and without dividing each Fisher by its mean


@dataclass(frozen=True)
class Candidate:
    label: str                                  # what the report shows
    method: str                                 # the id passed to decomp.merge(method=...)
    fixed: dict = field(default_factory=dict)   # parameters set once
    search: Optional[str] = None                # the parameter chosen on validation
    values: Union[tuple, str] = ()              # its values, or the name of a grid in the run's sizes
    inputs: dict = field(default_factory=dict)  # decomp.merge keyword -> the statistic it takes
    per_model: dict = field(default_factory=dict)   # parameters given once per model (the same for each)

    def options(self, sizes: dict, models: int) -> list:
        """Every parameter set tried, in order."""
        fixed = {**self.fixed, **{k: [list(v) for _ in range(models)] for k, v in self.per_model.items()}}
        if self.search is None:
            return [fixed]
        values = sizes[self.values] if isinstance(self.values, str) else self.values
        return [{**fixed, self.search: value} for value in values]

    def describe(self, parameters: dict, options: list) -> str:
        """The report's `chosen` cell: the value picked on validation, flagged when it is an end of a numeric grid
        (the best value may lie beyond it)."""
        if self.search is None:
            return ""
        value = parameters[self.search]
        if isinstance(value, bool):
            return SCALINGS[value]
        tried = [o[self.search] for o in options]
        edge = len(tried) > 2 and value in (tried[0], tried[-1])
        return f"{SYMBOLS.get(self.search, self.search)}={value}" + (" (grid edge)" if edge else "")


TASK_VECTORS = {"base": "base"}

CANDIDATES = [
    Candidate("average", "average"),
    Candidate("task arithmetic", "task_arithmetic", search="scale", values="sum grid", inputs=TASK_VECTORS),
    Candidate("TIES (top 20%, global trim)", "ties", {"density": 0.2, "trim": "global"}, "scale", "mean grid",
              TASK_VECTORS),
    Candidate("DARE-TIES (keep 30%)", "dare_ties", {"density": 0.3, "seed": 0}, "scale", "mean grid", TASK_VECTORS),
    Candidate("RegMean", "regmean", search="alpha", values=(0.5, 0.9, 1.0), inputs={"grams": "grams"}),
    Candidate("TSV-M", "tsv", search="scale", values="svd grid", inputs=TASK_VECTORS),
    Candidate("Iso-C", "iso_c", search="scale", values="iso grid", inputs=TASK_VECTORS),
    Candidate("Iso-CTS (common 80%)", "iso_cts", search="scale", values="iso grid", inputs=TASK_VECTORS),
    Candidate("data-subspace TSV (ours)", "data_tsv", search="scale", values="svd grid",
              inputs={**TASK_VECTORS, "grams": "grams"}),
    Candidate("data-subspace TSV, isotropic (ours)", "data_tsv", {"isotropic": True}, "scale", "iso grid",
              {**TASK_VECTORS, "grams": "grams"}),
    *[Candidate(f"Fisher ({kind})", "fisher", search="normalize", values=tuple(SCALINGS),
                inputs={"fishers": f"fisher {kind}"}) for kind in FISHER_KINDS],
    *[Candidate(f"components ({label} per model)", "components", search="normalize", values=tuple(SCALINGS),
                inputs={"fishers": "component fishers"}, per_model={"select": chosen})
      for label, chosen in (("top 2 of 8", (0, 1)), ("all 8", tuple(range(8))))],
]
COMPONENTS = 8   # components per model behind the component Fishers

# the merging benchmark runs every method that takes several models once (SLERP takes two: not here), the Fisher
# merges with the empirical Fisher only (the exact one costs a backward pass per class: 21 for chatterbot_topics)
BENCHMARK_CANDIDATES = [c for c in CANDIDATES if c.label not in ("Fisher (exact)", "Fisher (sampled)",
                                                                 "components (all 8 per model)")] + [
    Candidate("Breadcrumbs (keep 90%, drop top 1%)", "breadcrumbs", {"density": 0.9, "gamma": 0.01}, "scale",
              "sum grid", TASK_VECTORS),
    Candidate("DELLA (keep 70% ± 7%)", "della", {"density": 0.7, "epsilon": 0.07, "seed": 0}, "scale", "mean grid",
              TASK_VECTORS),
    Candidate("Model Stock", "model_stock", inputs=TASK_VECTORS),
    Candidate("data-subspace Iso-CTS (ours)", "data_iso_cts", search="scale", values="iso grid",
              inputs={**TASK_VECTORS, "grams": "grams"}),
]
