"""Per-example gradients from layer factors: hooks that capture each layer's inputs and output gradients.

GradientCapture attaches forward hooks to the modules a rule covers (see decomp.gradients.rules) and tensor hooks
to their outputs, so that each backward pass delivers every covered parameter's per-example gradient factors to a
consumer (decomp.gradients.engine.GradientConsumer), summed over a parameter's uses before anything is squared.
Parameters are frozen meanwhile, so autograd never runs the weight-gradient GEMMs. Padding (attention_mask) is
excluded through each example's length, or masked when not a suffix. Parameters no rule covers, or whose rule
the first-batch audit (decomp.gradients.audit) rejects, get exact per-example autograd.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from . import hf
from .audit import AUDITS, announce_fallback, audit
from .outputs import terms as output_terms
from .rules import Contribution, assign_rules, conv2d_gradients, module_rule, token_sum


class GradientCapture:
    """Hooks and the per-batch driver of the passes that consume per-example gradients (GradientJob): each
    backward pass delivers every covered parameter's gradient to a GradientConsumer (decomp.gradients.engine)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.task = hf.task_of(model)
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("model has no trainable parameters (requires_grad=True): nothing to compute")
        self.names = {id(p): name for name, p in self.params.items()}
        self.device = next(iter(self.params.values())).device
        self.rules, self.reasons, self.modules = assign_rules(model, self.params)
        self.encoder = hf.encoder_modules(model)
        self.audited = False
        cached = AUDITS.get(model)
        if cached is not None and cached[0] == self._fingerprint():
            self.rules, self.reasons, self.audited = dict(cached[1]), dict(cached[2]), True
        self._batch: Optional[dict] = None
        self._busy = False
        self._modes: list = []
        self._demoted: list = []
        self._ruled_of: dict = {}    # id(module) -> _ruled(module), until _demote changes a rule
        self._unit_affine: dict = {}  # (shape, dtype, device) -> (ones, zeros): a LayerNorm's w = 1, b = 0

    def _fingerprint(self) -> tuple:
        """The model's structure: which parameters are trainable, and which modules hold them."""
        return (tuple((name, id(p), tuple(p.shape)) for name, p in self.params.items()),
                tuple(id(m) for m in self.model.modules()))

    # ---- coverage ----------------------------------------------------------------------------------------

    def coverage(self) -> dict[str, str]:
        """Parameter name -> rule ('linear', 'conv1d', 'embedding', 'norm', 'bias', tied uses joined by '+',
        or 'fallback: <reason>')."""
        return {name: rule if rule != "fallback" else f"fallback: {self.reasons[name]}"
                for name, rule in self.rules.items()}

    @property
    def fallback_names(self) -> list[str]:
        return [name for name, rule in self.rules.items() if rule == "fallback"]

    def _ruled(self, module) -> list[tuple[str, str, Tensor]]:
        """(name, role, parameter) of the module's parameters that a fast rule still covers."""
        found = self._ruled_of.get(id(module))
        if found is None:
            found = [(self.names[id(p)], role, p) for role, p in module.named_parameters(recurse=False)
                     if id(p) in self.names and self.rules[self.names[id(p)]] != "fallback"]
            self._ruled_of[id(module)] = found
        return found

    def _demote(self, names, reason: str) -> None:
        """Moves parameters to the exact fallback. Before or during the audit this is silent (the audit's report
        lists them); on a later batch (a use the first batch did not show, such as an input whose batch dimension
        only matched the audit's single example) the current batch and every later one use the fallback, and the
        move is announced once."""
        names = [name for name in names if self.rules[name] != "fallback"]
        self._ruled_of.clear()
        for name in names:
            self.rules[name] = "fallback"
            self.reasons[name] = reason
            if self._batch is not None:
                self._batch["pending"].pop(name, None)
        if names and self.audited:
            cached = AUDITS.get(self.model)
            if cached is not None:
                AUDITS[self.model] = (cached[0], dict(self.rules), dict(self.reasons))
            self._demoted.extend(names)   # announced once, when the batch's pass ends

    # ---- hooks -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def attached(self):
        """Eval mode, parameters frozen (no weight-gradient GEMMs) and hooks on; all restored on exit."""
        was_training = self.model.training
        frozen = [p for p in self.params.values()]
        handles = []
        for m in self.modules:
            if isinstance(m, nn.Embedding):   # the ids its forward really looks up (offsets, scaled outputs)
                handles.append(m.register_forward_pre_hook(self._embedding_enter))
                handles.append(m.register_forward_hook(self._embedding_exit, always_call=True))
            else:
                handles.append(m.register_forward_hook(self._forward_hook))
        self.model.eval()
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for p in frozen:
                p.requires_grad_(True)
            self.model.train(was_training)
            self._batch = None

    def _mask_for(self, module, T: int):
        masks = self._batch["masks"]
        key = "encoder" if id(module) in self.encoder else "decoder"
        found = masks.get(key)
        if found is None or found[0].shape[1] != T:
            return None
        return found

    def _embedding_enter(self, module, args):
        if self._batch is None or self._busy or not self._ruled(module):
            return None
        mode = _EmbeddingLookups(self, module)
        mode.__enter__()
        self._modes.append(mode)
        return None

    def _embedding_exit(self, module, args, output):
        if self._modes and self._modes[-1].module is module:
            self._modes.pop().__exit__(None, None, None)
        return None

    def _lookup(self, module, ids: Tensor, output: Tensor, padding_idx) -> Tensor:
        """One F.embedding(ids, module.weight) inside the module's forward: its output, made a leaf whose
        gradient (per example) is delivered; ids [1, T] broadcast over the batch are expanded first."""
        ruled, N = self._ruled(module), self._batch["N"]
        if not ruled:
            return output
        if ids.dim() >= 2 and ids.shape[0] == 1 and N > 1:
            ids, output = ids.expand(N, *ids.shape[1:]), output.expand(N, *output.shape[1:])
        if ids.dim() < 2 or ids.shape[0] != N:
            self._demote([name for name, _, _ in ruled],
                         f"{type(module).__name__} looks up ids {list(ids.shape)} without a batch dimension of {N}")
            return output
        output = output.detach().requires_grad_(True)
        seq = ids.reshape(N, -1)
        mask = self._mask_for(module, seq.shape[1]) if ids.dim() == 2 else None
        self._register(module, ruled, seq, mask, output, padding_idx)
        return output

    def _register(self, module, ruled, seq, mask, output, padding_idx=None) -> None:
        for name, _, _ in ruled:
            self._batch["uses"][name] = self._batch["uses"].get(name, 0) + 1
        output.register_hook(lambda g: self._deliver(module, ruled, seq, mask, g, padding_idx))

    def _forward_hook(self, module, args, output):
        batch = self._batch
        if batch is None or self._busy or not isinstance(output, Tensor):
            return None
        ruled = self._ruled(module)
        if not ruled or not args or not isinstance(args[0], Tensor):
            return None
        x, N = args[0], batch["N"]
        if isinstance(module, nn.Conv2d) and x.dim() == 4 and x.shape[0] == N and output.shape[0] == N:
            replaced = self._leaf(output)
            self._register(module, ruled, x, None, replaced)
            return replaced
        if x.dim() == 2 and x.shape[0] != N:
            # tokens flattened into rows ([N T, in], as OPT's feed-forward layers do): back to [N, T, in]
            T = next((m[0].shape[1] for m in batch["masks"].values() if x.shape[0] == N * m[0].shape[1]), None)
            if T is not None and output.shape[0] == x.shape[0]:
                x, output = x.view(N, T, x.shape[-1]), output.view(N, T, output.shape[-1])
                replaced = self._leaf(output)
                self._register(module, ruled, x, self._mask_for(module, T), replaced)
                return replaced.view(N * T, -1)
        if x.shape[0] != N or output.shape[0] != N:
            self._demote([name for name, _, _ in ruled],
                         f"{type(module).__name__} input {list(x.shape)} has no batch dimension of {N}")
            return None
        misfit = [name for name, _, p in ruled if p.dim() == 1 and output.shape[-1] != p.shape[0]]
        if misfit:   # e.g. a norm that permutes its input inside its forward: features not on the last axis
            self._demote(misfit, f"{type(module).__name__} output {list(output.shape)} does not hold its "
                                 f"features on the last axis")
            ruled = self._ruled(module)
            if not ruled:
                return None
        replaced = self._leaf(output)
        seq = x.reshape(N, -1, x.shape[-1])
        mask = self._mask_for(module, seq.shape[1]) if x.dim() == 3 else None
        self._register(module, ruled, seq, mask, replaced)
        return replaced

    @staticmethod
    def _leaf(output: Tensor) -> Tensor:
        """The output itself when it already requires grad (inputs do), else a detached leaf that does."""
        return output if output.requires_grad else output.detach().requires_grad_(True)

    def _normalized(self, module, x: Tensor) -> Tensor:
        """d output / d weight of an elementwise-affine norm: f(w=1, b=0) - f(w=0, b=0), exact for any
        norm of the form w * h(x) + c(x) (LayerNorm, RMSNorm, T5's, Gemma's 1 + w); torch's LayerNorm directly."""
        if type(module) is nn.LayerNorm:
            # w = 1, b = 0 given rather than omitted: torch's CPU layer_norm without them takes a path 2.4x slower
            key = (tuple(module.normalized_shape), x.dtype, x.device)
            if key not in self._unit_affine:
                ones = torch.ones(module.normalized_shape, dtype=x.dtype, device=x.device)
                self._unit_affine[key] = (ones, torch.zeros_like(ones))
            with torch.no_grad():
                return torch.nn.functional.layer_norm(x, module.normalized_shape, *self._unit_affine[key],
                                                      eps=module.eps)
        self._busy = True
        try:
            with torch.no_grad():
                weight = module.weight
                overrides = {"bias": torch.zeros_like(module.bias)} if getattr(module, "bias", None) is not None \
                    else {}
                one = torch.func.functional_call(module, {"weight": torch.ones_like(weight), **overrides}, (x,))
                zero = torch.func.functional_call(module, {"weight": torch.zeros_like(weight), **overrides}, (x,))
            return one - zero
        finally:
            self._busy = False

    def _deliver(self, module, ruled, seq: Tensor, mask, g: Tensor, padding_idx=None) -> None:
        batch = self._batch
        N = batch["N"]
        if isinstance(module, nn.Conv2d):   # images: no padding, whole per-example gradients (small kernels)
            for name, role, _ in ruled:
                self._receive(name, conv2d_gradients(module, seq, g) if role == "weight" else g.float().sum((2, 3)))
            return
        lengths = keep = None
        if mask is not None:
            bool_mask, lengths, keep = mask
            if lengths is None:  # not a prefix: zero the gradient at padding, which keeps every product exact
                g = torch.where(bool_mask.view(N, -1, *([1] * (g.dim() - 2))), g, torch.zeros((), dtype=g.dtype,
                                                                                              device=g.device))
        embedding = isinstance(module, nn.Embedding)
        g = g.reshape(N, -1, g.shape[-1])
        if embedding and padding_idx is not None:  # autograd leaves the padding row's gradient at zero
            g = torch.where((seq == padding_idx)[..., None], torch.zeros((), dtype=g.dtype, device=g.device), g)
        for name, role, _ in ruled:
            rule = module_rule(module, role)
            if rule == "linear":
                item = Contribution("outer", g, seq, lengths)
            elif rule == "conv1d":
                item = Contribution("outer", seq, g, lengths)
            elif rule == "embedding":
                item = Contribution("embedding", seq, g, lengths)
            else:
                if rule == "bias":
                    item = token_sum(g, keep)
                else:  # normalised inputs recomputed now rather than held from the forward pass
                    item = token_sum(g.float() * self._normalized(module, seq).float(), keep)
            self._receive(name, item)

    def _receive(self, name: str, item) -> None:
        batch = self._batch
        if self.rules[name] == "fallback":   # demoted during this batch's forward: the fallback covers it
            return
        pending = batch["pending"].setdefault(name, [])
        pending.append(item)
        if len(pending) == batch["uses"][name]:
            self._flush(name)

    def _flush(self, name: str) -> None:
        items = self._batch["pending"].pop(name)
        if isinstance(items[0], Contribution):
            self._consumer.matrix(name, items)
        else:
            self._consumer.vector(name, torch.stack(items).sum(0) if len(items) > 1 else items[0])

    # ---- driver ------------------------------------------------------------------------------------------

    def _masks(self, inputs: dict) -> dict:
        masks = {}
        for key, source in (("encoder", "attention_mask"), ("decoder", "decoder_attention_mask")):
            mask = inputs.get(source)
            if mask is not None:
                # (mask, lengths, keep): a prefix's lengths and its float mask for token sums, built once a batch
                mask = mask.bool()
                masks[key] = (mask, mask.sum(1), mask.float()) if hf.is_prefix(mask) else (mask, None, None)
        return masks

    def run(self, batch: dict, indices: Tensor, term_fn: Callable, consumer) -> list[Tensor]:
        """One batch: forward with hooks, one backward per term (each delivered to the consumer), then the
        fallback parameters example by example. Returns the terms (detached). Must run inside attached()."""
        if not self.audited:
            audit(self, batch, indices, term_fn)
        terms = self.hooked_pass(batch, indices, term_fn, consumer)
        if self.fallback_names:
            self._fallback(batch, indices, term_fn, consumer)
        return terms

    def hooked_pass(self, batch, indices, term_fn, consumer, first_term_only: bool = False) -> list[Tensor]:
        """Forward with the hooks on, then one backward per term, each term's contributions flushed to the
        consumer when its backward ends. Returns the terms, detached."""
        inputs = hf.model_inputs(self.model, batch, self.device)
        N = inputs["input_ids"].shape[0] if "input_ids" in inputs else len(indices)
        self._batch = {"N": N, "masks": self._masks(inputs), "uses": {}, "pending": {}}
        self._consumer = consumer
        try:
            terms = term_fn(self.model(**inputs).logits, batch, indices)
            terms = terms[:1] if first_term_only else terms
            _check_finite(terms, indices)
            for j, term in enumerate(terms):
                self._batch["pending"] = {}
                if term.requires_grad:
                    term.sum().backward(retain_graph=j + 1 < len(terms))
                for name in list(self._batch["pending"]):
                    self._flush(name)
        finally:
            while self._modes:
                self._modes.pop().__exit__(None, None, None)
            self._batch = None
            if self._demoted:
                announce_fallback(self, self._demoted)
                self._demoted = []
        return [t.detach() for t in terms]

    @contextlib.contextmanager
    def requiring_grad(self, params: list):
        """The given (otherwise frozen) parameters require gradients inside the block."""
        for p in params:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(False)

    def _fallback(self, batch, indices, term_fn, consumer) -> None:
        names = self.fallback_names
        params = [self.params[name] for name in names]
        N = len(indices)
        with self.requiring_grad(params):
            for n in range(N):
                single = {k: v[n:n + 1] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == N else v
                          for k, v in batch.items()}
                logits = self.model(**hf.model_inputs(self.model, single, self.device)).logits
                terms = term_fn(logits, single, indices[n:n + 1])
                for j, term in enumerate(terms):
                    grads = torch.autograd.grad(term.sum(), params, retain_graph=j + 1 < len(terms), allow_unused=True)
                    for name, p, grad in zip(names, params, grads):
                        consumer.fallback(name, n, torch.zeros_like(p) if grad is None else grad)


