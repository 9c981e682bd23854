"""Features ready for decomposition: a GradientSketch or an [N, K] tensor, checked, signed and scaled.

For a classifier's log p(predicted), g_n = +-(1 - p) grad margin: the sign of the prediction is one dominant
direction that hides the rest. ``prepare`` removes it (flip each example by its predicted class, or project given
directions out) and scales examples to unit length.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..gradients.sketch import GradientSketch


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
        given = list(directions.shape)
        directions = directions[:, None] if directions.dim() == 1 else directions
        if directions.dim() != 2 or directions.shape[0] != features.shape[1]:
            raise ValueError(f"project_out must be [K] or [K, m] with K = {features.shape[1]}; got {given}")
        if not bool(torch.isfinite(directions).all()) or not bool(directions.norm(dim=0).gt(0).all()):
            raise ValueError("project_out must hold finite, non-zero directions; got a zero or non-finite column")
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
