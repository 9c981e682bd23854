"""Gram matrices of every Linear / Conv1D layer's inputs over a dataset: RegMean's statistics."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .engine import ModelPass, PassJob, batch_options
from .hf import encoder_modules, model_inputs, task_of
from .rules import is_conv1d


# relative, between the Grams of one example's rows beyond the mask in the padded batch and alone: float32 rounding
# through a forward pass gives ~1e-8 (Longformer's windows), padding rows that the model fills otherwise than the
# batch's padding tokens ~1e-2 (Pegasus-X's blocks); for a low-precision model, a few units of its dtype's rounding
LONGER_TOLERANCE = 1e-5
LONGER_EPS_MULTIPLE = 4


class GramJob(PassJob):
    """X^T X of each layer's inputs over the real tokens (float64), by forward hooks; no backward pass.

    A layer's rows are read as the examples' tokens when they have the batch dimension ([N, T, in], tokens
    flattened to [N T, in], or time-major [T, N, in] in a model that transposes its ids, as XLNet does) and masked
    there; a table broadcast over the batch ([1, S, in], DeBERTa's relative positions) is what every example's own
    forward reads once, so it counts N times; other rows (experts' routed tokens) count as they come. Rows that the
    mask cannot place are checked once, on the first padded batch's shortest example run alone and unpadded: a table
    must have the same rows, and a sequence the model lengthens itself ([N, S > T, in], padded to its blocks or
    windows) must give that example the same Gram; otherwise collect_grams raises, naming the layer."""

    description = "Gram matrices"

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.modules = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) or is_conv1d(m)}
        self.encoder = encoder_modules(model)
        # allocated up front (not when a layer first runs) so that every rank all-reduces the same tensors
        self.grams = {name: torch.zeros(self._width(m), self._width(m), dtype=torch.float64, device=self.device)
                      for name, m in self.modules.items()}
        self.uses = torch.zeros(len(self.modules), dtype=torch.float64, device=self.device)
        self.masks: dict = {}
        self.examples = 0
        self.time_major = False        # whether the model reads its ids transposed, [T, N]
        self.layouts: dict = {}        # name: "time" or "batch", for a time-major model's [T, N, in] / [N, T, in]
        self.tables: dict = {}         # name: "table" or "rows", for [1, S, in] inputs, once an example alone told
        self.pending: dict = {}        # name: (shapes, Gram) of [1, S, in] inputs not told yet
        self.longer: dict = {}         # name: the shortest example's Gram from rows longer than the mask
        self.checked: set = set()      # layers whose rows beyond the mask were checked against an unpadded example
        self.shortest: Optional[int] = None
        self.probe: Optional[dict] = None
        self.ids: Optional[Tensor] = None

    @staticmethod
    def _width(module) -> int:
        return module.nx if is_conv1d(module) else module.in_features

    @contextlib.contextmanager
    def attached(self):
        was_training = self.model.training
        handles = [m.register_forward_hook(self._hook(i, name, m)) for i, (name, m) in enumerate(self.modules.items())]
        embeddings = _input_embeddings(self.model)
        if embeddings is not None:
            handles.append(embeddings.register_forward_pre_hook(self._ids_hook))
        self.model.eval()
        try:
            with torch.no_grad():
                yield self
        finally:
            for handle in handles:
                handle.remove()
            self.model.train(was_training)

    def _ids_hook(self, module, args):
        ids, given = args[0] if args else None, self.ids
        if self.probe is None and isinstance(ids, Tensor) and given is not None and ids.dim() == 2:
            self.time_major |= ids.shape == given.T.shape and torch.equal(ids, given.T.to(ids.device)) and \
                not torch.equal(ids, given.to(ids.device))

    def _hook(self, position: int, name: str, module):
        # a decoder's cross-attention projections read the encoder's sequence: its own side's mask first, then
        # whichever mask has the input's shape
        sides = ("encoder", "decoder") if id(module) in self.encoder else ("decoder", "encoder")

        def hook(module, args, output):
            x = args[0].double()
            if self.probe is not None:   # an unpadded example alone, to check rows the mask cannot place
                self._record_probe(name, x)
                return
            masks = [self.masks[side] for side in sides if self.masks.get(side) is not None]
            kind, x = self._rows(name, module, x, masks[0] if masks else None)
            if kind == "examples":
                mask = next((m for m in masks if x.shape[:2] == m.shape), None)
                if mask is not None:   # padding carries no statistics
                    x = x * mask[..., None]
                elif masks and x.shape[1] > masks[0].shape[1] and self.shortest is not None \
                        and name not in self.checked:   # the model lengthened the sequence itself
                    own = x[self.shortest]
                    self.longer[name] = self.longer.get(name, 0) + own.T @ own
            flat = x.reshape(-1, x.shape[-1])
            gram = flat.T @ flat
            if kind == "undecided":   # counted once the unpadded example has said what it is
                shapes, total = self.pending.get(name, (set(), 0))
                self.pending[name] = (shapes | {tuple(x.shape)}, total + gram)
            else:
                self.grams[name] += self.examples * gram if kind == "table" else gram
            self.uses[position] += 1
        return hook

    def _rows(self, name: str, module, x: Tensor, mask: Optional[Tensor]) -> tuple[str, Tensor]:
        """("examples", x as [N, T, in]); ("table", x) for a table without the batch dimension, ("rows", x) for
        rows that are neither (experts' routed tokens), counted as they come; ("undecided", x) for [1, S, in]
        before the unpadded example has told a table from the batch on the second axis."""
        N = self.examples
        if self.time_major and mask is not None and x.dim() == 3 and x.shape[:2] in (mask.shape, mask.T.shape):
            if mask.shape[0] != mask.shape[1]:
                self.layouts[name] = "time" if x.shape[:2] == mask.T.shape else "batch"
            elif name not in self.layouts:
                raise NotImplementedError(
                    f"collect_grams: {name} ({type(module).__name__}) reads {list(x.shape)} in a model whose ids run "
                    f"time-major ([T, N]), and with as many examples as tokens ({N}) its rows could be [T, N] or "
                    f"[N, T]; pass a batch whose size differs from its padded length first")
            if self.layouts[name] == "time":
                return "examples", x.transpose(0, 1)
        per_example = _per_example(x, N, mask)
        if per_example is not None:
            return "examples", per_example
        if N > 1 and x.dim() >= 3 and x.shape[0] == 1:
            return self.tables.get(name, "undecided"), x
        return "rows", x

    def _record_probe(self, name: str, x: Tensor) -> None:
        shapes, gram = self.probe.get(name, (set(), 0))
        if name in self.longer:
            flat = x.reshape(-1, x.shape[-1])
            gram = gram + flat.T @ flat
        self.probe[name] = (shapes | {tuple(x.shape)}, gram)

    def step(self, indices: Tensor, batch: dict) -> None:
        self.examples = len(indices)
        self.masks = real_tokens(self.model, batch, self.device)
        self.ids = batch.get("input_ids") if isinstance(batch.get("input_ids"), Tensor) else None
        mask = batch.get("attention_mask")
        padded = isinstance(mask, Tensor) and mask.dim() == 2 and not bool(mask.bool().all())
        self.shortest = int(mask.sum(-1).argmin()) if padded else None
        self.pending, self.longer = {}, {}
        self.model(**model_inputs(self.model, batch, self.device))
        if self.pending or self.longer:
            alone = self._alone(batch, self.shortest or 0)
            self._decide_tables(alone)
            self._check_longer(alone, mask)

    def _alone(self, batch: dict, n: int) -> dict:
        """{name: (the shapes of its inputs, the Gram of the pending ones)} with example n alone, unpadded."""
        self.probe = {}
        try:
            self.model(**model_inputs(self.model, _unpadded(batch, n, self.examples), self.device))
            return self.probe
        finally:
            self.probe = None

    def _decide_tables(self, alone: dict) -> None:
        """[1, S, in] rows that an example alone reads as they are form a table (each example's forward reads it
        once: counted N times); [1, N, in] that it reads as [1, 1, in] carry the batch on their second axis (counted
        as they come); a table of other rows depends on the padded length, and no padded batch gives its Gram."""
        for name, (shapes, gram) in self.pending.items():
            own = {shape[1:] for shape in alone.get(name, (set(), 0))[0]}
            if all(shape[1:] in own for shape in shapes):
                self.tables[name] = "table"
            elif all(shape[1] == self.examples and (1, *shape[2:]) in own for shape in shapes):
                self.tables[name] = "rows"
            else:
                shape = sorted(shapes)[-1]
                raise NotImplementedError(
                    f"collect_grams: {name} ({type(self.modules[name]).__name__}) reads a table without the batch "
                    f"dimension whose rows depend on the padded length ({list(shape)} in a batch padded to "
                    f"{len(self.masks['encoder'][0]) if 'encoder' in self.masks else '?'} tokens, "
                    f"{[list(s) for s in sorted(alone.get(name, (set(), 0))[0])]} for its shortest example alone; "
                    f"DeBERTa's relative-position span is one), so a padded batch cannot give the Gram of the "
                    f"unpadded examples")
            self.grams[name] += (self.examples if self.tables[name] == "table" else 1) * gram

    def _check_longer(self, alone: dict, mask: Optional[Tensor]) -> None:
        """Rows beyond the mask (a sequence the model pads to its blocks or windows itself) must give the shortest
        example the Gram it has alone, unpadded: the model's own padding rows and the batch's padding tokens agree."""
        dtype = next(self.model.parameters()).dtype
        tolerance = max(LONGER_TOLERANCE, LONGER_EPS_MULTIPLE * torch.finfo(dtype).eps if dtype.is_floating_point else 0)
        for name, got in self.longer.items():
            shapes, want = alone.get(name, (set(), 0))
            difference = float((got - want).norm()) / max(float(got.norm() + want.norm()), 1e-300)
            if difference > tolerance:
                raise NotImplementedError(
                    f"collect_grams: {name} ({type(self.modules[name]).__name__}) reads a sequence the model "
                    f"lengthened itself ({[list(s) for s in sorted(shapes)]} for the shortest example alone, "
                    f"{mask.shape[1]} tokens padded), and that example's rows there differ from its rows alone "
                    f"(relative {difference:.1e}: the model pads the sequence otherwise than the batch's padding "
                    f"tokens, as Pegasus-X's zero-filled blocks do), so a padded batch cannot give the Gram of the "
                    f"unpadded examples")
            self.checked.add(name)

    def totals(self):
        return [*self.grams.values(), self.uses]


def _input_embeddings(model):
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def _unpadded(batch: dict, n: int, N: int) -> dict:
    """Example n of N alone, its padding removed from the inputs laid out like the attention mask."""
    mask = batch.get("attention_mask")
    keep = mask[n].bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None
    single = {}
    for key, value in batch.items():
        if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != N:
            single[key] = value
        elif keep is not None and value.shape[:2] == mask.shape and not key.startswith(("labels", "decoder_")):
            single[key] = value[n:n + 1][:, keep]
        else:
            single[key] = value[n:n + 1]
    return single


def _per_example(x: Tensor, N: int, mask: Optional[Tensor]) -> Optional[Tensor]:
    """x as [N, T, d]: its own batch dimension, or tokens flattened into [N T, d] rows (OPT's feed-forward layers,
    shared experts); None when its rows are neither."""
    if x.dim() >= 2 and x.shape[0] == N:
        return x.reshape(N, -1, x.shape[-1])
    if mask is not None and x.dim() == 2 and x.shape[0] == mask.numel():
        return x.reshape(*mask.shape, x.shape[-1])
    return None


def real_tokens(model, batch: dict, device) -> dict:
    """Masks [N, T] (float64) of the real tokens on each side: the encoder's attention_mask, and the decoder's
    decoder_attention_mask or, for a seq2seq model, the positions with a label (labels of -100 mark padding;
    a token classifier's labels of -100 mark real tokens without a label, which the Gram counts)."""
    masks = {}
    if isinstance(batch.get("attention_mask"), Tensor):
        masks["encoder"] = batch["attention_mask"].to(device, torch.float64)
    if isinstance(batch.get("decoder_attention_mask"), Tensor):
        masks["decoder"] = batch["decoder_attention_mask"].to(device, torch.float64)
    elif task_of(model) == "seq2seq" and isinstance(batch.get("labels"), Tensor) and batch["labels"].dim() == 2:
        # (an encoder-decoder config under a token classifier, UMT5's, has no decoder: its labels are the tokens')
        masks["decoder"] = (batch["labels"] != -100).to(device, torch.float64)
    return masks


class Grams(dict):
    """Module name -> Gram [in, in] (float64), as collect_grams returns them. ``stored_in_out`` names the modules
    whose weight is stored [in, out] (transformers' Conv1D: GPT-2's layers) rather than nn.Linear's [out, in], so
    that a merge orients a square weight's Gram rightly without the model at hand."""

    def __init__(self, grams=(), stored_in_out=()):
        super().__init__(grams)
        self.stored_in_out = frozenset(stored_in_out)

    def __reduce__(self):
        # plain arguments, so that torch.load(weights_only=True) rebuilds it (the class is allowlisted below)
        return Grams, (dict(self), tuple(sorted(self.stored_in_out)))


torch.serialization.add_safe_globals([Grams])


def collect_grams(model, data, *, batch_size: int = 32, max_examples: Optional[int] = None, progress: bool = True,
                  distributed: Optional[bool] = None, **options) -> Grams:
    """Gram matrices X^T X [in, in] (float64) of every Linear / Conv1D layer's inputs over the real tokens of
    `data`, keyed by module name (as in named_modules()), for method='regmean'. Padding is excluded; layers the
    data never ran are left out. options: tokenizer, text_column, label_column, max_length (as compute_fisher).
    distributed: as in compute_fisher (each rank its share of the batches; the Grams all-reduced in float64).

    Raises NotImplementedError, naming the layer and why, where a padded batch cannot give the Gram of the unpadded
    examples: a table without the batch dimension whose rows depend on the padded length (DeBERTa's relative
    positions), a sequence the model pads itself otherwise than with the batch's padding tokens (Pegasus-X's
    blocks), or a time-major model (XLNet) whose first batch has as many examples as tokens."""
    options = batch_options(batch_size=batch_size, max_examples=max_examples, **options)
    run = ModelPass("collect_grams", model, data, options=options, progress=progress, distributed=distributed)
    job = GramJob(model)
    run.run(job, device=job.device)
    kept = {name: gram for (name, gram), used in zip(job.grams.items(), job.uses.tolist()) if used > 0}
    return Grams(kept, stored_in_out=[name for name in kept if is_conv1d(job.modules[name])])
