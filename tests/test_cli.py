"""The decomp command line, end to end on a tiny model and a tiny csv written here."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from models import tiny


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    root = tmp_path_factory.mktemp("cli")
    words = "[PAD] [UNK] the film was a fresh rotten plot summary of story good bad great dull".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    for name, seed in (("base", 0), ("tuned0", 1), ("tuned1", 2)):
        model = tiny("bert", seed=0)
        if seed:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * seed * torch.randn_like(p))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = [("the film was good", "good"), ("a dull plot", "bad"), ("great story", "good"), ("bad film", "bad"),
            ("the plot summary of the film", "plot"), ("a fresh story", "good"), ("rotten and dull", "bad")]
    with open(root / "data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "label"])
        writer.writerows(rows)
    return root


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "decomp", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_every_command_has_help():
    for command in ("fisher", "sketch", "decompose", "merge"):
        result = run(command, "--help")
        assert result.returncode == 0 and "usage: decomp " + command in result.stdout


def test_fisher_sketch_decompose_merge_end_to_end(workspace):
    import decomp
    model = workspace / "base"
    data = workspace / "data.csv"
    result = run("fisher", model, data, "--text-column", "review", "--label-column", "label", "--kind", "empirical",
                 "-o", workspace / "fisher.safetensors")
    assert result.returncode == 0, result.stderr
    fisher = decomp.Fisher.load(workspace / "fisher.safetensors")
    assert fisher.num_examples == 7 and fisher.kind == "empirical"
    result = run("sketch", model, data, "--text-column", "review", "--label-column", "label", "--k-out", "4",
                 "--k-in", "4", "--k-vector", "32", "-o", workspace / "store")
    assert result.returncode == 0, result.stderr
    assert decomp.GradientSketch.load(workspace / "store").features.shape[0] == 7
    result = run("decompose", workspace / "store", "--method", "pca", "-r", "2", "--normalize", "--data", data,
                 "--text-column", "review", "--label-column", "label", "-o", workspace / "components")
    assert result.returncode == 0, result.stderr
    summary = (workspace / "components" / "summary.md").read_text()
    assert "Alignment" in summary and "Top examples" in summary and "the film was good" in summary
    assert (workspace / "components" / "spectrum.png").stat().st_size > 1000
    assert 0 <= json.loads((workspace / "components" / "alignment.json").read_text())["nmi"] <= 1
    recipe = workspace / "recipe.yaml"
    recipe.write_text("method: ties\nbase: base\nmodels: [tuned0, tuned1]\nparameters: {density: 0.5}\n")
    result = run("merge", recipe, "-o", workspace / "merged")
    assert result.returncode == 0, result.stderr
    assert (workspace / "merged" / "model.safetensors").exists() and (workspace / "merged" / "README.md").exists()


@pytest.mark.parametrize("args,message", [
    (("fisher", "./missing-model", "data.csv", "-o", "f.safetensors"), "model folder ./missing-model does not exist"),
    (("fisher", "base", "missing.csv", "-o", "f.safetensors"), "data file missing.csv does not exist"),
    (("fisher", "base", "data.csv", "--text-column", "body", "-o", "f.safetensors"), "has no column 'body'"),
    (("decompose", "nowhere", "-o", "out"), "is not a sketch store"),
    (("merge", "missing.yaml", "-o", "out"), "recipe missing.yaml does not exist"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(workspace, args, message):
    result = run(*args, cwd=workspace)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_unknown_method_in_a_recipe(workspace):
    recipe = workspace / "bad.yaml"
    recipe.write_text("method: magic\nmodels: [tuned0, tuned1]\n")
    result = run("merge", recipe, "-o", workspace / "never")
    assert result.returncode == 2 and "method must be one of" in result.stderr
    assert not (workspace / "never").exists()


def test_fisher_and_sketch_under_torchrun_match_one_process(workspace, tmp_path):
    """`torchrun --nproc-per-node 2 -m decomp ...` shards the batches over two gloo ranks: the same Fisher
    (to float32 reordering) and the same sketch store, bit for bit, as one process."""
    import decomp
    from test_distributed import free_port
    common = [workspace / "base", workspace / "data.csv", "--text-column", "review", "--label-column", "label",
              "--batch-size", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for command, out, extra in (("fisher", tmp_path / "{}.safetensors", ["--kind", "exact"]),
                                ("sketch", tmp_path / "{}-store", ["--k-out", "2", "--k-in", "2"])):
        one = subprocess.run([sys.executable, "-m", "decomp", command, *map(str, common), *extra, "-o",
                              str(out).format("one")], capture_output=True, text=True, timeout=300, env=env)
        assert one.returncode == 0, one.stderr
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "decomp",
                              command, *map(str, common), *extra, "-o", str(out).format("two")],
                             capture_output=True, text=True, timeout=300, env=env)
        assert two.returncode == 0, two.stderr[-4000:]
        assert two.stdout.count(" -> ") == 1, "only rank 0 reports"
    one, two = decomp.Fisher.load(tmp_path / "one.safetensors"), decomp.Fisher.load(tmp_path / "two.safetensors")
    assert one.num_examples == two.num_examples == 7
    for name, value in one.items():
        assert bool(((two[name] - value).abs() <= 1e-6 * value.abs()).all()), name
    one, two = decomp.GradientSketch.load(tmp_path / "one-store"), decomp.GradientSketch.load(tmp_path / "two-store")
    assert torch.equal(one.features, two.features) and torch.equal(two.indices, torch.arange(7))


def test_single_process_commands_refuse_torchrun(workspace):
    from test_distributed import free_port
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                             "127.0.0.1", "--master-port", str(free_port()), "-m", "decomp", "report",
                             str(workspace)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and "runs in one process; run it without torchrun" in result.stderr
