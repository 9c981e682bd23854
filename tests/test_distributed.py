"""torch.distributed: two gloo processes on 127.0.0.1 give the single-process results (Fisher to 1e-6 relative,
sketches bit for bit and in example order, Grams and parameter directions to float64 rounding), a run that lost a
rank resumes to the same sketch, and ranks that disagree fail before any work."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import decomp
from distributed_worker import BATCHES, SKETCH, batches, count_tokens
from models import tiny

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
WORLD = 2
TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job: str, out: Path) -> list[subprocess.CompletedProcess]:
    """Runs one process per rank and waits for all, killing every one of them past TIMEOUT."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    processes = [subprocess.Popen([sys.executable, str(WORKER), str(rank), str(WORLD), str(port), job, str(out)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for rank in range(WORLD)]
    deadline = time.monotonic() + TIMEOUT
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        pytest.fail(f"job {job!r} did not finish within {TIMEOUT} s")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def succeeded(results):
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed ({result.returncode}):\n{result.stderr[-4000:]}"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the workers: the same kernels' partitioning on both sides
    yield
    torch.set_num_threads(threads)


def test_fisher_of_two_ranks_is_the_single_process_fisher(tmp_path, one_thread):
    single = decomp.compute_fisher(tiny("bert"), list(batches()), kind="exact", progress=False)
    succeeded(launch("fisher", tmp_path))
    for rank in range(WORLD):
        sharded = torch.load(tmp_path / f"fisher-{rank}.pt")
        assert sharded.keys() == single.keys()
        for name, value in single.items():
            assert bool(((sharded[name] - value).abs() <= 1e-6 * value.abs()).all()), name


def test_a_consumer_written_outside_decomp_runs_through_the_one_engine(tmp_path, one_thread):
    """The engine, not each pass, does the sharding and the reductions: a job of a dozen lines gets them too."""
    single = count_tokens(tiny("bert"), list(batches()))
    assert single["examples"] == sum(len(b) for b in BATCHES)
    assert single["sums"][0] == sum(sum(b) for b in BATCHES)
    succeeded(launch("custom", tmp_path))
    shares = [torch.load(tmp_path / f"custom-{rank}.pt") for rank in range(WORLD)]
    for share in shares:
        assert share["examples"] == single["examples"] and torch.equal(share["sums"], single["sums"])
    # each rank saw its own batches (b mod 2), together every example once
    assert torch.equal(torch.sort(torch.cat([s["rows"] for s in shares])).values, torch.arange(single["examples"]))
    assert not set(shares[0]["rows"].tolist()) & set(shares[1]["rows"].tolist())


def test_sketch_of_two_ranks_is_bit_identical_and_in_order(tmp_path, one_thread):
    single = decomp.sketch_gradients(tiny("bert"), list(batches()), **SKETCH)
    succeeded(launch("sketch", tmp_path))
    for rank in range(WORLD):
        sharded = torch.load(tmp_path / f"sketch-{rank}.pt")
        assert torch.equal(sharded["indices"], torch.arange(len(single)))
        assert torch.equal(sharded["features"], single.features)
    stored = decomp.GradientSketch.load(tmp_path / "store")
    assert torch.equal(stored.features, single.features) and torch.equal(stored.labels, single.labels)
    assert stored.config["world_size"] == WORLD


