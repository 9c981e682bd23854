"""Decompositions of per-example gradient features: PCA (exact, randomized, streaming), ICA and k-means.

Features are a ``GradientSketch``, an [N, K] tensor or a store directory; see decomp.analysis.prepare for
sign-fixing and scaling first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..gradients.sketch import GradientSketch
from ..kernels import validation
from .components import Components
from .prepare import _features, _indices, _sketch_config, prepare

EXACT_LIMIT = 4096 * 4096   # N * K up to this: exact SVD; beyond: randomized
STREAM_CHUNK = 8192         # rows per chunk of the streaming (store) path


def _check_rank(n_components: int, N: int, K: int) -> None:
    validation.positive_int("n_components", n_components)
    if n_components > min(N, K):
        raise ValueError(f"n_components must be at most min(N, K) = {min(N, K)} for [{N}, {K}] features; "
                         f"got {n_components}")


def pca(x, n_components: int, *, center: bool = True, method: str = "auto", seed: int = 0) -> Components:
    """Principal components of the features. method: "exact" (SVD in float64), "randomized" (Halko et al.,
    seeded, 10 oversamples and 4 power iterations), "streaming" (Gram matrix accumulated chunk by chunk; for a
    store directory or memory-mapped sketch, never all rows at once), or "auto" (exact when N*K <= 16.7M, else
    streaming when K <= 8192, else randomized). x may also be a store directory path."""
    if isinstance(x, (str, Path)):
        x = GradientSketch.load(x)   # a finished store, its rows checked against their checksums
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
    _check_spectrum(variance, total, N, K, n_components, center, method)
    directions, scores = _fix_signs(directions, scores)
    return Components("pca", scores.float(), directions.float(), directions.T.float(), directions.float(),
                      mean.float(), variance.float(), total, _indices(x),
                      {"method": method, "center": center, **_sketch_config(x)})


RANK_TOLERANCE = 2.0 ** -24   # float32 features: singular values below max(N, K) * u * the largest are rounding


def _check_spectrum(variance: Tensor, total: float, N: int, K: int, n_components: int, center: bool,
                    method: str) -> None:
    """Degenerate decompositions are errors: features without variance, or of lower rank than n_components (whose
    trailing components would be rounding noise explaining ~1e-30 of the variance)."""
    what = "centred features" if center else "features"
    if not total > 0 or not bool(torch.isfinite(variance).all()):
        raise ValueError(f"x has zero variance (its {what}: every one of the N = {N} examples is the same"
                         f"{' up to the mean' if center else ''}): there is nothing to decompose")
    floor = float(variance.max()) * (max(N, K) * RANK_TOLERANCE) ** 2
    rank = int((variance > floor).sum())
    if rank < n_components:
        limit = f"min(N - 1, K) = {min(N - 1, K)}" if center else f"min(N, K) = {min(N, K)}"
        raise ValueError(f"n_components={n_components} exceeds the rank of the [{N}, {K}] {what}, which is "
                         f"{rank}{' or fewer' if method == 'randomized' else ''} (at most {limit}): components beyond "
                         f"it would be rounding noise; ask for n_components <= {rank}")


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
    distinct = len(torch.unique(features.float(), dim=0))
    if distinct < k:
        raise ValueError(f"k={k} exceeds the number of distinct examples ({distinct} of N = {N}): k-means cannot "
                         f"form {k} non-empty clusters; ask for k <= {distinct}")
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
