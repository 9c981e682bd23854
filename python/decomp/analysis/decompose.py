"""Components of per-example gradient features: PCA, ICA and k-means, their alignment with labels, and their
directions in parameter space.

Features are a ``GradientSketch`` or an [N, K] tensor. For a classifier's log p(predicted), g_n = +-(1 - p) grad
margin: the sign of the prediction is one dominant direction that hides the rest. ``prepare`` removes it (flip
each example by its predicted class, or project given directions out) and scales examples to unit length.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..gradients.sketch import GradientSketch
from ..gradients.store import read_columns

EXACT_LIMIT = 4096 * 4096   # N * K up to this: exact SVD; beyond: randomized
STREAM_CHUNK = 8192         # rows per chunk of the streaming (store) path


def _features(x) -> Tensor:
    if isinstance(x, GradientSketch):
        x = x.features
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a GradientSketch or an [N, K] tensor; got "
                         f"{type(x).__name__ if not isinstance(x, Tensor) else list(x.shape)}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"x must hold at least 2 examples and 1 feature; got [{x.shape[0]}, {x.shape[1]}]")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(1).nonzero()[0, 0])
        raise ValueError(f"x has non-finite features (first in row {bad})")
    return x


def _indices(x) -> Optional[Tensor]:
    return x.indices.clone() if isinstance(x, GradientSketch) else None


def _sketch_config(x) -> dict:
    """The sketch's output settings, so that parameter_directions takes the same gradients."""
    if not isinstance(x, GradientSketch):
        return {}
    config = {"sketch": {k: x.config.get(k) for k in ("output", "seed", "target")}}
    if x.example_scale is not None:
        config["example_scale"] = x.example_scale.float().cpu()
    return config


def prepare(x, *, sign_by=None, normalize: bool = False, project_out: Optional[Tensor] = None):
    """Features ready for decomposition: [N, K] float32 (a GradientSketch in, a GradientSketch out, whose
    ``example_scale`` [N] records each row's sign and scale, so that parameter directions use the same
    per-example factors; a projection is not mapped back to parameters).

    sign_by: "predictions" (the sketch's predicted classes), "labels", or a [N] tensor of two classes (or of
    +-1 signs); examples of the second class are negated, which folds g = +-(1 - p) grad margin onto one side.
    project_out: [K] or [K, m] directions removed from every example. normalize: scale each example to unit
    length (examples with zero gradient stay zero)."""
    features = _features(x).float().clone()
    N = features.shape[0]
    scale = torch.ones(N, dtype=torch.float32, device=features.device)
    if sign_by is not None:
        if isinstance(sign_by, str):
            if not isinstance(x, GradientSketch) or sign_by not in ("predictions", "labels"):
                raise ValueError(f"sign_by={sign_by!r} needs a GradientSketch and 'predictions' or 'labels'")
            name, sign_by = sign_by, getattr(x, sign_by)
            if sign_by is None:
                raise ValueError(f"the sketch holds no {name} (it was not taken from a classifier)")
        sign_by = torch.as_tensor(sign_by)
        if sign_by.shape != (N,):
            raise ValueError(f"sign_by must be [N] = [{N}]; got {list(sign_by.shape)}")
        values = torch.unique(sign_by)
        if len(values) > 2:
            raise ValueError(f"sign_by must take two values (two classes, or signs); got {len(values)}: use "
                             f"project_out= for more classes")
        negative = (sign_by == -1) if bool(((values == 1) | (values == -1)).all()) else (sign_by == values[-1])
        scale[negative.to(features.device)] = -1
    features *= scale[:, None]
    if project_out is not None:
        directions = torch.as_tensor(project_out, dtype=torch.float32)
        directions = directions[:, None] if directions.dim() == 1 else directions
        if directions.shape[0] != features.shape[1]:
            raise ValueError(f"project_out must be [K] or [K, m] with K = {features.shape[1]}; got "
                             f"{list(directions.shape)}")
        basis, _ = torch.linalg.qr(directions)
        features -= (features @ basis) @ basis.T
    if normalize:
        norms = features.norm(dim=1).clamp(min=1e-30)
        features /= norms[:, None]
        scale /= norms
    if not isinstance(x, GradientSketch):
        return features
    previous = x.example_scale if x.example_scale is not None else 1.0
    return GradientSketch(features, x.indices, x.labels, x.predictions, x.blocks, x.config, x.coverage,
                          example_scale=scale * previous)


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

    def save(self, path) -> Path:
        """safetensors file with the tensors and the kind/meta as metadata; written atomically."""
        from safetensors.torch import save_file
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in
                   ("loadings", "directions", "mixing", "unmixing", "mean", "explained_variance")}
        if self.indices is not None:
            tensors["indices"] = self.indices.cpu().contiguous()
        tensors.update({f"meta.{k}": v.detach().cpu().contiguous() for k, v in self.meta.items()
                        if isinstance(v, Tensor)})
        meta = {"format": "decomp.components/1", "kind": self.kind, "total_variance": self.total_variance,
                "meta": {k: v for k, v in self.meta.items() if not isinstance(v, Tensor)}}
        partial = path.with_name(path.name + ".partial")
        save_file(tensors, str(partial), metadata={"decomp": json.dumps(meta)})
        os.replace(partial, path)
        return path

    @classmethod
    def load(cls, path) -> "Components":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("decomp", "{}"))
            if meta.get("format") != "decomp.components/1":
                raise ValueError(f"{path} holds no decomp components")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        extra = {**meta.get("meta", {}), **{k[5:]: v for k, v in tensors.items() if k.startswith("meta.")}}
        return cls(meta["kind"], tensors["loadings"], tensors["directions"], tensors["mixing"], tensors["unmixing"],
                   tensors["mean"], tensors["explained_variance"], meta["total_variance"], tensors.get("indices"),
                   extra)


