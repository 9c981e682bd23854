"""Scaling out on one machine: one process with 2 threads against 2 processes with 1 thread each (gloo on
127.0.0.1, each rank sharding the batches), for compute_fisher (exact) and sketch_gradients on all-MiniLM-L6-v2
as a 2-class classifier over Rotten Tomatoes snippets in batches of 32 x 48 tokens (as benchmarks/pipeline.py).
Each configuration runs in fresh processes, with a warm-up call (the first-batch audit) before the timed one;
configurations are interleaved over the repeats and the median is reported. Examples/s counts every example once.

    python benchmarks/distributed.py [--batches 8] [--repeats 3]

Writes benchmarks/results/distributed_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONFIGURATIONS = {"1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}
TASKS = ("compute_fisher", "sketch_gradients")


def worker(rank: int, world: int, threads: int, port: int, task: str, batches: int, out: str) -> None:
    import torch.distributed as dist

    import decomp
    from pipeline import load
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
    make_model, data = load(32, batches, 48)
    torch.manual_seed(0)   # the fresh classifier head must be the same on every rank (decomp checks that it is)
    model = make_model().eval()
    store = Path(out) / "store"

    def call(data, store_dir):
        if task == "compute_fisher":
            return decomp.compute_fisher(model, data, kind="exact", progress=False)
        return decomp.sketch_gradients(model, data, store=store_dir, progress=False)

    call(data[:world], Path(out) / "warm-up")   # the first-batch audit and allocator warm-up, untimed
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    call(data, store)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        (Path(out) / "seconds").write_text(str(time.perf_counter() - start))


def run_configuration(world: int, threads: int, task: str, batches: int) -> float:
    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        processes = [subprocess.Popen([sys.executable, __file__, "--worker", str(rank), str(world), str(threads),
                                       str(port), task, str(batches), out], env=env) for rank in range(world)]
        for process in processes:
            if process.wait(timeout=1800) != 0:
                raise RuntimeError(f"{task} with {world} processes failed")
        return float((Path(out) / "seconds").read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        rank, world, threads, port, task, batches, out = args.worker
        return worker(int(rank), int(world), int(threads), int(port), task, int(batches), out)

    examples = 32 * args.batches
    samples = {(task, name): [] for task in TASKS for name in CONFIGURATIONS}
    for _ in range(args.repeats):
        for task in TASKS:
            for name, (world, threads) in CONFIGURATIONS.items():
                samples[task, name].append(run_configuration(world, threads, task, args.batches))
                print(f"{task} {name}: {samples[task, name][-1]:.2f} s", flush=True)
    rows = []
    for task in TASKS:
        base = statistics.median(samples[task, "1 process x 2 threads"])
        for name in CONFIGURATIONS:
            seconds = statistics.median(samples[task, name])
            rows.append({"task": task, "configuration": name, "seconds": seconds, "examples/s": examples / seconds,
                         "speedup": base / seconds})
    info = h.machine()
    text = (f"# Distributed benchmark (cpu)\n\nMachine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}. "
            f"all-MiniLM-L6-v2 as a 2-class classifier, {examples} Rotten Tomatoes snippets in batches of 32 x 48 "
            f"tokens; compute_fisher kind=exact, sketch_gradients with the default layout into a store. Median of "
            f"{args.repeats} interleaved repeats, each in fresh processes after an untimed warm-up call; 2 processes "
            f"use gloo on 127.0.0.1 and shard the batches (decomp.distributed). Speedup against 1 process x 2 "
            f"threads.\n\n" + h.markdown_table(rows, ["task", "configuration", "seconds", "examples/s", "speedup"]))
    print(text)
    h.save("distributed_cpu", {"machine": info, "examples": examples, "repeats": args.repeats, "rows": rows,
                               "samples": {f"{t} | {n}": v for (t, n), v in samples.items()}}, text)


if __name__ == "__main__":
    main()
