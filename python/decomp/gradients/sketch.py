"""Sketched per-example gradients: decomp.sketch_gradients and decomp.GradientSketch.

Each example's gradient g_n (every trainable parameter) becomes a feature vector z_n with
E[<z_n, z_m>] = <g_n, g_m>, built block by block, each block a pure function of (seed, parameter name):

  kron    matrices with both sides >= 4x the sketch sides (Linear, Conv1D, embeddings): vec(S_a g S_b^T),
          k_out x k_in entries, from the layer factors (for embeddings only the rows of the ids are touched);
  vector  everything else (biases, norms, small heads, fallback parameters): their flattened gradients,
          concatenated, through one dense JL sketch of k_vector rows;
  then optionally a second dense sketch of the whole vector down to k entries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .. import distributed as shards
from ..kernels import ops, validation
from ..kernels.hashing import STREAM_DERIVE, STREAM_KRON_IN, STREAM_KRON_OUT, hash32, name_hash
from .engine import GradientJob, ModelPass, batch_options
from .fisher import model_name
from .outputs import OUTPUTS, terms as output_terms
from .rules import Contribution, materialize
from .store import (RowStore, committed_rows, data_digest, read_columns, read_meta, verify_rows,
                    weights_fingerprint)
from .writing import check_target, write_folder

KRON_MIN_RATIO = 4  # a side shorter than 4 x its sketch side goes to the dense vector block instead


def derived_seed(seed: int, name: str) -> int:
    """A seed for one block, a pure function of (seed, block name)."""
    return int(hash32(seed, STREAM_DERIVE, torch.tensor(name_hash(name)), torch.tensor(0)))


def sketch_layout(params: dict, *, seed: int, k_out: int, k_in: int, k_vector: int) -> list[dict]:
    """The feature blocks, in named_parameters order: kron blocks first, then the vector block."""
    blocks, start, offset = [], 0, 0
    vector_members = []
    for name, p in params.items():
        if p.dim() == 2 and p.shape[0] >= KRON_MIN_RATIO * k_out and p.shape[1] >= KRON_MIN_RATIO * k_in:
            blocks.append({"name": name, "kind": "kron", "start": start, "size": k_out * k_in,
                           "shape": list(p.shape), "k_out": k_out, "k_in": k_in, "seed": derived_seed(seed, name)})
            start += k_out * k_in
        else:
            vector_members.append({"name": name, "offset": offset, "shape": list(p.shape)})
            offset += p.numel()
    if vector_members:
        blocks.append({"name": "vector", "kind": "vector", "start": start, "size": k_vector, "members": vector_members,
                       "numel": offset, "seed": derived_seed(seed, "vector")})
    return blocks


class SketchJob(GradientJob):
    """The sketch rows of every batch: kron blocks from the layer factors, the rest gathered flat and sketched
    densely; rows go to the store (committed batch by batch) or are kept in memory."""

    description = "Sketching gradients"

    def __init__(self, model, blocks: list[dict], config: dict, writer: Optional[RowStore]):
        super().__init__(model)
        self.config, self.writer, self.parts = config, writer, []
        self.uses_labels = config["output"] in ("logprob", "loss")
        # resuming or reusing a store: the committed examples' inputs are re-hashed (no model run) and compared
        self.digest, self.hashed = 0, 0
        self.checked = writer is None or (writer.next_example == 0 and not writer.meta["complete"])
        self.kron = {b["name"]: b for b in blocks if b["kind"] == "kron"}
        self.vector_block = next((b for b in blocks if b["kind"] == "vector"), None)
        self.members = {m["name"]: m for m in self.vector_block["members"]} if self.vector_block else {}
        self.dim = sum(b["size"] for b in blocks)
        device = self.capture.device
        self.projections = {}
        for name, b in self.kron.items():
            rows, cols = b["shape"]
            self.projections[name] = (
                ops.projection_matrix(b["k_out"], rows, seed=b["seed"], stream=STREAM_KRON_OUT, device=device),
                ops.projection_matrix(b["k_in"], cols, seed=b["seed"], stream=STREAM_KRON_IN, device=device))
        self.predictions: Optional[Tensor] = None
        self._indices: Optional[Tensor] = None

    def terms(self, logits, batch, indices):
        if self.capture.task == "classification" and indices is self._indices:  # the batch's pass, not the audit's
            self.predictions = logits.detach().argmax(-1)
        config = self.config
        return output_terms(self.capture.task, logits, batch, indices, output=config["output"], seed=config["seed"],
                            target=config["target"])

    def check_data(self, more: bool = False) -> None:
        """Checks the data's committed prefix against the store (once, before any new row is computed)."""
        if not self.checked:
            self.writer.check_data(self.digest, self.hashed, more)
            self.checked = True

    def step(self, indices: Tensor, batch: dict) -> None:
        N, device = len(indices), self.capture.device
        if not self.checked:
            first, resume = int(indices[0]), self.writer.next_example
            if first < resume:   # committed already: only hashed, to check that these are the same data
                if first + N > resume:
                    raise ValueError(f"cannot resume store {self.writer.root} at example {resume}: it falls inside "
                                     f"a batch ({first}..{first + N}); resume with the batches of the interrupted run")
                if self.config.get("world_size", 1) > 1:   # one writer's rows were all checked when it opened
                    verify_rows(self.writer.root, self.writer.meta["dim"], range(first, first + N))
                self.digest, self.hashed = data_digest(indices, batch, self.digest), self.hashed + N
                return
            self.check_data(more=True)
        self._indices, self.predictions = indices, None
        self.z = torch.zeros(N, self.dim, dtype=torch.float32, device=device)
        self.flat = torch.zeros(N, self.vector_block["numel"] if self.vector_block else 0, dtype=torch.float32,
                                device=device)
        super().step(indices, batch)
        features = self._finish()
        if self.config["k"] is not None:
            features = ops.sketch_dense(features, k=self.config["k"], seed=derived_seed(self.config["seed"],
                                                                                        "second stage"))
        bad = ~torch.isfinite(features).all(1)
        if bool(bad.any()):
            raise FloatingPointError(f"the sketched gradient of example {int(indices[bad.nonzero()[0, 0].cpu()])} is "
                                     f"not finite (an overflow in the backward pass?); nothing was written for its "
                                     f"batch")
        labels = batch.get("labels") if self.capture.task == "classification" else None
        if self.writer is not None:
            self.digest = data_digest(indices, batch, self.writer.progress["data"] or 0)
            self.writer.write(int(indices[0]), features, indices, labels, self.predictions,   # row = example index
                              data=self.digest)
        else:
            self.parts.append((features.cpu(), indices, None if labels is None else labels.cpu(),
                               None if self.predictions is None else self.predictions.cpu()))

    def _block(self, name: str) -> Tensor:
        b = self.kron[name]
        return self.z[:, b["start"]:b["start"] + b["size"]]

    def _flat(self, name: str) -> Tensor:
        m = self.members[name]
        return self.flat[:, m["offset"]:m["offset"] + self.params[name].numel()]

    def matrix(self, name: str, contributions: list[Contribution]) -> None:
        if name not in self.kron:
            shape = self.params[name].shape
            self._flat(name).add_(sum(materialize(c, shape) for c in contributions).reshape(self.z.shape[0], -1))
            return
        S_rows, S_cols = self.projections[name]
        block = self._block(name)
        for c in contributions:
            if c.kind == "outer":
                ops.kronecker_from_projections(c.right, c.left, S_rows, S_cols, c.lengths, out=block)
            else:  # the one-hot side projects to the columns of S_rows at the ids
                projected_left = ops.masked_rows(S_rows.T[c.left], c.lengths)               # [N, T, k_out]
                projected_right = c.right.to(S_cols.dtype) @ S_cols.T                      # [N, T, k_in]
                block += torch.bmm(projected_left.transpose(1, 2), projected_right).reshape(block.shape)

    def vector(self, name: str, g: Tensor) -> None:
        self._flat(name).add_(g.reshape(g.shape[0], -1))

    def fallback(self, name: str, row: int, g: Tensor) -> None:
        if name in self.kron:
            S_rows, S_cols = self.projections[name]
            self._block(name)[row] += (S_rows @ g.float() @ S_cols.T).reshape(-1)
        else:
            self._flat(name)[row] += g.float().reshape(-1)

    def _finish(self) -> Tensor:
        if self.vector_block is not None and self.flat.shape[0]:
            b = self.vector_block
            self.z[:, b["start"]:b["start"] + b["size"]] = ops.sketch_dense(self.flat, k=b["size"], seed=b["seed"])
        return self.z


