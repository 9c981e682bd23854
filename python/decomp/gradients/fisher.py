"""The diagonal Fisher of a model over a dataset: decomp.compute_fisher and decomp.Fisher.

F = (1/N) sum_n E_y[(grad log p(y | x_n))^2], always the square of a *per-example* gradient (squaring a
batch-summed gradient is a different, wrong quantity). Linear and embedding layers go through the fused native
kernels (decomp.ops.fisher_linear, fisher_embedding), which never form per-example gradients.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

from ..kernels import ops, validation
from ..kernels.ops import masked_rows
from .engine import GradientJob, ModelPass, batch_options
from .outputs import FISHER_KINDS, fisher_terms
from .rules import Contribution
from .writing import check_target, write_file

FORMAT = "decomp.fisher/1"


class Fisher(Mapping):
    """Parameter name (as in ``model.named_parameters()``) -> diagonal Fisher tensor (float32, the parameter's
    shape), the **mean** over examples. ``.kind``, ``.num_examples``, ``.model``, ``.coverage`` describe it."""

    def __init__(self, tensors: Mapping[str, Tensor], *, kind: str, num_examples: int, model: str = "",
                 coverage: Optional[Mapping[str, str]] = None, extra: Optional[Mapping] = None):
        self._tensors = dict(tensors)
        self.kind = kind
        self.num_examples = int(num_examples)
        self.model = model
        self.coverage = dict(coverage or {})
        self.extra = dict(extra or {})

    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        total = sum(t.numel() for t in self._tensors.values())
        return (f"Fisher(kind={self.kind!r}, num_examples={self.num_examples}, model={self.model!r}, "
                f"{len(self)} tensors, {total:,} entries)")

    def metadata(self) -> dict:
        return {"format": FORMAT, "kind": self.kind, "num_examples": self.num_examples, "model": self.model,
                "coverage": self.coverage, **self.extra}

    def save(self, path, *, overwrite: bool = False) -> Path:
        """Writes a safetensors file (metadata: kind, num_examples, model, coverage) atomically: into a hidden
        temporary sibling, then renamed, so a failed or killed save leaves `path` as it was (gradients/writing.py).
        An existing `path` is replaced only with overwrite=True and only if it holds a decomp Fisher; anything else
        there (a link included) is never touched."""
        from safetensors.torch import save_file
        path = check_target(path, overwrite=overwrite, ours=_is_fisher_file, what="a decomp Fisher file",
                            writer="Fisher.save")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in self._tensors.items()}
        metadata = {"format": "pt", "decomp": json.dumps(self.metadata())}
        return write_file(path, lambda partial: save_file(tensors, partial, metadata=metadata), what="the Fisher",
                          kill="fisher", wrap=Exception)

    @classmethod
    def load(cls, path, device=None) -> "Fisher":
        """Reads a file written by Fisher.save. Every tensor is checked: a file that is not safetensors, is
        truncated, lacks decomp's metadata, or holds a non-finite or negative entry is a ValueError naming the path
        (and the tensor)."""
        meta, tensors = _read_fisher_file(path)
        if device is not None:
            tensors = {name: t.to(device) for name, t in tensors.items()}
        known = ("format", "kind", "num_examples", "model", "coverage")
        return cls(tensors, kind=meta["kind"], num_examples=meta["num_examples"], model=meta.get("model", ""),
                   coverage=meta.get("coverage"), extra={k: v for k, v in meta.items() if k not in known})


def _read_fisher_file(path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open
    if not Path(path).is_file():
        raise FileNotFoundError(f"Fisher file {str(path)!r} does not exist (or is not a file)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw = (handle.metadata() or {}).get("decomp")
            if raw is None:
                raise ValueError(f"{path} is a safetensors file without decomp's Fisher metadata")
            meta = json.loads(raw)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a readable Fisher file (a safetensors file written by Fisher.save): "
                         f"{error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} holds {meta.get('format') if isinstance(meta, dict) else meta!r}, expected "
                         f"{FORMAT!r}")
    for key in ("kind", "num_examples"):
        if key not in meta:
            raise ValueError(f"{path}: the Fisher metadata lack {key!r}")
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{path}: tensor {name!r} is {t.dtype}, not floating point; not a Fisher")
        bad = ~(torch.isfinite(t) & (t >= 0))
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{path}: tensor {name!r} has entry {float(t[where])} at {list(where)}; a Fisher is "
                             f"finite and >= 0")
    return meta, tensors


def _is_fisher_file(path: Path) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw = (handle.metadata() or {}).get("decomp")
        return raw is not None and json.loads(raw).get("format") == FORMAT
    except Exception:
        return False


class FisherJob(GradientJob):
    """Sums of squared per-example gradients, float32, in the parameters' shapes."""

    def __init__(self, model, kind: str, seed: int):
        super().__init__(model)
        self.description = f"Fisher ({kind})"
        self.kind, self.seed = kind, seed
        self.uses_labels = kind == "empirical"
        self.sums = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                     for name, p in self.params.items()}

    def step(self, indices: Tensor, batch: dict) -> None:
        super().step(indices, batch)
        # the squared gradients of a batch (not only its outputs) are finite, or the error names the batch's examples.
        # The sums never hold a negative entry, so the largest is finite exactly when all are (amax propagates NaN):
        # one read of each sum, where isfinite(...).all() wrote a bool per entry (60x slower; 7% of a MiniLM pass)
        largest = [s.amax() for s in self.sums.values() if s.numel()]
        if largest and not bool(torch.stack(largest).isfinite().all()):
            name = next(name for name, s in self.sums.items() if not bool(torch.isfinite(s).all()))
            raise FloatingPointError(f"the squared gradients of {name!r} are not finite after the batch of examples "
                                     f"{int(indices[0])}..{int(indices[-1])} (an overflow in the backward pass?): "
                                     f"no Fisher is returned")

    def terms(self, logits, batch, indices):
        return fisher_terms(self.capture.task, logits, batch, indices, kind=self.kind, seed=self.seed)

    def totals(self):
        return self.sums.values()

    def matrix(self, name: str, contributions: list[Contribution]) -> None:
        out = self.sums[name]
        outer = [c for c in contributions if c.kind == "outer"]
        looked_up = [c for c in contributions if c.kind != "outer"]
        if len(outer) == 1:
            left, right = outer[0].left, outer[0].right
            if left.dtype != right.dtype:
                left, right = left.float(), right.float()
            lengths = outer[0].lengths
        elif outer:
            # several products of one parameter: their sum is one longer sequence of outer products
            left = torch.cat([masked_rows(c.left.float(), c.lengths) for c in outer], 1)
            right = torch.cat([masked_rows(c.right.float(), c.lengths) for c in outer], 1)
            lengths = None
        if not looked_up:
            ops.fisher_linear(right, left, lengths=lengths, out=out)
            return
        # the looked-up rows of every use, padding zeroed (its ids set to row 0, which then gains nothing)
        ids = torch.cat([masked_rows(c.left, c.lengths) for c in looked_up], 1)
        rows = torch.cat([masked_rows(c.right.float(), c.lengths) for c in looked_up], 1)
        if not outer:
            ops.fisher_embedding(ids, rows, out.shape[0], out=out)
            return
        # tied (an LM's input embedding and its output head): the head's squares by the fused kernel, then, on the
        # few rows each example looks up, the cross term and the lookups' own squares, (W + E)^2 - W^2 = E (2W + E).
        # Never a one-hot [N, T, V] (it doubled the head's GEMM and its memory)
        ops.fisher_linear(right, left, lengths=lengths, out=out)
        valid = [left.shape[1]] * left.shape[0] if lengths is None else lengths.tolist()
        for n, length in enumerate(valid):
            touched, position = torch.unique(ids[n], return_inverse=True)
            looked = torch.zeros(len(touched), rows.shape[2], dtype=torch.float32, device=out.device)
            looked.index_add_(0, position, rows[n])
            head = left[n, :length][:, touched].float().T @ right[n, :length].float()   # W's touched rows
            out.index_add_(0, touched, looked * (2 * head + looked))

    def vector(self, name: str, g: Tensor) -> None:
        self.sums[name] += g.float().square().sum(0).reshape(self.sums[name].shape)

    def fallback(self, name: str, row: int, g: Tensor) -> None:
        self.sums[name] += g.float().square()


