"""One rank of the distributed tests (tests/test_distributed.py starts one process per rank):

    python distributed_worker.py RANK WORLD_SIZE PORT JOB OUT_DIR

Joins a gloo process group on 127.0.0.1, runs JOB on a tiny BERT with the same batches on every rank, and saves
what it computed under OUT_DIR (one file per rank). Exits with 3 and the message on stderr on a ValueError."""

from __future__ import annotations

import datetime
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decomp  # noqa: E402
from decomp.gradients.engine import ModelPass, PassJob, batch_options  # noqa: E402
from models import padded_batch, tiny  # noqa: E402

# Five batches: rank 0 of 2 takes batches 0, 2, 4 and rank 1 takes 1, 3 (odd sizes, padding everywhere).
BATCHES = [[5, 3, 4], [7, 1, 2], [2, 6, 6], [4, 4, 1], [3, 3, 3]]
SKETCH = {"k_out": 4, "k_in": 4, "k_vector": 64, "progress": False}


def batches(die_at: int | None = None):
    for number, lengths in enumerate(BATCHES):
        if number == die_at:
            os.kill(os.getpid(), signal.SIGKILL)   # a rank lost mid-run, after its earlier batches were committed
        yield padded_batch("bert", lengths, seed=number)


class TokenCount(PassJob):
    """A consumer written outside decomp: real tokens per example and their id sums, through the one engine."""

    description = "tokens"

    def __init__(self):
        self.sums = torch.zeros(2, dtype=torch.float64)
        self.rows = []

    def step(self, indices, batch):
        mask = batch["attention_mask"].double()
        self.sums += torch.stack([mask.sum(), (batch["input_ids"].double() * mask).sum()])
        self.rows.append(indices)

    def totals(self):
        return [self.sums]


def count_tokens(model, data) -> dict:
    run = ModelPass("count_tokens", model, data, options=batch_options(), progress=False)
    job = TokenCount()
    examples = run.run(job)
    return {"examples": examples, "sums": job.sums, "rows": torch.cat(job.rows)}


def run(rank: int, job: str, out: Path) -> None:
    model = tiny("bert", seed=1 if job in ("mismatch-model", "mismatch-grams") and rank == 1 else 0)
    if job in ("fisher", "mismatch-model"):
        fisher = decomp.compute_fisher(model, list(batches()), kind="exact", progress=False)
        torch.save(dict(fisher), out / f"fisher-{rank}.pt")
    elif job in ("sketch", "die", "mismatch-seed"):
        seed = rank if job == "mismatch-seed" else 0
        sketch = decomp.sketch_gradients(model, batches(die_at=3 if job == "die" and rank == 1 else None),
                                         store=out / "store", seed=seed, **SKETCH)
        torch.save({"features": sketch.features.clone(), "indices": sketch.indices.clone()}, out / f"sketch-{rank}.pt")
    elif job == "grams":
        torch.save(decomp.collect_grams(model, list(batches()), progress=False), out / f"grams-{rank}.pt")
    elif job == "mismatch-grams":
        try:
            decomp.collect_grams(model, list(batches()), progress=False)
        finally:   # the refusal leaves the model as it was: no hook attached
            assert not any(m._forward_hooks for m in model.modules()), "collect_grams left hooks on the model"
    elif job == "custom":
        torch.save(count_tokens(model, list(batches())), out / f"custom-{rank}.pt")
    elif job == "directions":
        components = decomp.Components.load(out / "components.safetensors")
        directions = components.parameter_directions(model, list(batches()), progress=False)
        torch.save(directions, out / f"directions-{rank}.pt")
    else:
        raise SystemExit(f"unknown job {job!r}")


def main() -> int:
    rank, world_size, port, job, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        run(rank, job, Path(out))
    except ValueError as error:
        print(f"rank {rank}: {error}", file=sys.stderr)
        return 3
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