def _open_store(store, config, dim, blocks, shard, weights: str) -> RowStore:
    """Rank 0 creates or checks the store before the other ranks open it."""
    if shard is None:
        return RowStore(store, config, dim, blocks, weights=weights)
    writer = RowStore(store, config, dim, blocks, rank=0, weights=weights) if shard.rank == 0 else None
    shards.barrier(shard)
    return writer or RowStore(store, config, dim, blocks, rank=shard.rank, weights=weights)


class GradientSketch:
    """Sketched per-example gradients: ``features`` [N, K] float32 (memory-mapped when read from a store),
    ``indices`` [N] (position of each example in the data), ``labels`` [N] and ``predictions`` [N] (the model's
    argmax; classification only, else None), ``blocks`` (the layout) and ``config``."""

    def __init__(self, features: Tensor, indices: Tensor, labels: Optional[Tensor], predictions: Optional[Tensor],
                 blocks: list, config: dict, coverage: Optional[dict] = None, path: Optional[Path] = None,
                 example_scale: Optional[Tensor] = None):
        self.features, self.indices, self.labels, self.predictions = features, indices, labels, predictions
        self.blocks, self.config, self.coverage, self.path = blocks, config, dict(coverage or {}), path
        self.example_scale = example_scale   # [N] per-row factor applied by decomp.prepare, else None

    def __len__(self) -> int:
        return self.features.shape[0]

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return (f"GradientSketch({len(self)} examples x {self.features.shape[1]} features, "
                f"output={self.config.get('output')!r}, seed={self.config.get('seed')}{where})")

    def save(self, path, *, overwrite: bool = False) -> Path:
        """Writes the sketch as a store directory, atomically: into a hidden temporary sibling, then renamed, so a
        failed or killed save leaves `path` as it was (gradients/writing.py). An existing `path` is replaced only
        with overwrite=True and only if it is a decomp sketch store; anything else there (a link included) is never
        touched."""
        path = Path(path)
        if self.path is not None and path.exists() and path.resolve() == Path(self.path).resolve():
            return path
        _check_target(path, overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)

        def fill(partial: Path) -> None:
            store = RowStore(partial, self.config, self.features.shape[1], self.blocks)
            store.write(0, self.features, self.indices, self.labels, self.predictions)
            store.finish(len(self), {"coverage": self.coverage})
        return write_folder(path, fill, recheck=lambda target: _check_target(target, overwrite))

    @classmethod
    def load(cls, path) -> "GradientSketch":
        meta, columns = read_columns(path)
        if not meta.get("complete"):
            raise ValueError(f"{path} holds an unfinished run ({committed_rows(path)} rows so far): call "
                             f"sketch_gradients with store={str(path)!r} to resume it")
        return cls._from(meta, columns, Path(path))

    @classmethod
    def _from(cls, meta, columns, path) -> "GradientSketch":
        def known(t):
            return None if t.numel() == 0 or bool((t == -1).all()) else t
        return cls(columns["features"], columns["indices"], known(columns["labels"]), known(columns["predictions"]),
                   meta["blocks"], meta["config"], meta.get("coverage"), path)


