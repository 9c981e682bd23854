"""Isotropic merging (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces"): the task-arithmetic update with a flattened spectrum (Iso-C), and its extension with
task-specific directions outside the common subspace (Iso-CTS).

Checked against the authors' code (github.com/danielm1405/iso-merging, src/utils/iso.py and
config/method/iso_cts.yaml): every 2-D tensor is merged through its SVD, every other tensor by the mean of the task
vectors; one coefficient (here `scale`, default 1.0) multiplies the merged task vector.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import Interval, Parameter, register_merge_method
from .linear import SCALE
from .tsv import matrix_task_vectors, polar, svd_dtype, svd_slices, thin_svd


@register_merge_method("iso_c", needs=("base",), slices=svd_slices, parameters=[SCALE])
def iso_c(key: str, values: list[Tensor], context) -> Tensor:
    """Iso-C: the task-arithmetic update with all its singular values set to their mean (Marczak et al., 2025).

    Per 2-D tensor, Δ_TA = Σ_m λ_m τ_m = U Σ Vᵀ (r = min(shape) singular values), σ̄ = trace(Σ) / r,
    Δ = σ̄ U Vᵀ. Other tensors: Δ = (1/M) Σ_m λ_m τ_m (the authors' mean). θ = θ_0 + scale·Δ. SVDs in float32
    on the tensors' device (float64 for float64 models)."""
    base, taus, merged = matrix_task_vectors(key, values, context, "iso_c")
    if merged is not None:
        return merged
    u, s, vh = thin_svd(sum(taus).to(svd_dtype(key, context)))
    return base + context.params["scale"] * (s.mean() * u @ vh).double()


def subspace_sizes(r: int, M: int, fraction: float) -> tuple[int, int]:
    """(k common directions, n per task) with k + M n = r, as the authors size them: k = ⌊fraction r⌋, then the
    task-specific total r - k rounded to a multiple of M (Python's round), k taking the rest."""
    common = int(r * fraction)
    specific = round((r - common) / M) * M
    if specific > r:   # a small fraction on a small matrix: round() overshoots; the most that fits instead
        specific = (r // M) * M
    return r - specific, specific // M


@register_merge_method("iso_cts", needs=("base",), slices=svd_slices, parameters=[SCALE, Parameter(
    "common_space_fraction", 0.8, "share of the rank given to the common subspace (the paper's 0.8)", float,
    Interval(0, 1))])
def iso_cts(key: str, values: list[Tensor], context) -> Tensor:
    """Iso-CTS: Iso-C's common subspace plus each task's own directions, spectrum flattened (Marczak et al., 2025).

    Per 2-D tensor (r = min(shape), k common, n per task, k + M n = r, see subspace_sizes): U_c, Σ_c, V_c the top
    k singular triplets of Δ_TA = Σ_m λ_m τ_m; for each task, the top n triplets (U_m, Σ_m, V_m) of
    τ_m - U_c U_cᵀ τ_m (its part outside the common left subspace); U = polar([U_1 .. U_M, U_c]) [out, r],
    V = polar([V_1 .. V_M, V_c]) [in, r]; σ̄ = the mean of the r gathered singular values [Σ_1 .. Σ_M, Σ_c];
    Δ = σ̄ U Vᵀ. Other tensors: Δ = (1/M) Σ_m λ_m τ_m. θ = θ_0 + scale·Δ."""
    base, taus, merged = matrix_task_vectors(key, values, context, "iso_cts")
    if merged is not None:
        return merged
    dtype = svd_dtype(key, context)
    common, per_task = subspace_sizes(min(base.shape), len(taus), context.params["common_space_fraction"])
    u, s, vh = thin_svd(sum(taus).to(dtype))
    us, ss, vhs = [], [], []
    for tau in taus:
        tau = tau.to(dtype)
        specific = tau - u[:, :common] @ (u[:, :common].T @ tau)
        u_m, s_m, vh_m = thin_svd(specific)
        us.append(u_m[:, :per_task])
        ss.append(s_m[:per_task])
        vhs.append(vh_m[:per_task])
    left = polar(torch.cat(us + [u[:, :common]], 1))
    right = polar(torch.cat(vhs + [vh[:common]], 0))
    mean = torch.cat(ss + [s[:common]]).mean()
    return base + context.params["scale"] * (mean * left @ right).double()
