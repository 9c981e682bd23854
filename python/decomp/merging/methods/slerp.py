"""Spherical linear interpolation of two models, tensor by tensor (as mergekit applies it: to the models' weights
themselves, not to task vectors).

Checked against mergekit (github.com/arcee-ai/mergekit, mergekit/merge_methods/slerp.py): each tensor flattened,
the angle taken between the normalised vectors, linear interpolation when they are nearly colinear
(|cos| > 0.9995), vectors of norm at most 1e-8 left unnormalised.
"""

from __future__ import annotations

import math

from torch import Tensor

from ..registry import Interval, Parameter, register_merge_method

DOT_THRESHOLD = 0.9995   # mergekit's: above it the two directions are treated as colinear
EPS = 1e-8


def _prepare(context) -> None:
    if len(context.sources) != 2:
        raise ValueError(f"method='slerp' interpolates between exactly two models; got {len(context.sources)}")


@register_merge_method("slerp", prepare=_prepare, weighted=False, parameters=[
    Parameter("t", 0.5, "position between the two models: 0 gives models[0], 1 gives models[1]", float,
              Interval(0, 1))])
def slerp(key: str, values: list[Tensor], context) -> Tensor:
    """SLERP: spherical linear interpolation between two models (Shoemake, 1985; as in mergekit).

    For one tensor of each model, flattened, v0 and v1: cos Ω = ⟨v̂0, v̂1⟩ with v̂ = v / |v| (v itself when
    |v| <= 1e-8); when |cos Ω| > 0.9995, (1 - t) v0 + t v1; else sin((1 - t) Ω) / sin Ω · v0 + sin(t Ω) / sin Ω · v1
    (the unnormalised tensors, so their norms are interpolated too)."""
    v0, v1 = values
    t = context.params["t"]
    directions = [v / v.norm() if float(v.norm()) > EPS else v for v in (v0, v1)]
    dot = float((directions[0] * directions[1]).sum())
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    omega = math.acos(dot)
    return (math.sin(omega - t * omega) * v0 + math.sin(t * omega) * v1) / math.sin(omega)