def _check_class(name: str, value, model) -> None:
    """None, or a class index of the model's classifier."""
    classes = getattr(getattr(model, "config", None), "num_labels", None)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0
                              or (classes and value >= classes)):
        raise ValueError(f"{name} must be a class index in [0, num_labels={classes}); got {value!r}")


def _is_store(path: Path) -> bool:
    try:
        return path.is_dir() and read_meta(path) is not None
    except ValueError:
        return False


def _check_target(path: Path, overwrite: bool) -> Path:
    return check_target(path, overwrite=overwrite, ours=_is_store, what="a decomp sketch store",
                        writer="GradientSketch.save", folder=True)


def _settings(model, *, output, seed, k_out, k_in, k_vector, k, batch_size, target, max_length):
    """(config, blocks): the sketch's settings, checked, as the store records them, and its feature layout."""
    validation.choice("output", output, OUTPUTS)
    validation.seed(seed)
    for name, value in (("k_out", k_out), ("k_in", k_in), ("k_vector", k_vector), ("k", k)):
        if value is not None:
            validation.positive_int(name, value)
    _check_class("target", target, model)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    blocks = sketch_layout(params, seed=seed, k_out=k_out, k_in=k_in, k_vector=k_vector)
    config = {"model": model_name(model), "parameters": sum(p.numel() for p in params.values()), "output": output,
              "seed": seed, "k_out": k_out, "k_in": k_in, "k_vector": k_vector, "k": k, "batch_size": batch_size,
              "target": target, "max_length": max_length}
    return config, blocks


