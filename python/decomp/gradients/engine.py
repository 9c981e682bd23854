"""The one model pass: a model run over data, batch by batch, feeding a job.

Every pass of decomp (compute_fisher, sketch_gradients, collect_grams, parameter directions) is a ``PassJob``
run by ``ModelPass``; the engine owns what they share, so that they cannot disagree:

  world     the torch.distributed process group (or a single process), and a check that every rank holds the
            same model, data and settings before any hook is attached or any batch is read
  batches   the same batches a single process would form (decomp.gradients.hf.batches), each rank its share
  hooks     the job's ``attached()`` context, entered once for the whole pass and always left
  progress  one tqdm bar per pass, counting this rank's examples, shown by rank 0 only
  totals    the job's sums all-reduced over the ranks at the end, one tensor at a time, additions in float64
  empty     a pass over no example is an error, never an all-zero result
  inputs    token ids beyond the model's vocabulary, labels beyond its classes and language-model batches with
            no target token at all are errors naming the examples, before the model runs (never an index error deep
            in the model, nor a batch that silently adds zero)
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterable, Optional, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import distributed as shards
from . import hf
from .capture import Contribution, GradientCapture


class GradientConsumer(Protocol):
    """What GradientCapture hands per-example gradients to, once per backward pass and parameter.

    A parameter used several times (tied, shared) arrives once, with all its uses: their sum is its gradient."""

    def matrix(self, name: str, contributions: list[Contribution]) -> None:
        """A Linear / Conv1D / Embedding weight: g_n = sum over contributions and tokens of left_t right_t^T."""

    def vector(self, name: str, g: Tensor) -> None:
        """A bias or norm weight: g [N, numel], each example's gradient."""

    def fallback(self, name: str, row: int, g: Tensor) -> None:
        """A parameter no rule covers: example `row`'s gradient g, in the parameter's shape (exact autograd)."""


class PassJob:
    """One pass's work. Subclasses set ``description`` and implement ``step``; the rest has defaults."""

    description = "pass"

    def attached(self) -> ContextManager:
        """Hooks (and any model state) for the whole pass; restored on exit, whatever happens."""
        return contextlib.nullcontext()

    def step(self, indices: Tensor, batch: dict) -> None:
        """One batch: indices [B] (global example positions), batch (tensors on the CPU)."""
        raise NotImplementedError

    def totals(self) -> Iterable[Tensor]:
        """The sums over examples, all-reduced over the ranks in place at the end of the pass."""
        return ()


class GradientJob(PassJob):
    """A job that consumes per-example gradients: the capture's hooks, and one capture.run per batch with the
    job's output terms. Subclasses implement ``terms`` and the GradientConsumer methods."""

    uses_labels = False   # whether the job's output reads a classifier's gold labels (checked against num_labels)

    def __init__(self, model):
        self.capture = GradientCapture(model)

    @property
    def params(self) -> dict:
        return self.capture.params

    def attached(self) -> ContextManager:
        return self.capture.attached()

    def step(self, indices: Tensor, batch: dict) -> None:
        check_inputs(self.capture.model, self.capture.task, batch, indices, labels=self.uses_labels)
        self.capture.run(batch, indices, self.terms, self)

    def terms(self, logits: Tensor, batch: dict, indices: Tensor) -> list[Tensor]:
        """The scalar outputs [N] whose per-example gradients this job takes (see decomp.gradients.outputs)."""
        raise NotImplementedError


def _vocabulary(model) -> Optional[int]:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    size = getattr(embeddings, "num_embeddings", None)
    return size if isinstance(size, int) else getattr(getattr(model, "config", None), "vocab_size", None)


def _first_bad(bad: Tensor, indices: Tensor, values: Tensor) -> str:
    """'example i (value v at position t)' of the first True entry of bad [N] or [N, T]."""
    where = bad.nonzero()[0].tolist()
    position = f" at position {where[1]}" if len(where) > 1 else ""
    return f"example {int(indices[where[0]])} (value {int(values[tuple(where)])}{position})"


