"""Components of gradient features: loadings, directions and variances, their alignment with labels, their
directions in parameter space (an exact second pass) and the Fishers they explain."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..gradients.writing import check_target, write_file
from ..kernels import validation

FORMAT = "decomp.components/1"


@dataclass
class Alignment:
    """How components line up with labels: NMI and AMI of the examples' assignments, the purity of each
    component's top-k examples on each side, and the component x label table of top-k counts."""
    nmi: float
    ami: float
    purity: list          # [{"component", "sign", "purity", "label"}] for each component and sign
    table: np.ndarray     # [2r, L] counts of each label among each (component, sign)'s top-k examples
    label_names: list
    k: int

    def best_purity(self) -> dict:
        """label -> highest top-k purity of a (component, sign) whose majority it is."""
        best = {}
        for row in self.purity:
            best[row["label"]] = max(best.get(row["label"], 0.0), row["purity"])
        return best

    def to_markdown(self) -> str:
        lines = [f"NMI {self.nmi:.3f}, AMI {self.ami:.3f}; top-{self.k} purity per component and sign:", "",
                 "| component | sign | majority | purity |", "|---|---|---|---|"]
        lines += [f"| {r['component']} | {'+' if r['sign'] > 0 else '-'} | {r['label']} | {r['purity']:.2f} |"
                  for r in self.purity]
        return "\n".join(lines) + "\n"


