"""Faults in real processes: SIGKILL at chosen points of a store commit, of a Fisher write and of a merge's save
leaves the previous state intact (and a killed run resumes to the uninterrupted result, a killed save's leftovers
are removed by the next one); a disk that fills mid-write (RLIMIT_FSIZE)
fails with a clear message, and the run resumes once space is back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import decomp
from decomp.gradients.store import committed_rows
from models import padded_batch, tiny

TESTS = str(Path(__file__).parent)
BATCHES = [[5, 3], [7, 1], [2, 6], [4, 4], [3, 2]]
SMALL = dict(k_out=4, k_in=4, k_vector=64, progress=False)
WIDE = dict(k_out=4, k_in=4, k_vector=1024, progress=False)   # rows of ~4 KB: a small file-size limit bites

SCRIPT = """
import os, resource, signal, sys, torch
sys.path.insert(0, {tests!r})
import decomp
from models import padded_batch, tiny
limit = {limit!r}
if limit is not None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
job = {job!r}
data = [padded_batch("bert", lengths, seed=i) for i, lengths in enumerate({batches!r})]
try:
    if job == "sketch":
        decomp.sketch_gradients(tiny("bert"), data, store={store!r}, **{settings!r})
    else:
        decomp.compute_fisher(tiny("bert", seed=5), data, progress=False).save({store!r}, overwrite=True)
except OSError as error:
    print("ERROR:", error, file=sys.stderr)
    sys.exit(3)
"""


def run(store, *, job="sketch", kill_at=None, limit=None, settings=SMALL):
    script = SCRIPT.format(tests=TESTS, limit=limit, job=job, batches=BATCHES, store=str(store), settings=settings)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("DECOMP_TEST_KILL_AT", None)
    if kill_at:
        env["DECOMP_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-c", script], timeout=300, capture_output=True, text=True, env=env)


def data():
    return [padded_batch("bert", lengths, seed=i) for i, lengths in enumerate(BATCHES)]


def store_files(store: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(store.iterdir())}


@pytest.fixture(scope="module")
def uninterrupted():
    return decomp.sketch_gradients(tiny("bert"), data(), **SMALL).features


@pytest.mark.parametrize("kill_at, committed", [("commit:3", 4), ("progress:2", 2)])
def test_a_kill_inside_a_commit_keeps_the_committed_rows_and_resumes(tmp_path, uninterrupted, kill_at, committed):
    """Killed after a batch's rows were written but before its progress was renamed into place: that batch is not
    committed, every earlier one is, and the resumed run equals an uninterrupted one bit for bit."""
    store = tmp_path / "store"
    killed = run(store, kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert committed_rows(store) == committed
    progress = store / "progress-0.json"
    if committed:
        assert json.loads(progress.read_text())["next"] == committed
    with pytest.raises(ValueError, match="unfinished run"):
        decomp.GradientSketch.load(store)
    resumed = decomp.sketch_gradients(tiny("bert"), data(), store=store, **SMALL)
    assert torch.equal(resumed.features, uninterrupted)
    assert torch.equal(resumed.indices, torch.arange(len(uninterrupted)))
    assert not list(store.glob("*.partial"))


def test_a_resume_of_a_finished_store_changes_nothing(tmp_path, uninterrupted):
    store = tmp_path / "store"
    decomp.sketch_gradients(tiny("bert"), data(), store=store, **SMALL)
    before = store_files(store)
    again = decomp.sketch_gradients(tiny("bert"), data(), store=store, **SMALL)
    assert torch.equal(again.features, uninterrupted) and store_files(store) == before


def test_a_kill_while_a_fisher_replaces_another_keeps_the_old_one(tmp_path):
    path = tmp_path / "fisher.safetensors"
    old = decomp.compute_fisher(tiny("bert"), data(), progress=False)
    old.save(path)
    before = path.read_bytes()
    killed = run(path, job="fisher", kill_at="fisher")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert path.read_bytes() == before
    loaded = decomp.Fisher.load(path)
    assert all(torch.equal(loaded[name], old[name]) for name in old)
    # the killed writer's hidden temporary file is all it left; the next save removes it (its process is gone)
    left = [p.name for p in tmp_path.iterdir() if p.name != path.name]
    assert len(left) == 1 and left[0].startswith(".fisher.safetensors.") and left[0].endswith(".partial"), left
    new = decomp.Fisher({name: t + 1 for name, t in old.items()}, kind=old.kind, num_examples=old.num_examples)
    new.save(path, overwrite=True)
    assert all(torch.equal(decomp.Fisher.load(path)[name], old[name] + 1) for name in old)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_stale_partial_blocks_nothing_and_only_our_own_dead_writers_files_are_removed(tmp_path):
    """A killed writer's sibling is removed by the next save; a look-alike of another name, or one whose process
    still runs, is left alone (and is no obstacle either)."""
    path = tmp_path / "fisher.safetensors"
    killed = run(path, job="fisher", kill_at="fisher")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not path.exists()
    [stale] = [p for p in tmp_path.iterdir()]
    host = stale.name.split(".")[3].rsplit("-", 2)[0]
    alive = tmp_path / f".fisher.safetensors.{host}-{os.getpid()}-abcdefgh.partial"   # a running writer's
    foreign = tmp_path / ".fisher.safetensors.mine.partial"                            # not a name we make
    for keep in (alive, foreign):
        keep.write_text("not ours to delete")
    fisher = decomp.compute_fisher(tiny("bert"), data(), progress=False)
    fisher.save(path)             # no overwrite needed: the killed save put nothing at `path`
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, alive.name, foreign.name])
    assert alive.read_text() == foreign.read_text() == "not ours to delete"


MERGE_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch, decomp
from models import tiny
model = tiny("bert", seed=3)
decomp.save_merged(model.state_dict(), {out!r}, like=model, overwrite=True)
"""


