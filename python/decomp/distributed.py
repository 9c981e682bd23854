"""Running compute_fisher, sketch_gradients, collect_grams and parameter_directions on torch.distributed.

The data are split by whole batches: global batch b (the same batches a single process would form) goes to rank
b mod world_size. Each batch is therefore computed exactly as in a single process, so sketch rows are
bit-identical; sums over examples (Fisher, Grams, parameter directions) are all-reduced one tensor at a time in
float64 (never a second copy of the whole model in memory) and differ from one process's float32 running sum only
by the order of additions. Before any heavy work every rank checks that all ranks hold the same model weights,
settings and data, and fails with an error naming what differs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class World:
    rank: int
    size: int

    def owns(self, batch_number: int) -> bool:
        return batch_number % self.size == self.rank


def world(distributed: Optional[bool] = None) -> Optional[World]:
    """The process group to shard over, or None for a single process.

    distributed=None uses an initialised default process group with more than one rank; True requires one
    (an error otherwise); False ignores it (every rank computes everything)."""
    import torch.distributed as dist
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is False:
        return None
    if distributed and not initialised:
        raise ValueError("distributed=True needs an initialised torch.distributed process group (run under torchrun, "
                         "or call torch.distributed.init_process_group first)")
    if not initialised or dist.get_world_size() == 1 and distributed is None:
        return None
    return World(dist.get_rank(), dist.get_world_size())


def init_from_environment() -> bool:
    """Initialises the default process group when launched by torchrun (WORLD_SIZE > 1 in the environment): NCCL
    when CUDA is available, gloo otherwise. Returns whether it did."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # torch.distributed.nn's functions take `group=group.WORLD` as a default, evaluated when it is imported (by
    # transformers, when a model loads). Imported after the group exists, it would keep the group alive past
    # destroy_process_group, until the interpreter's teardown; gloo's worker threads, still releasing the last
    # collective's tensors, then find no GIL to take and abort the process (SIGABRT after a successful run).
    importlib.import_module("torch.distributed.nn")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def model_fingerprint(model) -> str:
    """A hash of every parameter's and buffer's name, shape, dtype and bytes (gradients.store.weights_fingerprint:
    streamed, a chunk at a time), and of which parameters are frozen: two checkpoints of one architecture with
    other weights differ, even where their sums agree."""
    from .gradients.store import weights_fingerprint
    frozen = [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
    if not frozen:
        return weights_fingerprint(model)
    return f"{weights_fingerprint(model)}, frozen {hashlib.sha256(';'.join(frozen).encode()).hexdigest()[:8]}"


def data_fingerprint(data) -> Optional[str]:
    """len and content fingerprint of a datasets.Dataset; None for iterables (they cannot be compared cheaply)."""
    from .gradients.hf import _is_dataset
    if not _is_dataset(data):
        return None
    return f"{len(data)} rows, fingerprint {getattr(data, '_fingerprint', '?')}"


def gather_objects(world: World, value) -> list:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    import torch.distributed as dist
    everyone: list = [None] * world.size
    dist.all_gather_object(everyone, value)
    return everyone


def check_same(world: Optional[World], what: str, model, data, **settings) -> None:
    """Raises ValueError on every rank if any rank's model weights, data or `settings` differ from rank 0's,
    naming the keys and ranks. A single process (world None) checks nothing and reads no weights."""
    if world is None:
        return
    values = {"model": model_fingerprint(model), "data": data_fingerprint(data), **settings}
    everyone = gather_objects(world, json.loads(json.dumps(values, default=str, sort_keys=True)))
    differences = []
    for rank, theirs in enumerate(everyone[1:], start=1):
        for key in sorted(set(theirs) | set(everyone[0])):
            if theirs.get(key) != everyone[0].get(key):
                differences.append(f"{key} on rank {rank} is {theirs.get(key)!r}, on rank 0 {everyone[0].get(key)!r}")
    if differences:
        raise ValueError(f"{what}: the ranks disagree before any work was done; every rank must run the same "
                         f"model, data and settings: " + "; ".join(differences[:4]))


def all_reduce_sum_(tensor: Tensor, world: Optional[World]) -> Tensor:
    """Sums `tensor` over the ranks in place, the additions in float64."""
    if world is None:
        return tensor
    import torch.distributed as dist
    wide = tensor.double()
    dist.all_reduce(wide)
    tensor.copy_(wide)
    return tensor


def all_reduce_count(count: int, world: Optional[World], device=None) -> int:
    if world is None:
        return count
    import torch.distributed as dist
    total = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def barrier(world: Optional[World]) -> None:
    if world is not None:
        import torch.distributed as dist
        dist.barrier()
