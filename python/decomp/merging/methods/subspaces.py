"""Data-subspace TSV (ours): TSV-M whose per-task subspaces are chosen by each task's examples instead of by the
weights alone.

TSV-M keeps, of each task matrix τ_m, its best rank-k approximation in the Frobenius norm: the directions with the
largest weights. What a task's examples see of a Linear layer's update is its effect on their inputs, τ_m X_m; the
per-example gradients of that layer, g aᵀ summed over tokens, have their row space in the span of those inputs (the
input factor of the gradients, whose covariance is the Gram C_m = Σ a aᵀ that decomp.collect_grams returns). So
each task keeps instead the best rank-k approximation of τ_m in the norm ‖τ X_m‖_F = ‖τ C_m^½‖_F: the update's
directions that move the outputs on the task's own inputs. With C_m = L Lᵀ and τ_m L = U S Wᵀ, that approximation is
U_k U_kᵀ τ_m (no inverse of C_m needed: rows of τ_m the data never excites cost nothing either way). The tasks'
pieces are then decorrelated exactly as TSV-M does, and `isotropic` flattens the gathered spectrum as Iso-C does.
`data_iso_cts` does the same for Iso-CTS's task-specific directions: the common subspace stays the summed task
matrix's top singular vectors, and each task's own directions outside it are chosen in the norm of its inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import Interval, Parameter, register_merge_method
from .iso import subspace_sizes
from .linear import SCALE
from .tsv import matrix_task_vectors, polar, svd_dtype, svd_slices, thin_svd


def gram_square_root(gram: Tensor) -> Tensor:
    """L with L Lᵀ = gram (symmetric PSD [n, n]): eigenvectors times the square roots of the (clamped) eigenvalues."""
    values, vectors = torch.linalg.eigh(gram)
    return vectors * values.clamp(min=0).sqrt()


def data_truncation(tau: Tensor, root: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The best rank-k approximation of tau [out, in] in the norm ‖τ L‖_F (root L [in, in]), as singular
    triplets (U [out, j], S [j], Vh [j, in]), j ≤ k: directions whose singular value of τ L is zero (at the
    float rank tolerance, as numpy's matrix_rank) are not kept, since any choice of them would be arbitrary."""
    left, values, _ = thin_svd(tau @ root)
    tolerance = max(tau.shape) * torch.finfo(values.dtype).eps * float(values.max()) if values.numel() else 0.0
    left = left[:, :min(k, int((values > tolerance).sum()))]
    p, s, vh = thin_svd(left.T @ tau)
    return left @ p, s, vh


class _TaskMatrices:
    """A 2-D tensor's task matrices as the data-subspace merges take them: τ_m [out, in] in the SVD dtype
    (Conv1D's [in, out] transposed first), with L_m, C_m = L_m L_mᵀ the Gram of the module's inputs (the identity
    where the tensor has no Gram, noted: the weights-only method's own choice)."""

    def __init__(self, key: str, taus: list[Tensor], context, name: str):
        self.transposed = context.gram_layout(key)
        module = key.rsplit(".", 1)[0]
        dtype = svd_dtype(key, context)
        self.taus = [(t.T if self.transposed else t).to(dtype) for t in taus]
        if self.transposed is None:
            context.note(key, f"{name}: no input Gram for this tensor: the weights' own truncation")
            identity = torch.eye(self.taus[0].shape[1], dtype=dtype, device=self.taus[0].device)
            self.roots = [identity] * len(taus)
        else:
            self.roots = [gram_square_root(g[module].to(self.taus[0])) for g in context.grams]

    def update(self, base: Tensor, scale: float, delta: Tensor) -> Tensor:
        """θ_0 + scale·Δ, Δ back in the tensor's own layout."""
        return base + scale * (delta.T if self.transposed else delta).double()


@register_merge_method("data_tsv", needs=("base", "grams"), slices=svd_slices, parameters=[SCALE, Parameter(
    "isotropic", False, "set every gathered singular value to their mean, as Iso-C does", bool)])
