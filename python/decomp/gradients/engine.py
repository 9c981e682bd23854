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
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterable, Optional, Protocol

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

    def __init__(self, model):
        self.capture = GradientCapture(model)

    @property
    def params(self) -> dict:
        return self.capture.params

    def attached(self) -> ContextManager:
        return self.capture.attached()

    def step(self, indices: Tensor, batch: dict) -> None:
        self.capture.run(batch, indices, self.terms, self)

    def terms(self, logits: Tensor, batch: dict, indices: Tensor) -> list[Tensor]:
        """The scalar outputs [N] whose per-example gradients this job takes (see decomp.gradients.outputs)."""
        raise NotImplementedError


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