class _EmbeddingLookups(torch.overrides.TorchFunctionMode):
    """Active only inside one embedding module's forward: every F.embedding of its weight is handed to the
    capture with the ids it really looks up (BART / OPT positions add an offset to what the module receives;
    scaled embeddings multiply the lookup afterwards, which the gradient at the lookup then includes)."""

    def __init__(self, capture: GradientCapture, module: nn.Module):
        super().__init__()
        self.capture, self.module = capture, module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if func is torch.nn.functional.embedding:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if weight is self.module.weight and isinstance(output, Tensor):
                padding_idx = args[2] if len(args) > 2 else kwargs.get("padding_idx")
                if padding_idx is not None and padding_idx < 0:
                    padding_idx += weight.shape[0]
                return self.capture._lookup(self.module, args[0], output, padding_idx)
        return output


def _check_finite(terms: list[Tensor], indices: Tensor) -> None:
    for term in terms:
        bad = ~torch.isfinite(term.detach())
        if bool(bad.any()):
            example = int(indices[bad.nonzero()[0, 0].cpu()])
            raise FloatingPointError(f"the output is not finite for example {example} (value "
                                     f"{float(term.detach()[bad][0])}); nothing was written for its batch")


def coverage(model: nn.Module, data=None, **batch_options) -> dict[str, str]:
    """Which rule covers each trainable parameter of `model` (see decomp.gradients.rules).

    Without data the report is static (from module types); with data (anything ``compute_fisher`` accepts) the
    first example is also audited against autograd, which may move parameters to the exact fallback."""
    capture = GradientCapture(model)
    if data is not None:
        indices, batch = next(hf.batches(data, batch_size=1, **batch_options))
        with capture.attached():
            audit(capture, batch, indices, lambda logits, b, i: _audit_terms(capture.task, logits, b, i))
    return capture.coverage()


def _audit_terms(task, logits, batch, indices):
    return output_terms(task, logits, batch, indices, output="predicted")
