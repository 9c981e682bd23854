"""The capture rules: which parameters get a per-example gradient from layer factors, and how.

Every trainable parameter gets a rule. The fast rules read a layer's per-example factors from forward and
tensor hooks, so per-example gradients are never formed and, with the parameters frozen, autograd skips the
weight-gradient GEMMs altogether:

  linear     nn.Linear weight [out, in]:          g_n = sum_t G_t A_t^T   (left G [N, T, out], right A [N, T, in])
  conv1d     transformers' Conv1D weight [in, out]: g_n = sum_t A_t G_t^T
  embedding  nn.Embedding weight [V, d]:           g_n = sum_t e_{id_t} G_t^T (only the rows of the ids), at the ids
                                                   its forward really looks up (offset positions, scaled outputs)
  conv2d     nn.Conv2d weight [out, in, kh, kw]:   g_n = G_n unfold(x_n)^T over output positions (ViT patches)
  norm       LayerNorm / RMSNorm weight [d]:       g_n = sum_t G_t * xhat_t, xhat = f(w=1, b=0) - f(w=0, b=0)
  bias       any of these modules' bias [d]:       g_n = sum_t G_t
  fallback   anything else: exact per-example autograd (slow; reported by decomp.coverage)

A parameter used several times (tied embeddings, shared layers) gets the sum of its uses *before* anything is
squared. Padding (attention_mask) is excluded through each example's length, or masked when not a suffix.
On the first batch an audit compares the rules with autograd on one example; a parameter whose rule does not
reproduce autograd (an unseen functional use, a module whose forward is not what its class suggests) is moved
to the exact fallback, so every parameter is covered exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..kernels.ops import masked_rows

RULES = ("linear", "conv1d", "conv2d", "embedding", "norm", "bias", "fallback")


@dataclass
class Contribution:
    """One use of a matrix parameter in one backward pass: its per-example gradient is sum_t left_t right_t^T.

    kind "outer": left [N, T, a], right [N, T, b]. kind "embedding": left holds ids [N, T] (one-hot rows of a V x
    V identity), right [N, T, d]. lengths [N] marks the valid prefix of each example (None: all T)."""
    kind: str
    left: Tensor
    right: Tensor
    lengths: Optional[Tensor]


def is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_plain_conv2d(module) -> bool:
    """An nn.Conv2d that unfold reproduces: one group, zero padding given as numbers."""
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" and \
        isinstance(module.padding, tuple)


def conv2d_gradients(module: nn.Conv2d, x: Tensor, g: Tensor) -> Tensor:
    """Per-example weight gradients [N, out * in * kh * kw] (float32) of a Conv2d from its input x [N, in, H, W]
    and output gradient g [N, out, H', W']: G_n unfold(x_n)^T, summed over output positions."""
    patches = torch.nn.functional.unfold(x.float(), module.kernel_size, dilation=module.dilation,
                                         padding=module.padding, stride=module.stride)    # [N, in kh kw, L]
    return torch.bmm(g.float().flatten(2), patches.transpose(1, 2)).flatten(1)


def is_norm(module) -> bool:
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    return (isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm)))
            or name.endswith(("LayerNorm", "RMSNorm", "NoNorm"))) and isinstance(weight, Tensor) and weight.dim() == 1


def module_rule(module, role: str) -> Optional[str]:
    """The fast rule for parameter `role` ('weight', 'bias') owned directly by `module`, or None."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return {"weight": "conv1d" if is_conv1d(module) else "linear", "bias": "bias"}.get(role)
    if is_plain_conv2d(module):
        return {"weight": "conv2d", "bias": "bias"}.get(role)
    if isinstance(module, nn.Embedding):
        plain = module.max_norm is None and not module.scale_grad_by_freq
        return "embedding" if role == "weight" and plain else None
    if is_norm(module):
        return {"weight": "norm", "bias": "bias"}.get(role)
    return None


def token_sum(t: Tensor, keep: Optional[Tensor]) -> Tensor:
    """sum_t keep[n, t] t[n, t, :]: [N, T, d] -> [N, d] float32, as a batched GEMV so that the padded tensor is
    never copied. keep: [N, T] float32 (1 at each example's valid prefix, built once per batch), or None: all T."""
    t = t.float()
    return t.sum(1) if keep is None else torch.bmm(keep.unsqueeze(1), t).squeeze(1)


def materialize(contribution: Contribution, shape: torch.Size) -> Tensor:
    """The per-example gradients [N, a, b] of one contribution (for audits, tests and small parameters)."""
    right = masked_rows(contribution.right.float(), contribution.lengths)
    if contribution.kind == "outer":
        return torch.bmm(contribution.left.float().transpose(1, 2), right)
    N, T = contribution.left.shape
    rows = contribution.left + torch.arange(N, device=right.device)[:, None] * shape[0]   # row of [N * V, d]
    return right.new_zeros(N * shape[0], *shape[1:]).index_add_(0, rows.reshape(-1), right.reshape(N * T, -1)) \
        .view(N, *shape)


def assign_rules(model: nn.Module, params: dict) -> tuple[dict, dict, list]:
    """(rule per parameter name, reason per fallback parameter, the modules to hook). A parameter gets a fast rule
    only when every module that owns it has one (tied uses joined by '+'); else the exact fallback."""
    names = {id(p): name for name, p in params.items()}
    owners: dict[str, list] = {name: [] for name in params}
    for module in model.modules():
        for role, p in module.named_parameters(recurse=False):
            if id(p) in names:
                owners[names[id(p)]].append((module, module_rule(module, role)))
    rules, reasons = {}, {}
    for name, uses in owners.items():
        missing = [type(m).__name__ for m, rule in uses if rule is None]
        if uses and not missing:
            rules[name] = "+".join(sorted({rule for _, rule in uses}))
        else:
            rules[name] = "fallback"
            reasons[name] = f"no rule for {', '.join(missing) or 'a parameter used outside modules'}"
    modules = [m for m in model.modules() if any(
        module_rule(m, role) and id(p) in names for role, p in m.named_parameters(recurse=False))]
    return rules, reasons, modules
