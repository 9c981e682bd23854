"""TSV-Merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging"):
each task's matrix update compressed to its top singular vectors, the tasks' singular vectors decorrelated by
orthogonalising them jointly.

Checked against the authors' code (github.com/AntoAndGar/task_singular_vectors, src/utils/TSVM_utils.py,
compute_and_sum_svd_mem_reduction): every 2-D tensor is merged through its SVD (embeddings included; the authors
leave out only CLIP's text projection), every other tensor by the mean of the task vectors, and the merged task
vector is added with one coefficient chosen on validation data (here `scale`, default 1.0).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..engine import row_blocks
from ..registry import register_merge_method
from .linear import SCALE


def svd_dtype(key: str, context) -> torch.dtype:
    """float32 (the SVDs' precision, on the tensors' device), or float64 for models held in float64."""
    return torch.float64 if context.sources[0].dtype(key) == torch.float64 else torch.float32


def thin_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """torch.linalg.svd(matrix, full_matrices=False). LAPACK's divide-and-conquer driver (torch's on the CPU) can
    fail to converge on matrices with many repeated singular values, such as stacks of equal or zero task
    directions; those are decomposed again in float64 by the slower QR-iteration driver (gesvd), which does."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        import scipy.linalg
        u, s, vh = scipy.linalg.svd(matrix.detach().cpu().double().numpy(), full_matrices=False,
                                    lapack_driver="gesvd")
        return tuple(torch.from_numpy(x).to(device=matrix.device, dtype=matrix.dtype) for x in (u, s, vh))


def unchanged(key: str, taus: list[Tensor], context, method: str) -> bool:
    """Whether no task changed this tensor (e.g. frozen word embeddings): the SVD methods then keep θ_0 (noted),
    rather than decomposing zero matrices whose singular vectors are arbitrary."""
    if any(bool(t.any()) for t in taus):
        return False
    context.note(key, f"{method}: every task vector is zero here: kept from the base")
    return True


def svd_slices(key: str, context) -> Optional[str]:
    """How the SVD methods take tensor `key` (the engine's ``slices``): entry by entry where their formula is
    (tensors other than matrices: the mean of the task vectors; matrices no model changed: θ_0), else whole. The
    check reads blocks of rows in the models' dtype: frozen word embeddings then never take whole float64 copies
    (about 1 GB for MiniLM's three task vectors)."""
    shape = context.sources[0].shape(key)
    if len(shape) != 2:
        return "entries"
    for rows in row_blocks(shape, "entries") or [None]:
        origin = context.base.get(key, rows)
        if any(not torch.equal(source.get(key, rows), origin) for source in context.sources):
            return None
    return "entries"


def polar(matrix: Tensor) -> Tensor:
    """The orthogonal matrix closest to `matrix` [a, b] (Frobenius norm): P Qᵀ from its thin SVD P S Qᵀ."""
    p, _, qh = thin_svd(matrix)
    return p @ qh


def weighted_task_vectors(key: str, values: list[Tensor], context) -> tuple[Tensor, list[Tensor]]:
    """(θ_0, [λ_m τ_m]): the SVD methods take each task vector scaled by its weight (1 unless given)."""
    base, taus = context.task_vectors(key, values)
    return base, [w * t for w, t in zip(context.weights, taus)]


def matrix_task_vectors(key: str, values: list[Tensor], context, method: str):
    """(θ_0, [λ_m τ_m], None) for a matrix some task changed, which the SVD method merges; else (θ_0, [λ_m τ_m],
    its merged value): θ_0 + scale·(1/M) Σ_m λ_m τ_m for a tensor that is not a matrix, θ_0 for an unchanged one."""
    base, taus = weighted_task_vectors(key, values, context)
    if base.dim() != 2:
        return base, taus, base + context.params["scale"] * sum(taus) / len(taus)
    return base, taus, base if unchanged(key, taus, context, method) else None


@register_merge_method("tsv", needs=("base",), slices=svd_slices, parameters=[SCALE])
def tsv(key: str, values: list[Tensor], context) -> Tensor:
    """TSV-M: the tasks' top singular vectors, orthogonalised jointly (Gargiulo et al., CVPR 2025).

    Per 2-D tensor, r = min(shape), k = ⌊r / M⌋: τ_m = U_m Σ_m V_mᵀ, keep each task's top k triplets,
    U = [U_1[:, :k] .. U_M[:, :k]] [out, Mk], Σ = diag(Σ_1[:k] .. Σ_M[:k]), V likewise [in, Mk];
    U⊥ = polar(U), V⊥ = polar(V) (the closest orthogonal matrices, P Qᵀ of their SVDs), Δ = U⊥ Σ V⊥ᵀ.
    Other tensors: Δ = (1/M) Σ_m τ_m. θ = θ_0 + scale·Δ, with τ_m scaled by its λ_m first. When M > r, k = 0
    and the matrix keeps θ_0 (noted). SVDs in float32 on the tensors' device (float64 for float64 models)."""
    base, taus, merged = matrix_task_vectors(key, values, context, "tsv")
    if merged is not None:
        return merged
    k = min(base.shape) // len(taus)
    if k == 0:
        context.note(key, f"tsv: {len(taus)} tasks exceed the rank {min(base.shape)}: kept from the base")
        return base
    us, ss, vhs = [], [], []
    for tau in taus:
        u, s, vh = thin_svd(tau.to(svd_dtype(key, context)))
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    delta = polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vhs, 0))
    return base + context.params["scale"] * delta.double()