def test_grams_and_parameter_directions_of_two_ranks_are_the_single_process_ones(tmp_path, one_thread):
    model, data = tiny("bert"), list(batches())
    single_grams = decomp.collect_grams(model, data, progress=False)
    components = decomp.pca(decomp.sketch_gradients(model, data, **SKETCH), 3)
    components.save(tmp_path / "components.safetensors")
    single_directions = components.parameter_directions(model, data, progress=False)
    magnitudes = [{name: torch.zeros_like(v) for name, v in d.items()} for d in single_directions]
    first = 0
    for batch in data:
        rows = torch.zeros(len(components.loadings), 1)
        rows[first:first + len(batch["input_ids"])] = 1
        first += len(batch["input_ids"])
        one_batch = dataclasses.replace(components, loadings=components.loadings * rows)
        for c, direction in enumerate(one_batch.parameter_directions(model, data, progress=False)):
            for name, v in direction.items():
                magnitudes[c][name] += v.abs()
    succeeded(launch("grams", tmp_path))
    succeeded(launch("directions", tmp_path))
    for rank in range(WORLD):
        grams = torch.load(tmp_path / f"grams-{rank}.pt")
        assert grams.keys() == single_grams.keys()
        for name, gram in single_grams.items():
            torch.testing.assert_close(grams[name], gram, rtol=1e-12, atol=1e-12)
        directions = torch.load(tmp_path / f"directions-{rank}.pt")
        for c, (sharded, expected) in enumerate(zip(directions, single_directions, strict=True)):
            for name, value in expected.items():
                # Both sides add the same five float32 batch sums, in another order: the error is a few float32
                # roundings of the sum of the batches' magnitudes (the directions themselves cancel).
                bound = 10 * 2.0 ** -24 * magnitudes[c][name]
                assert bool(((sharded[name] - value).abs() <= bound).all()), name


def test_a_run_that_lost_a_rank_resumes_to_the_same_sketch(tmp_path, one_thread):
    single = decomp.sketch_gradients(tiny("bert"), list(batches()), **SKETCH)
    killed = launch("die", tmp_path)
    assert killed[1].returncode == -9, "rank 1 was meant to die by SIGKILL"
    assert killed[0].returncode != 0, "rank 0 cannot finish without rank 1"
    with pytest.raises(ValueError, match="unfinished run"):
        decomp.GradientSketch.load(tmp_path / "store")
    assert decomp.gradients.store.committed_rows(tmp_path / "store") > 0
    succeeded(launch("sketch", tmp_path))
    resumed = decomp.GradientSketch.load(tmp_path / "store")
    assert torch.equal(resumed.features, single.features)
    assert torch.equal(resumed.indices, torch.arange(len(single)))


@pytest.mark.parametrize("job, names", [("mismatch-model", "model on rank 1"), ("mismatch-seed", "config on rank 1"),
                                        ("mismatch-grams", "model on rank 1")])
def test_ranks_that_disagree_fail_before_any_work(tmp_path, job, names):
    results = launch(job, tmp_path)
    for rank, result in enumerate(results):
        assert result.returncode == 3, f"rank {rank}: {result.returncode}\n{result.stderr[-3000:]}"
        assert "the ranks disagree before any work was done" in result.stderr and names in result.stderr
    assert not list(tmp_path.glob("store/progress-*.json")), "a batch was computed before the check"


# One rank of a torchrun-launched command: decomp joins the group before transformers is imported (a model loads
# later), then leaves it. The group must die inside destroy_process_group, while the interpreter is alive.
LEAVE_GROUP = """
import sys
import torch.distributed as dist
from decomp import distributed
assert distributed.init_from_environment()
import transformers.modeling_utils  # noqa: F401  (what loading a model imports; it brings torch.distributed.nn)
group = dist.distributed_c10d._get_default_group()
dist.destroy_process_group()
print(sys.getrefcount(group) - 1)
"""


def test_a_command_under_torchrun_frees_its_process_group_before_the_interpreter_exits():
    """If anything still holds the group after destroy_process_group, gloo's worker threads outlive it into the
    interpreter's teardown, where releasing the last collective's tensors aborts the process (SIGABRT, about one
    torchrun run in fifty). The only reference left must be the test's own."""
    port = free_port()
    processes = [subprocess.Popen([sys.executable, "-c", LEAVE_GROUP], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank),
                                                  "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
                 for rank in range(WORLD)]
    for rank, process in enumerate(processes):
        stdout, stderr = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 0, f"rank {rank}:\n{stderr[-4000:]}"
        assert stdout.split() == ["1"], f"rank {rank}: other references to the process group remain ({stdout!r})"