def _check_rank(n_components: int, N: int, K: int) -> None:
    if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
        raise ValueError(f"n_components must be a positive int; got {n_components!r}")
    if n_components > min(N, K):
        raise ValueError(f"n_components must be at most min(N, K) = {min(N, K)} for [{N}, {K}] features; "
                         f"got {n_components}")


def pca(x, n_components: int, *, center: bool = True, method: str = "auto", seed: int = 0) -> Components:
    """Principal components of the features. method: "exact" (SVD in float64), "randomized" (Halko et al.,
    seeded, 10 oversamples and 4 power iterations), "streaming" (Gram matrix accumulated chunk by chunk; for a
    store directory or memory-mapped sketch, never all rows at once), or "auto" (exact when N*K <= 16.7M, else
    streaming when K <= 8192, else randomized). x may also be a store directory path."""
    if isinstance(x, (str, Path)):
        meta, columns = read_columns(x)
        x = GradientSketch._from(meta, columns, Path(x))
        method = "streaming" if method == "auto" else method
    features = _features(x)
    N, K = features.shape
    _check_rank(n_components, N, K)
    if method == "auto":
        method = "exact" if N * K <= EXACT_LIMIT else ("streaming" if K <= 8192 else "randomized")
    if method not in ("exact", "randomized", "streaming"):
        raise ValueError(f"method must be 'auto', 'exact', 'randomized' or 'streaming'; got {method!r}")
    if method == "streaming":
        mean, gram = _streaming_moments(features, center)
        total = float(torch.diagonal(gram).sum()) / (N - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        order = torch.argsort(eigenvalues, descending=True)[:n_components]
        directions = eigenvectors[:, order].T                                   # [r, K]
        variance = eigenvalues[order].clamp(min=0) / (N - 1)
        scores = torch.cat([(features[i:i + STREAM_CHUNK].double() - mean) @ directions.T
                            for i in range(0, N, STREAM_CHUNK)])
    else:
        data = features.double()
        mean = data.mean(0) if center else torch.zeros(K, dtype=torch.float64)
        centred = data - mean
        total = float(centred.square().sum()) / (N - 1)
        if method == "exact":
            U, S, Vh = torch.linalg.svd(centred, full_matrices=False)
        else:
            U, S, Vh = _randomized_svd(centred, n_components, seed)
        U, S, Vh = U[:, :n_components], S[:n_components], Vh[:n_components]
        directions, variance, scores = Vh, S.square() / (N - 1), U * S
    directions, scores = _fix_signs(directions, scores)
    return Components("pca", scores.float(), directions.float(), directions.T.float(), directions.float(),
                      mean.float(), variance.float(), total, _indices(x),
                      {"method": method, "center": center, **_sketch_config(x)})


def _streaming_moments(features: Tensor, center: bool) -> tuple[Tensor, Tensor]:
    """Mean [K] and centred scatter matrix [K, K] in float64, one chunk of rows at a time."""
    N, K = features.shape
    total = torch.zeros(K, dtype=torch.float64)
    gram = torch.zeros(K, K, dtype=torch.float64)
    for i in range(0, N, STREAM_CHUNK):
        chunk = features[i:i + STREAM_CHUNK].double()
        total += chunk.sum(0)
        gram += chunk.T @ chunk
    mean = total / N if center else torch.zeros(K, dtype=torch.float64)
    return mean, gram - N * torch.outer(mean, mean)


def _randomized_svd(data: Tensor, rank: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(data.shape[1], min(rank + 10, min(data.shape)), generator=generator, dtype=data.dtype)
    basis, _ = torch.linalg.qr(data @ probe)
    for _ in range(4):
        basis, _ = torch.linalg.qr(data.T @ basis)
        basis, _ = torch.linalg.qr(data @ basis)
    U_small, S, Vh = torch.linalg.svd(basis.T @ data, full_matrices=False)
    return basis @ U_small, S, Vh


def _fix_signs(directions: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Deterministic signs: each component's largest-|score| example loads positively."""
    pick = scores.abs().argmax(0)
    signs = torch.sign(scores.gather(0, pick[None])).squeeze(0)
    signs[signs == 0] = 1
    return directions * signs[:, None], scores * signs


def ica(x, n_components: int, *, seed: int = 0, max_iter: int = 1000) -> Components:
    """Independent components (scikit-learn's FastICA, logcosh) of the top `n_components` principal components,
    whitened. Seeded and deterministic; sources have unit variance, each signed so that its heavier tail is
    positive, and ordered by the variance their mixing column explains."""
    from sklearn.decomposition import FastICA
    principal = pca(x, n_components)
    whitened = (principal.loadings.double() / principal.explained_variance.double().sqrt().clamp(min=1e-30))
    model = FastICA(whiten=False, random_state=seed, max_iter=max_iter, tol=1e-6)
    rotation_sources = model.fit_transform(whitened.numpy())             # [N, r], rotation of whitened scores
    sources = torch.from_numpy(rotation_sources).double()
    sources /= sources.std(0, keepdim=True).clamp(min=1e-30)
    skew = (sources ** 3).mean(0)
    sources *= torch.where(skew < 0, -1.0, 1.0)
    # features - mean ~ sources @ mixing.T with mixing [K, r] by least squares (exact within the PCA span)
    centred = principal.loadings.double() @ principal.directions.double()
    mixing = torch.linalg.lstsq(sources, centred).solution.T              # [K, r]
    explained = mixing.square().sum(0)   # variance each unit-variance source puts into the features
    order = torch.argsort(explained, descending=True)
    sources, mixing, explained = sources[:, order], mixing[:, order], explained[order]
    unmixing = torch.linalg.pinv(mixing)                                  # [r, K]
    directions = mixing.T / mixing.norm(dim=0)[:, None].clamp(min=1e-30)
    return Components("ica", sources.float(), directions.float(), mixing.float(), unmixing.float(),
                      principal.mean, explained.float(), principal.total_variance, principal.indices,
                      {"seed": seed, "n_iter": int(model.n_iter_), **_sketch_config(x)})


def cluster(x, k: int, *, seed: int = 0, whiten: Optional[int] = None, n_init: int = 10) -> Components:
    """k-means (scikit-learn, seeded) of the rows of x: a GradientSketch, an [N, K] tensor of prepared features,
    or component scores. whiten=r clusters the top r principal components instead, each scaled to unit variance
    and each example to unit length, so that a few dominant directions do not decide every cluster (on the
    Rotten Tomatoes benchmark this doubled the AMI of sign-fixed gradients). Loadings are one-hot memberships;
    directions are the cluster centres (in the space clustered)."""
    from sklearn.cluster import KMeans
    features = _features(x)
    N, K = features.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= N:
        raise ValueError(f"k must be an int in [2, N = {N}]; got {k!r}")
    if whiten is not None:
        scores = pca(features, whiten).loadings
        features = prepare(scores / scores.std(0, keepdim=True).clamp(min=1e-30), normalize=True)
    model = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(features.double().numpy())
    labels = torch.from_numpy(model.labels_).long()
    centres = torch.from_numpy(model.cluster_centers_).float()
    distances = torch.from_numpy(model.transform(features.double().numpy())).float()
    loadings = torch.nn.functional.one_hot(labels, k).float()
    sizes = loadings.sum(0)
    mean = features.float().mean(0)
    total = float((features.double() - mean.double()).square().sum()) / (N - 1)
    between = (sizes * (centres - mean).square().sum(1)) / (N - 1)
    return Components("kmeans", loadings, centres, centres.T, centres, mean, between, total, _indices(x),
                      {"seed": seed, "whiten": whiten, "distances": distances, "inertia": float(model.inertia_),
                       **_sketch_config(x)})


def component_fishers(directions: list, num_examples: int) -> list:
    """Component-restricted diagonal Fishers v_c * v_c / N from unit-loading directions (``unit=True``). For PCA
    without centring and with all components kept they sum to the empirical Fisher (1/N) sum_n g_n^2."""
    if not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int; got {num_examples!r}")
    return [{name: v.square() / num_examples for name, v in direction.items()} for direction in directions]