def merge_files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kill_at", ["merge", "merge-swap"])
def test_a_kill_during_a_merge_save_leaves_the_earlier_merge_or_nothing_and_a_rerun_succeeds(tmp_path, kill_at):
    """SIGKILL once the new folder is complete but not in place ("merge"), or once the earlier merge was moved aside
    and the new one not yet put in its place ("merge-swap"): the target is never half-written, the earlier merge
    is never lost (a kill mid-swap is undone by the next save), and the same save run again succeeds."""
    out = tmp_path / "merged"
    model = tiny("bert", seed=1)
    decomp.save_merged(model.state_dict(), out, like=model)
    earlier = merge_files(out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DECOMP_TEST_KILL_AT": kill_at}
    killed = subprocess.run([sys.executable, "-c", MERGE_SCRIPT.format(tests=TESTS, out=str(out))], timeout=300,
                            capture_output=True, text=True, env=env)
    assert killed.returncode == -9, killed.stderr[-2000:]
    if kill_at == "merge":
        assert merge_files(out) == earlier
    else:
        assert not out.exists()    # moved aside, nothing half-written in its place
    assert all(p.name.startswith(".merged.") for p in tmp_path.iterdir() if p.name != "merged")
    with pytest.raises(FileExistsError, match="overwrite=True"):   # the earlier merge is back, and still guarded
        decomp.save_merged(model.state_dict(), out, like=model)
    assert merge_files(out) == earlier
    again = tiny("bert", seed=3)
    decomp.save_merged(again.state_dict(), out, like=again, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    assert merge_files(out) != earlier
    reloaded = type(again).from_pretrained(out)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in reloaded.state_dict().items())


def test_a_full_disk_fails_clearly_and_the_run_resumes_when_space_is_back(tmp_path):
    store = tmp_path / "store"
    reference = decomp.sketch_gradients(tiny("bert"), data(), **WIDE).features
    row = reference.shape[1] * 4
    full = run(store, limit=row * 5, settings=WIDE)          # room for two batches of rows (4), not a third
    assert full.returncode == 3, full.stderr[-3000:]
    message = full.stderr.strip().splitlines()[-1]
    assert "ERROR:" in message and str(store) in message and "resume" in message, message
    assert "examples 4..5" in message and "the 4 rows committed before them are intact" in message, message
    assert committed_rows(store) == 4
    resumed = decomp.sketch_gradients(tiny("bert"), data(), store=store, **WIDE)
    assert torch.equal(resumed.features, reference)


def test_a_full_disk_during_a_fisher_save_leaves_no_trace(tmp_path):
    path = tmp_path / "fisher.safetensors"
    old = decomp.compute_fisher(tiny("bert"), data(), progress=False)
    old.save(path)
    before = sorted(p.name for p in tmp_path.iterdir())
    full = run(path, job="fisher", limit=path.stat().st_size // 2)
    assert full.returncode == 3, full.stderr[-3000:]
    message = full.stderr.strip().splitlines()[-1]
    assert str(path) in message and "nothing was written there" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert all(torch.equal(decomp.Fisher.load(path)[name], old[name]) for name in old)
    old.save(path, overwrite=True)   # space is back