def data_tsv(key: str, values: list[Tensor], context) -> Tensor:
    """Data-subspace TSV (ours): each task's top-k directions in the norm of its own inputs, decorrelated as TSV-M.

    Per Linear weight τ_m [out, in] (Conv1D's [in, out] transposed first) with its module's input Gram C_m
    (decomp.collect_grams) and k = ⌊r / M⌋, r = min(shape): C_m = L_m L_mᵀ, τ_m L_m = U S Wᵀ, T_m = U_k U_kᵀ τ_m
    = P_m Σ_m Q_mᵀ (its thin SVD, rank k); U = polar([P_1 .. P_M]), V = polar([Q_1 .. Q_M]),
    Δ = U diag(Σ_1 .. Σ_M) Vᵀ, or with isotropic=True Δ = σ̄ U Vᵀ (σ̄ the mean of the gathered singular values).
    Other 2-D tensors (no Gram: embeddings) take TSV-M's own truncation (C_m = I), noted; other tensors
    Δ = (1/M) Σ_m λ_m τ_m. θ = θ_0 + scale·Δ, τ_m scaled by its λ_m first."""
    base, taus, merged = matrix_task_vectors(key, values, context, "data_tsv")
    if merged is not None:
        return merged
    k = min(base.shape) // len(taus)
    if k == 0:
        context.note(key, f"data_tsv: {len(taus)} tasks exceed the rank {min(base.shape)}: kept from the base")
        return base
    tasks = _TaskMatrices(key, taus, context, "data_tsv")
    us, ss, vhs = zip(*[data_truncation(tau, root, k) for tau, root in zip(tasks.taus, tasks.roots)])
    spectrum = torch.cat(ss)
    if spectrum.numel() == 0:   # no task changed what its inputs see (e.g. frozen weights)
        return base
    left, right = polar(torch.cat(us, 1)), polar(torch.cat(vhs, 0))
    delta = spectrum.mean() * left @ right if context.params["isotropic"] else left @ torch.diag(spectrum) @ right
    return tasks.update(base, context.params["scale"], delta)


@register_merge_method("data_iso_cts", needs=("base", "grams"), slices=svd_slices, parameters=[SCALE, Parameter(
    "common_space_fraction", 0.8, "share of the rank given to the common subspace (Iso-CTS's 0.8)", float,
    Interval(0, 1))])
def data_iso_cts(key: str, values: list[Tensor], context) -> Tensor:
    """Data-subspace Iso-CTS (ours): Iso-CTS whose task-specific directions are chosen in the norm of each task's
    own inputs.

    Per Linear weight (Conv1D's transposed first; r = min(shape), k common and n per task as iso_cts sizes them):
    U_c, Σ_c, V_c the top k singular triplets of Δ_TA = Σ_m λ_m τ_m, as Iso-CTS; for each task, R_m = τ_m -
    U_c U_cᵀ τ_m (its part outside the common left subspace) and its best rank-n part in the norm ‖R C_m^½‖_F as
    data_tsv finds it, triplets (U_m, Σ_m, V_m); U = polar([U_1 .. U_M, U_c]), V = polar([V_1 .. V_M, V_c]),
    σ̄ the mean of the gathered singular values, Δ = σ̄ U Vᵀ. With C_m = I it is Iso-CTS. Other 2-D tensors (no
    Gram: embeddings) take Iso-CTS's own choice, noted; other tensors Δ = (1/M) Σ_m λ_m τ_m. θ = θ_0 + scale·Δ."""
    base, taus, merged = matrix_task_vectors(key, values, context, "data_iso_cts")
    if merged is not None:
        return merged
    tasks = _TaskMatrices(key, taus, context, "data_iso_cts")
    common, per_task = subspace_sizes(min(base.shape), len(taus), context.params["common_space_fraction"])
    u, s, vh = thin_svd(sum(tasks.taus))
    shared = u[:, :common]
    # each task's triplets (none when the common subspace takes the whole rank), then the common ones
    us, ss, vhs = zip(*[data_truncation(tau - shared @ (shared.T @ tau), root, per_task)
                        for tau, root in zip(tasks.taus, tasks.roots) if per_task], (shared, s[:common], vh[:common]))
    spectrum = torch.cat(ss)
    if spectrum.numel() == 0:   # no task changed what its inputs see, and no common subspace
        return base
    left, right = polar(torch.cat(us, 1)), polar(torch.cat(vhs, 0))
    return tasks.update(base, context.params["scale"], spectrum.mean() * left @ right)