def sketch_gradients(model, data, *, seed: int = 0, store=None, output: str = "logprob", k_out: int = 8,
                     k_in: int = 8, k_vector: int = 512, k: Optional[int] = None, batch_size: int = 32,
                     max_examples: Optional[int] = None, progress: bool = True, tokenizer=None,
                     text_column: Optional[str] = None, label_column: Optional[str] = None,
                     max_length: Optional[int] = None, target: Optional[int] = None,
                     distributed: Optional[bool] = None) -> GradientSketch:
    """Sketches of every example's gradient of `output` (see decomp.gradients.outputs) w.r.t. every trainable
    parameter.

    Defaults give MiniLM about 3,000 features: k_out x k_in = 8 x 8 per matrix, k_vector = 512 for the rest;
    `k` adds a second dense sketch of the whole down to k. `seed` fixes every projection (and the draws of
    output='sampled'). With `store` (a directory) rows are committed batch by batch: calling again after a kill
    resumes and gives bit-identical features. The store records every setting, a fingerprint of the weights and a
    running digest of the inputs as batched (token ids, masks, labels; the committed batches are re-read, not
    recomputed, to compare them) and a checksum per row: resuming or reusing it with other settings, weights or
    data is refused naming what differs, and a damaged store is refused naming its first bad row.

    distributed: under torch.distributed (an initialised process group, or True to require one) every rank
    sketches its share of the batches (see decomp.distributed) into its rows of the one `store`, which is then
    required: the store reads as one [N, K] matrix in example order, bit-identical to a single process's, and each
    rank resumes on its own. Every rank returns the finished sketch, read from the store."""
    options = batch_options(batch_size=batch_size, max_examples=max_examples, tokenizer=tokenizer,
                            text_column=text_column, label_column=label_column, max_length=max_length)
    config, blocks = _settings(model, output=output, seed=seed, k_out=k_out, k_in=k_in, k_vector=k_vector, k=k,
                               batch_size=batch_size, target=target, max_length=max_length)
    world = shards.world(distributed)
    if world is not None:
        if store is None:
            raise ValueError("sketch_gradients under torch.distributed needs store= (a directory every rank can "
                             "write): each rank writes its rows there instead of gathering them in one process")
        config["world_size"] = world.size
    run = ModelPass("sketch_gradients", model, data, options=options, progress=progress, distributed=distributed,
                    settings={"config": config, "store": str(Path(store).resolve()) if store is not None else None})
    dim = k if k is not None else sum(b["size"] for b in blocks)
    writer = None
    if store is not None:
        writer = _open_store(store, config, dim, blocks, run.world, weights_fingerprint(model))
    job = SketchJob(model, blocks, config, writer)
    # from example 0 even when resuming: the committed batches are re-read (not recomputed) to check the data
    rows = run.run(job, device=job.capture.device)
    if writer is None:
        def column(i):
            return None if job.parts[0][i] is None else torch.cat([p[i] for p in job.parts])
        return GradientSketch(column(0), column(1), column(2), column(3), blocks, config, job.capture.coverage())
    job.check_data()
    if run.writes and not writer.meta["complete"]:
        writer.finish(rows, {"coverage": job.capture.coverage()})
    shards.barrier(run.world)
    return GradientSketch.load(store)