def compute_fisher(model, data, *, kind: str = "exact", batch_size: int = 32, max_examples: Optional[int] = None,
                   progress: bool = True, tokenizer=None, text_column: Optional[str] = None,
                   label_column: Optional[str] = None, max_length: Optional[int] = None, seed: int = 0,
                   distributed: Optional[bool] = None) -> Fisher:
    """The diagonal Fisher of every trainable parameter of `model`, averaged over the examples of `data`.

    kind: "exact" (classification: the expectation over classes under the model, exactly, with C - 1 backward
    passes per batch), "sampled" (one label drawn from the model per example, per token for language models;
    seeded by `seed` and the example's index) or "empirical" (the gold labels).
    data: a datasets.Dataset (tokenized, or with `text_column` and a `tokenizer`) or an iterable of batch dicts
    with input_ids, attention_mask and (for empirical) labels. Padded batches give the per-example results of
    unpadded examples. Returns a decomp.Fisher (float32, the mean over examples).

    distributed: under torch.distributed (an initialised process group, or True to require one) each rank takes
    its share of the batches (see decomp.distributed); the float32 sums and the example count are all-reduced, one
    tensor at a time in float64, and every rank returns the same Fisher."""
    validation.choice("kind", kind, FISHER_KINDS)
    validation.seed(seed)
    options = batch_options(batch_size=batch_size, max_examples=max_examples, tokenizer=tokenizer,
                            text_column=text_column, label_column=label_column, max_length=max_length)
    run = ModelPass("compute_fisher", model, data, options=options, progress=progress, distributed=distributed,
                    settings={"kind": kind, "seed": seed})
    job = FisherJob(model, kind, seed)
    examples = run.run(job, device=job.capture.device)
    return Fisher({name: total / examples for name, total in job.sums.items()}, kind=kind, num_examples=examples,
                  model=model_name(model), coverage=job.capture.coverage(),
                  extra={"seed": seed} if kind == "sampled" else None)


def model_name(model) -> str:
    return str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