@dataclass
class Components:
    """Components of [N, K] features. kind: "pca", "ica" or "kmeans".

    loadings [N, r]: PCA scores (projections of the centred examples), ICA sources (unit variance), or k-means
    memberships (one-hot); directions [r, K]: each component's direction in feature space; mixing [K, r] /
    unmixing [r, K]: features ~ mean + loadings @ mixing.T and loadings ~ (features - mean) @ unmixing.T;
    explained_variance [r] and its ratio to the total variance; indices [N]: each row's example index."""
    kind: str
    loadings: Tensor
    directions: Tensor
    mixing: Tensor
    unmixing: Tensor
    mean: Tensor
    explained_variance: Tensor
    total_variance: float
    indices: Optional[Tensor] = None
    meta: dict = field(default_factory=dict)

    @property
    def n_components(self) -> int:
        return self.loadings.shape[1]

    @property
    def explained_variance_ratio(self) -> Tensor:
        return self.explained_variance / self.total_variance

    def effective_rank(self) -> float:
        """exp(entropy) of the normalised explained variances (Roy & Vetterli, 2007)."""
        p = self.explained_variance.double().clamp(min=0)
        p = p[p > 0] / p.sum()
        return float(torch.exp(-(p * p.log()).sum()))

    def components_for(self, fraction: float) -> int:
        """The number of leading components that explain `fraction` of the total variance."""
        cumulative = torch.cumsum(self.explained_variance_ratio.double(), 0)
        reached = (cumulative >= fraction - 1e-12).nonzero()
        return int(reached[0, 0]) + 1 if len(reached) else -1

    def assignments(self) -> Tensor:
        """Each example's (component, sign) class: 2c for a positive loading on component c, 2c + 1 for a
        negative one, c being the component with the largest |loading| (k-means: the cluster)."""
        if self.kind == "kmeans":
            return self.loadings.argmax(1)
        c = self.loadings.abs().argmax(1)
        negative = self.loadings.gather(1, c[:, None]).squeeze(1) < 0
        return 2 * c + negative.long()

    def top_examples(self, component: int, k: int = 30, sign: int = 1) -> Tensor:
        """Row positions of the k examples with the largest loading on `component` (times `sign`)."""
        if not 0 <= component < self.n_components:
            raise ValueError(f"component must be in [0, {self.n_components}); got {component}")
        return torch.argsort(self.loadings[:, component] * sign, descending=True)[:k]

    def align(self, labels, k: int = 30, label_names: Optional[Sequence[str]] = None) -> Alignment:
        """NMI/AMI (scikit-learn) of the assignments against `labels` [N], and top-k purity per component and
        sign. Labels may be ints or strings."""
        from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score
        labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
        if labels.shape != (self.loadings.shape[0],):
            raise ValueError(f"labels must be [N] = [{self.loadings.shape[0]}]; got {list(labels.shape)}")
        names, codes = np.unique(labels, return_inverse=True)
        names = list(label_names) if label_names is not None else [str(n) for n in names]
        assigned = self.assignments().cpu().numpy()
        signs = (1,) if self.kind == "kmeans" else (1, -1)
        purity, table = [], []
        for c in range(self.n_components):
            for sign in signs:
                if self.kind == "kmeans":
                    members = np.nonzero(assigned == c)[0]
                    centre_distance = -self.meta.get("distances", self.loadings)[:, c].cpu().numpy()
                    top = members[np.argsort(-centre_distance[members])][:k] if len(members) else members
                else:
                    top = self.top_examples(c, k, sign).cpu().numpy()
                counts = np.bincount(codes[top], minlength=len(names))
                table.append(counts)
                majority = int(counts.argmax())
                purity.append({"component": c, "sign": sign, "label": names[majority],
                               "purity": float(counts[majority] / max(len(top), 1))})
        return Alignment(float(normalized_mutual_info_score(codes, assigned)),
                         float(adjusted_mutual_info_score(codes, assigned)), purity, np.array(table), names, k)

    def parameter_directions(self, model, data, *, unit: bool = False, output: Optional[str] = None,
                             seed: Optional[int] = None, target: Optional[int] = None, batch_size: int = 32,
                             progress: bool = True, distributed: Optional[bool] = None,
                             **batch_options) -> list[dict]:
        """v_c = sum_n u_{c,n} g_n for every component c at once, exactly, by a second pass over `data`: one GEMM
        per Linear layer on (G scaled by u) and A, the other parameters by their rules. Returns r dicts keyed
        like named_parameters(). `data` must hold the decomposed examples (rows matched by example index);
        output/seed/target default to those the sketch was taken with. unit=True uses unit-norm loadings (for
        PCA the left singular vectors: then v_c = sigma_c v_hat_c). distributed: as in compute_fisher (each rank
        its share of the batches; the sums all-reduced in float64, one tensor at a time)."""
        from ..gradients.directions import weighted_gradient_sums
        config = self.meta.get("sketch", {})
        weights = self.loadings.float()
        if unit:
            weights = weights / weights.norm(dim=0, keepdim=True).clamp(min=1e-30)
        if isinstance(self.meta.get("example_scale"), Tensor):  # rows were signed / scaled by prepare()
            weights = weights * self.meta["example_scale"][:, None]
        return weighted_gradient_sums(
            model, data, weights, indices=self.indices, output=output or config.get("output", "logprob"),
            seed=config.get("seed", 0) if seed is None else seed,
            target=config.get("target") if target is None else target, batch_size=batch_size, progress=progress,
            distributed=distributed, **batch_options)

    def save(self, path, *, overwrite: bool = False) -> Path:
        """safetensors file with the tensors and the kind/meta as metadata, written into a hidden sibling and
        renamed (a failed or killed save leaves `path` as it was; gradients/writing.py). An existing `path` is
        replaced only with overwrite=True and only if it holds decomp components; anything else there (a link
        included) is never touched."""
        from safetensors.torch import save_file
        path = check_target(path, overwrite=overwrite, ours=_holds_components, what="a decomp components file",
                            writer="Components.save")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in
                   ("loadings", "directions", "mixing", "unmixing", "mean", "explained_variance")}
        if self.indices is not None:
            tensors["indices"] = self.indices.cpu().contiguous()
        tensors.update({f"meta.{k}": v.detach().cpu().contiguous() for k, v in self.meta.items()
                        if isinstance(v, Tensor)})
        meta = {"format": FORMAT, "kind": self.kind, "total_variance": self.total_variance,
                "meta": {k: v for k, v in self.meta.items() if not isinstance(v, Tensor)}}
        return write_file(path, lambda partial: save_file(tensors, partial, metadata={"decomp": json.dumps(meta)}),
                          what="the components", kill="components", wrap=Exception)

    @classmethod
    def load(cls, path) -> "Components":
        """Reads a file written by Components.save; a missing, truncated or foreign file is an error naming it."""
        from safetensors import SafetensorError, safe_open
        if not Path(path).is_file():
            raise FileNotFoundError(f"components file {str(path)!r} does not exist (or is not a file)")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {}).get("decomp", "{}"))
                if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                    raise ValueError(f"{path} holds no decomp components (no decomp.components/1 metadata)")
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not a readable components file (a safetensors file written by "
                             f"Components.save): {error}") from None
        missing = [name for name in ("loadings", "directions", "mixing", "unmixing", "mean", "explained_variance")
                   if name not in tensors] + [key for key in ("kind", "total_variance") if key not in meta]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)}; it is not a complete components file")
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{path}: tensor {name!r} holds non-finite values")
        extra = {**meta.get("meta", {}), **{k[5:]: v for k, v in tensors.items() if k.startswith("meta.")}}
        return cls(meta["kind"], tensors["loadings"], tensors["directions"], tensors["mixing"], tensors["unmixing"],
                   tensors["mean"], tensors["explained_variance"], meta["total_variance"], tensors.get("indices"),
                   extra)


def _holds_components(path: Path) -> bool:
    """Whether `path` is a file written by Components.save."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get("decomp", "{}")).get("format") == FORMAT
    except (OSError, SafetensorError, ValueError):
        return False


def component_fishers(directions: list, num_examples: int) -> list:
    """Component-restricted diagonal Fishers v_c * v_c / N from unit-loading directions (``unit=True``). For PCA
    without centring and with all components kept they sum to the empirical Fisher (1/N) sum_n g_n^2."""
    validation.positive_int("num_examples", num_examples)
    return [{name: v.square() / num_examples for name, v in direction.items()} for direction in directions]
