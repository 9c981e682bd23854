"""The first-batch audit: the capture rules against autograd on one example.

A parameter whose rule does not reproduce autograd (an unseen functional use, a module whose forward is not what
its class suggests, an input without the batch dimension) moves to the exact fallback, so every parameter is
covered exactly. Outcomes are cached per model object while its structure is unchanged (an audit costs one
example's forward and backward with parameter gradients).
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import Tensor

from . import hf
from .rules import materialize

AUDITS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
AUDIT_TOLERANCE = 1e-3   # relative; float32 rounding gives ~1e-6, a missed use O(1)
# bfloat16 (or float16) parameters: autograd rounds its weight gradients to the parameter's dtype while the rules
# accumulate in float32, so the two differ by a few units of that dtype's rounding (bfloat16: up to ~1.4% seen
# on the tiny test models, eps = 0.78%); the tolerance is AUDIT_EPS_MULTIPLE eps of the dtype, still far below O(1)
AUDIT_EPS_MULTIPLE = 4
AUDIT_FLOOR = 1e-3       # x the typical gradient entry: below it a parameter's gradient is rounding noise


def audit(capture, batch, indices, term_fn) -> None:
    """Rules against autograd on the first example, run in a batch with a second one (so that an input without
    the batch dimension cannot pass for the example's own): mismatching parameters move to the fallback, and the
    fallback, when any, is announced once. A model the hooks cannot run (one that modifies a layer's output in
    place, say) moves every parameter to the fallback, with the reason."""
    capture.audited = False
    rows = _audit_rows(batch)
    few = _first_examples(capture, batch, rows)
    recorder = _Recorder(capture)
    terms_index = indices[rows]
    try:   # first pass with the rules (this may already demote modules whose inputs have no batch dimension)
        capture.hooked_pass(few, terms_index, term_fn, recorder, first_term_only=True)
    except RuntimeError as error:
        reason = f"the hooked pass fails on this model ({str(error).splitlines()[0][:160]})"
        capture._demote(list(capture.params), reason)
    if any(rule != "fallback" for rule in capture.rules.values()):
        params = list(capture.params.values())
        with capture.requiring_grad(params):
            inputs = hf.model_inputs(capture.model, few, capture.device)
            term = term_fn(capture.model(**inputs).logits, few, terms_index)[0]
            expected = torch.autograd.grad(term[0], params, allow_unused=True)
        with torch.no_grad():
            _compare(capture, recorder, [torch.zeros_like(p) if g is None else g.float()
                                         for p, g in zip(params, expected)])
    capture.audited = True
    AUDITS[capture.model] = (capture._fingerprint(), dict(capture.rules), dict(capture.reasons))
    if capture.fallback_names:
        announce_fallback(capture, capture.fallback_names)


def _compare(capture, recorder, expected: list) -> None:
    """Moves every parameter whose recorded gradient (example 0) differs from autograd's to the fallback."""
    # gradients that vanish in exact arithmetic (a key bias under softmax's shift invariance) are rounding
    # noise on both sides; they are compared against the typical entry of the whole gradient instead
    norms = [torch.linalg.vector_norm(g) for g in expected]
    typical = (sum(float(n) ** 2 for n in norms) / sum(g.numel() for g in expected)) ** 0.5
    for (name, p), grad, grad_norm in zip(capture.params.items(), expected, norms):
        if capture.rules[name] == "fallback":
            continue
        got = recorder.grads.get(name)
        if got is not None and got[0].numel() != grad.numel():
            capture._demote([name], f"audit: the {capture.rules[name]} rule gave a gradient of the wrong shape")
            continue
        got = torch.zeros_like(grad) if got is None else got[0].reshape(grad.shape).float()
        difference = got.sub_(grad)   # in place: both are scratch, and the word embeddings' are large
        error = torch.linalg.vector_norm(difference)
        got_norm = torch.linalg.vector_norm(grad.add_(difference))
        scale = grad_norm + got_norm + AUDIT_FLOOR * typical * grad.numel() ** 0.5
        if not bool(torch.isfinite(error)) or error > tolerance(p.dtype) * scale + 1e-30:
            capture._demote([name], f"audit: the {capture.rules[name]} rule missed part of its gradient "
                                    f"(relative error {float(error / scale.clamp(min=1e-30)):.2g})")


def tolerance(dtype: torch.dtype) -> float:
    """The audit's relative tolerance for a parameter of this dtype: AUDIT_TOLERANCE, or a few units of a
    low-precision dtype's rounding."""
    return max(AUDIT_TOLERANCE, AUDIT_EPS_MULTIPLE * torch.finfo(dtype).eps)


def _size(batch: dict) -> int:
    return next(v.shape[0] for k, v in batch.items() if k in ("input_ids", "pixel_values", "attention_mask")
                and isinstance(v, Tensor))


def _audit_rows(batch: dict) -> Tensor:
    """The audited example (the first) and a second one: the longest, so that the first keeps its padding when
    it has any (a model whose output depends on its padding, which the rules drop, is then caught)."""
    N = _size(batch)
    if N == 1:
        return torch.zeros(1, dtype=torch.long)
    mask = batch.get("attention_mask")
    other = 1 if mask is None else max(int(mask.sum(1).argmax()), 1)
    return torch.tensor([0, other])


def _first_examples(capture, batch: dict, rows: Tensor) -> dict:
    """The batch's examples `rows`, their common padding cut when right-padded (cheaper, same rules).
    Token-level labels (causal LM, token classification) are cut with the inputs; seq2seq labels are not."""
    N = _size(batch)
    few = {k: v[rows] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == N else v for k, v in batch.items()}
    mask = few.get("attention_mask")
    if mask is None or not hf.is_prefix(mask):
        return few
    T, keep = mask.shape[1], max(int(mask.sum(1).max()), 1)
    cut = ["input_ids", "attention_mask", "token_type_ids", "position_ids"]
    if capture.task in ("causal_lm", "token_classification"):
        cut.append("labels")
    return {k: v[:, :keep] if k in cut and isinstance(v, Tensor) and v.dim() == 2 and v.shape[1] == T else v
            for k, v in few.items()}


def announce_fallback(capture, names) -> None:
    """One warning naming the parameters that use the exact (slower) per-example fallback, and their share."""
    sizes = {name: p.numel() for name, p in capture.params.items()}
    share = sum(sizes[name] for name in names) / sum(sizes.values())
    listed = "; ".join(f"{name} ({capture.reasons[name]})" for name in list(names)[:8])
    more = f"; and {len(names) - 8} more" if len(names) > 8 else ""
    warnings.warn(f"decomp: {len(names)} parameter(s) of {type(capture.model).__name__} ({share:.1%} of its "
                  f"parameters) use the exact per-example autograd fallback, slower but exact: {listed}{more}. "
                  f"decomp.coverage(model) lists every parameter's rule.", stacklevel=4)


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