def check_inputs(model, task: str, batch: dict, indices: Tensor, *, labels: bool = False) -> None:
    """Raises ValueError naming the example when token ids fall outside the model's vocabulary, gold labels
    (labels=True) outside a classifier's classes, target tokens outside the vocabulary, or when a language-model
    batch has no target token at all (its gradients would all be zero; a single short example adds zero, as its
    gradient is zero)."""
    vocabulary = _vocabulary(model)
    mask = batch.get("attention_mask")
    mask = mask.bool() if isinstance(mask, Tensor) else None
    ids = batch.get("input_ids")
    if isinstance(ids, Tensor) and vocabulary is not None and ids.numel():
        bad = (ids < 0) | (ids >= vocabulary)
        if mask is not None and mask.shape == ids.shape:
            bad &= mask
        if bool(bad.any()):
            raise ValueError(f"input_ids must lie in [0, vocab_size={vocabulary}) (the model's vocabulary); got "
                             f"{_first_bad(bad, indices, ids)}: do the tokenizer and the model match?")
    gold = batch.get("labels")
    if isinstance(gold, Tensor) and not gold.is_floating_point() and gold.numel():
        if task in ("classification", "token_classification"):
            limit, what = getattr(getattr(model, "config", None), "num_labels", None), "num_labels"
            limit = limit if labels or task == "token_classification" else None
        else:
            limit, what = vocabulary, "vocab_size"
        if limit:
            bad = (gold < 0) | (gold >= limit)
            if task != "classification":
                bad &= gold != -100
            if bool(bad.any()):
                raise ValueError(f"labels must lie in [0, {what}={limit}) (the model's "
                                 f"{'classes' if what == 'num_labels' else 'vocabulary'})"
                                 f"{'' if task == 'classification' else ' or be -100'}; got "
                                 f"{_first_bad(bad, indices, gold)}")
    if task == "causal_lm" and isinstance(ids, Tensor):
        targets = (gold if isinstance(gold, Tensor) else ids)[:, 1:] != -100
        if mask is not None and mask.shape == ids.shape:
            targets &= mask[:, 1:] & mask[:, :-1]
        empty = ~targets.any(1) if targets.shape[1] else torch.ones(ids.shape[0], dtype=torch.bool)
    elif task == "seq2seq" and isinstance(gold, Tensor):
        empty = ~(gold != -100).reshape(gold.shape[0], -1).any(1)
    else:
        return
    if empty.numel() and bool(empty.all()):
        named = [int(i) for i in indices[:10]]
        raise ValueError(f"no example of the batch has a target token (examples {named}"
                         f"{', ...' if len(indices) > 10 else ''}): a {task} output sums over target tokens, so "
                         f"their gradients would all be zero; each example needs at least 2 real tokens (and a "
                         f"label other than -100)")


def batch_options(*, batch_size: int = 32, max_examples: Optional[int] = None, tokenizer=None,
                  text_column: Optional[str] = None, label_column: Optional[str] = None,
                  max_length: Optional[int] = None) -> dict:
    """The options that decide the batches (decomp.gradients.hf.batches), checked once for every pass."""
    from ..kernels.validation import positive_int
    positive_int("batch_size", batch_size)
    for name, value in (("max_examples", max_examples), ("max_length", max_length)):
        if value is not None:
            positive_int(name, value)
    return {"batch_size": batch_size, "max_examples": max_examples, "tokenizer": tokenizer,
            "text_column": text_column, "label_column": label_column, "max_length": max_length}


class ModelPass:
    """One pass of `model` over `data` for `what` (the public function's name, used in messages).

    Joining the world checks the ranks at once (before the caller attaches anything); ``run`` then feeds a job.
    `settings` are the caller's settings that every rank must share (the batch options are added)."""

    def __init__(self, what: str, model, data, *, options: dict, progress: bool = True,
                 distributed: Optional[bool] = None, settings: Optional[dict] = None):
        self.what, self.model, self.data, self.options, self.progress = what, model, data, options, progress
        self.world = shards.world(distributed)
        shared = {k: v for k, v in options.items() if k != "tokenizer"}
        shards.check_same(self.world, what, model, data, **shared, **(settings or {}))

    @property
    def writes(self) -> bool:
        """Whether this process is the one that writes and prints (rank 0, or a single process)."""
        return self.world is None or self.world.rank == 0

    def run(self, job: PassJob, *, start: int = 0, done: int = 0, device=None) -> int:
        """Runs `job` over every batch from example `start` on (this rank's share), all-reduces its totals and
        returns the number of examples of the whole pass over all ranks, `done` (examples this rank had
        already finished in an earlier, resumed run) included. Raises ValueError when that number is zero."""
        stream = hf.batches(self.data, start=start, shard=self.world, **self.options)
        seen = 0
        with job.attached(), tqdm(total=self._total(), initial=done, unit="ex", desc=job.description,
                                  disable=not self.progress or not self.writes) as bar:
            for indices, batch in stream:
                job.step(indices, batch)
                seen += len(indices)
                bar.update(len(indices))
        for total in job.totals():
            shards.all_reduce_sum_(total, self.world)
        examples = shards.all_reduce_count(done + seen, self.world, device)
        if examples == 0:
            raise ValueError(f"{self.what}: the data hold no examples (after max_examples="
                             f"{self.options['max_examples']}); there is nothing to compute")
        return examples

    def _total(self) -> Optional[int]:
        """Examples this process will see (for the progress bar): its share of the batches under a world."""
        data, limit, size = self.data, self.options["max_examples"], self.options["batch_size"]
        if not hf._is_dataset(data):
            return limit if self.world is None else None
        total = len(data) if limit is None else min(len(data), limit)
        if self.world is None:
            return total
        return sum(min(size, total - first) for first in range(0, total, size) if self.world.owns(first // size))
