"""The first-batch audit: the capture rules against autograd on one example.

A parameter whose rule does not reproduce autograd (an unseen functional use, a module whose forward is not what
its class suggests, an input without the batch dimension) moves to the exact fallback, so every parameter is
covered exactly. Outcomes are cached per model object while its structure is unchanged (an audit costs one
example's forward and backward with parameter gradients).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from . import hf
from .rules import materialize

AUDITS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
AUDIT_TOLERANCE = 1e-3   # relative; float32 rounding gives ~1e-6, a missed use O(1)
AUDIT_FLOOR = 1e-3       # x the typical gradient entry: below it a parameter's gradient is rounding noise


def audit(capture, batch, indices, term_fn) -> None:
    """Rules against autograd on the first example: mismatching parameters move to the fallback."""
    capture.audited = False
    single = {k: v[:1] if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in batch.items()}
    mask = single.get("attention_mask")
    if mask is not None and hf.is_prefix(mask):  # the example without its padding: cheaper, same rules
        keep = max(int(mask.sum()), 1)
        single = {k: v[:, :keep] if k in ("input_ids", "attention_mask", "token_type_ids", "position_ids")
                  else v for k, v in single.items()}
    recorder = _Recorder(capture)
    terms_index = indices[:1]
    # first pass with the rules (this may already demote modules whose inputs have no batch dimension)
    capture.hooked_pass(single, terms_index, term_fn, recorder, first_term_only=True)
    params = list(capture.params.values())
    with capture.requiring_grad(params):
        inputs = hf.model_inputs(capture.model, single, capture.device)
        term = term_fn(capture.model(**inputs).logits, single, terms_index)[0]
        expected = torch.autograd.grad(term.sum(), params, allow_unused=True)
    expected = [torch.zeros_like(p) if g is None else g.float() for p, g in zip(params, expected)]
    # gradients that vanish in exact arithmetic (a key bias under softmax's shift invariance) are rounding
    # noise on both sides; they are compared against the typical entry of the whole gradient instead
    norms = [torch.linalg.vector_norm(g) for g in expected]
    typical = (sum(float(n) ** 2 for n in norms) / sum(g.numel() for g in expected)) ** 0.5
    for (name, p), grad, grad_norm in zip(capture.params.items(), expected, norms):
        if capture.rules[name] == "fallback":
            continue
        got = recorder.grads.get(name)
        got = torch.zeros_like(grad) if got is None else got[0].reshape(grad.shape).float()
        difference = got.sub_(grad)   # in place: both are scratch, and the word embeddings' are large
        error = torch.linalg.vector_norm(difference)
        got_norm = torch.linalg.vector_norm(grad.add_(difference))
        scale = grad_norm + got_norm + AUDIT_FLOOR * typical * grad.numel() ** 0.5
        if not bool(torch.isfinite(error)) or error > AUDIT_TOLERANCE * scale + 1e-30:
            capture.reasons[name] = (f"audit: the {capture.rules[name]} rule missed part of its gradient "
                                     f"(relative error {float(error / scale.clamp(min=1e-30)):.2g})")
            capture.rules[name] = "fallback"
    capture.audited = True
    AUDITS[capture.model] = (capture._fingerprint(), dict(capture.rules), dict(capture.reasons))


class _Recorder:
    """A consumer that materialises per-example gradients (the audit's, and small tests')."""

    def __init__(self, capture):
        self.capture = capture
        self.grads: dict[str, Tensor] = {}

    def matrix(self, name, contributions):
        shape = self.capture.params[name].shape
        self.grads[name] = sum(materialize(c, shape) for c in contributions)

    def vector(self, name, g):
        self.grads[name] = g

    def fallback(self, name, row, g):  # pragma: no cover - the audit skips fallback parameters
        pass
