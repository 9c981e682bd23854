"""Issue #17, hardening: no silent wrong result, no lost data, no traceback.

Every writer shares one policy (gradients/writing.py): a symbolic link, or a folder holding one, is refused naming
it (never written through, replaced or deleted); a killed writer's hidden sibling is removed by the next write
(only a name we make, only when its process is gone) and a folder it left moved aside is put back; the command
line's own outputs (decompose, report) follow it. Ctrl-C while `decomp` starts is one line and exit code 130. The
ranks' model check hashes the weights' bytes."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import decomp
from decomp import _startup
from decomp.app import cli
from decomp.app.report import write_report
from decomp.distributed import model_fingerprint
from decomp.gradients import writing
from models import padded_batch, tiny

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---- model_fingerprint: the bytes, not sums

def test_model_fingerprint_tells_checkpoints_of_one_architecture_apart():
    a, b = tiny("bert", seed=0), tiny("bert", seed=1)
    assert model_fingerprint(a) == model_fingerprint(tiny("bert", seed=0))
    assert model_fingerprint(a) != model_fingerprint(b)
    swapped = tiny("bert", seed=0)
    with torch.no_grad():   # two entries exchanged: every sum and sum of squares is unchanged
        weight = swapped.classifier.weight
        first, second = weight[0, 0].clone(), weight[0, 1].clone()
        weight[0, 0], weight[0, 1] = second, first
    assert not torch.equal(swapped.classifier.weight, a.classifier.weight)
    assert model_fingerprint(swapped) != model_fingerprint(a)
    frozen = tiny("bert", seed=0)
    frozen.classifier.bias.requires_grad_(False)
    assert model_fingerprint(frozen) != model_fingerprint(a)


# ---- Ctrl-C while the command line starts

HOOK = '''
import os, signal, sys
class Interrupt:
    """SIGINT to this process the first time the module named in DECOMP_TEST_SIGINT_AT is looked for."""
    def find_spec(self, name, path=None, target=None):
        if name == os.environ.get("DECOMP_TEST_SIGINT_AT"):
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, Interrupt())
'''

CONSOLE_SCRIPT = '''import re
import sys
from decomp.app.cli import main
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit(main())
'''


def interrupted_start(tmp_path, command, at="decomp.analysis"):
    (tmp_path / "hook").mkdir(exist_ok=True)
    (tmp_path / "hook" / "sitecustomize.py").write_text(HOOK)
    env = {**ENV, "DECOMP_TEST_SIGINT_AT": at,
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


@pytest.mark.parametrize("how", ["python -m decomp", "console script"])
def test_ctrl_c_while_the_command_imports_is_one_line_and_130(tmp_path, how):
    """SIGINT while `import decomp` runs (before the command line's handler exists): no traceback."""
    if how == "console script":   # what pip writes for decomp = "decomp.app.cli:main"
        (tmp_path / "decomp").write_text(CONSOLE_SCRIPT)
        command = [sys.executable, str(tmp_path / "decomp"), "merge", "recipe.yaml", "-o", "out"]
    else:
        command = [sys.executable, "-m", "decomp", "merge", "recipe.yaml", "-o", "out"]
    result = interrupted_start(tmp_path, command)
    assert result.returncode == 130, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [_startup.MESSAGE], result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_importing_decomp_as_a_library_leaves_ctrl_c_alone(tmp_path):
    result = interrupted_start(tmp_path, [sys.executable, "-c", "import decomp"])
    assert result.returncode != 130 and "KeyboardInterrupt" in result.stderr
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # pytest imported decomp, too


def test_running_as_cli_knows_the_command_line(monkeypatch):
    for orig, argv0, expected in ((["python", "-m", "decomp", "merge"], "-m", True),
                                  (["python", "-mdecomp.app.cli"], "-m", True),
                                  (["python", "-m", "pytest", "tests"], "/x/pytest/__main__.py", False),
                                  (["python", "/venv/bin/decomp", "merge"], "/venv/bin/decomp", True),
                                  (["python", "train.py", "-m", "decomp"], "train.py", False),
                                  (["python", "-c", "import decomp"], "-c", False)):
        monkeypatch.setattr(sys, "orig_argv", orig)
        monkeypatch.setattr(sys, "argv", [argv0])
        assert _startup.running_as_cli() is expected, orig


def test_ctrl_c_before_the_commands_own_handler_is_one_line_and_130(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["merge", "recipe.yaml", "-o", "out"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["decomp: interrupted"]


# ---- links are never written through

@pytest.fixture
def fisher():
    g = torch.Generator().manual_seed(0)
    return decomp.Fisher({"w": torch.rand(3, 2, generator=g)}, kind="exact", num_examples=2)


def test_file_writers_refuse_a_link_and_leave_what_it_points_to(tmp_path, fisher):
    real = fisher.save(tmp_path / "real.safetensors")
    components = decomp.pca(torch.randn(12, 6, generator=torch.Generator().manual_seed(0)), 2)
    real_components = components.save(tmp_path / "components.safetensors")
    for save, target in ((fisher.save, real), (components.save, real_components)):
        link = tmp_path / f"link-{target.name}"
        link.symlink_to(target)
        before = target.read_bytes()
        with pytest.raises(FileExistsError, match=rf"path='{link}' is a symbolic link .*never writes through"):
            save(link, overwrite=True)
        assert target.read_bytes() == before and link.is_symlink()
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "nowhere" / "x.safetensors")
    with pytest.raises(FileExistsError, match="symbolic link"):
        fisher.save(dangling)
    assert not (tmp_path / "nowhere").exists()


def test_folder_writers_refuse_a_link_or_a_folder_holding_one(tmp_path):
    model = tiny("bert", seed=1)
    earlier = decomp.save_merged(model.state_dict(), tmp_path / "earlier", like=model)
    link = tmp_path / "link"
    link.symlink_to(earlier, target_is_directory=True)
    before = files(earlier)
    with pytest.raises(FileExistsError, match=rf"out_dir='{link}' is a symbolic link"):
        decomp.save_merged(model.state_dict(), link, like=model, overwrite=True)
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"someone else's weights")
    (earlier / "model.safetensors").unlink()
    (earlier / "model.safetensors").symlink_to(outside)
    with pytest.raises(FileExistsError, match=r"out_dir='.*earlier' holds a symbolic link, 'model.safetensors' ->"):
        decomp.save_merged(model.state_dict(), earlier, like=model, overwrite=True)
    assert outside.read_bytes() == b"someone else's weights" and (earlier / "model.safetensors").is_symlink()
    assert {k: v for k, v in files(earlier).items() if k != "model.safetensors"} == \
        {k: v for k, v in before.items() if k != "model.safetensors"}
    sketch = decomp.sketch_gradients(tiny("bert"), [padded_batch("bert", [3, 2])], k_out=2, k_in=2, k_vector=8,
                                     progress=False)
    store = sketch.save(tmp_path / "store")
    (tmp_path / "store-link").symlink_to(store, target_is_directory=True)
    with pytest.raises(FileExistsError, match="is a symbolic link"):
        sketch.save(tmp_path / "store-link", overwrite=True)


def test_a_sketch_store_a_figure_and_stored_tensors_are_never_written_through_a_link(tmp_path):
    from decomp.analysis.plots import plot_spectrum
    from decomp.app.stored import StoredTensors
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "store").symlink_to(real, target_is_directory=True)
    with pytest.raises(FileExistsError, match=rf"store='{tmp_path / 'store'}' is a symbolic link"):
        decomp.sketch_gradients(tiny("bert"), [padded_batch("bert", [3, 2])], store=tmp_path / "store", k_out=2,
                                k_in=2, k_vector=8, progress=False)
    assert list(real.iterdir()) == []
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"my picture")
    (tmp_path / "spectrum.png").symlink_to(mine)
    (tmp_path / "grams.safetensors").symlink_to(mine)
    spectrum = decomp.pca(torch.randn(12, 6, generator=torch.Generator().manual_seed(0)), 3)
    with pytest.raises(FileExistsError, match="spectrum.png' is a symbolic link"):
        plot_spectrum(spectrum, tmp_path / "spectrum.png")
    with pytest.raises(FileExistsError, match="grams.safetensors' is a symbolic link"):
        StoredTensors.write({"w": torch.ones(2)}, tmp_path / "grams.safetensors")
    assert mine.read_bytes() == b"my picture"
    assert plot_spectrum(spectrum, tmp_path / "figures" / "spectrum.png").read_bytes()[:4] == b"\x89PNG"
    assert torch.equal(StoredTensors.write({"w": torch.ones(2)}, tmp_path / "t.safetensors")["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures", "grams.safetensors", "mine.png", "real",
                                                          "spectrum.png", "store", "t.safetensors"]


def test_the_report_is_never_written_through_a_link(tmp_path, monkeypatch):
    from decomp.app import report
    monkeypatch.setattr(report, "render_markdown", lambda results: "tables")
    monkeypatch.setattr(report, "render_html", lambda results, figures: "page")
    results = {"merging": {"rows": []}}
    mine = tmp_path / "my-page.html"
    mine.write_text("my own page")
    (tmp_path / "report.html").symlink_to(mine)
    with pytest.raises(FileExistsError, match="report.html' is a symbolic link"):
        write_report(tmp_path, results, {})
    assert mine.read_text() == "my own page"
    (tmp_path / "report.html").unlink()
    assert write_report(tmp_path, results, {}).read_text() == "page" and (tmp_path / "results.md").read_text() == \
        "tables"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-page.html", "report.html", "results.md"]


def test_the_command_line_refuses_a_link_as_output_in_one_line(tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "out").symlink_to(real, target_is_directory=True)
    code = cli.main(["decompose", str(tmp_path / "store"), "-o", str(tmp_path / "out"), "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--output=" in err[0] and "is a symbolic link" in err[0], err


def test_report_of_a_damaged_results_file_names_it(tmp_path, capsys):
    for text in ("{not json", '{"merging": {"rows": []}}'):
        (tmp_path / "results.json").write_text(text)
        assert cli.main(["report", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "results.json is not a demo's results.json" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


# ---- a killed writer's leftovers

def test_a_killed_writers_siblings_are_removed_and_a_moved_aside_folder_is_put_back(tmp_path):
    target = tmp_path / "out"
    host, pid = writing._HOST, dead_pid()
    stale_partial = tmp_path / f".out.{host}-{pid}-abcd1234.partial"
    stale_partial.mkdir()
    (stale_partial / "model.safetensors").write_bytes(b"half")
    moved_aside = tmp_path / f".out.{host}-{pid}-efgh5678.old"
    moved_aside.mkdir()
    (moved_aside / "README.md").write_text("# Merged with decomp\n")
    other_host = tmp_path / f".out.elsewhere-{pid}-abcd1234.partial"
    running = tmp_path / f".out.{host}-{os.getpid()}-abcd1234.partial"
    lookalike = tmp_path / ".out.partial"
    for keep in (other_host, running, lookalike):
        keep.mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        decomp.merging.saving.check_target(target, overwrite=False)
    assert (target / "README.md").read_text() == "# Merged with decomp\n"      # put back, and still guarded
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", other_host.name, running.name,
                                                                 lookalike.name])


def test_write_folder_replaces_in_one_step_and_a_failure_keeps_the_old(tmp_path):
    target = tmp_path / "out"
    writing.write_folder(target, lambda partial: (partial / "a").write_text("1"))
    with pytest.raises(RuntimeError, match="boom"):
        writing.write_folder(target, lambda partial: (_ for _ in ()).throw(RuntimeError("boom")))
    assert files(target) == {"a": b"1"} and [p.name for p in tmp_path.iterdir()] == ["out"]
    writing.write_folder(target, lambda partial: (partial / "b").write_text("2"))
    assert files(target) == {"b": b"2"} and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_decompose_never_deletes_a_folder_beside_its_output(tmp_path, capsys):
    store = tmp_path / "store"
    decomp.sketch_gradients(tiny("bert"), [padded_batch("bert", [3, 2, 4], seed=i) for i in range(3)], store=store,
                            k_out=2, k_in=2, k_vector=8, progress=False)
    mine = tmp_path / "components.partial"   # the name the command once used for its own scratch folder
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    out = tmp_path / "components"
    arguments = ["decompose", str(store), "--method", "pca", "-r", "2", "-o", str(out)]
    assert cli.main(arguments) == 0, capsys.readouterr().err
    first = files(out)
    assert "components.safetensors" in first and (mine / "notes.txt").read_text() == "mine"
    assert cli.main(arguments) == 2 and "--overwrite" in capsys.readouterr().err
    assert cli.main([*arguments[:-2], "-r", "3", "-o", str(out), "--overwrite"]) == 0, capsys.readouterr().err
    assert decomp.Components.load(out / "components.safetensors").n_components == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["components", "components.partial", "store"]


def test_an_in_memory_models_fingerprint_sees_dtype_and_shape():
    from decomp.merging.sources import Source
    weight = torch.arange(12, dtype=torch.float32)
    as_matrix = Source({"w": weight.reshape(3, 4)}, "a").fingerprint()
    as_other_matrix = Source({"w": weight.reshape(4, 3)}, "b").fingerprint()
    as_ints = Source({"w": weight.view(torch.int32)}, "c").fingerprint()
    assert len({as_matrix, as_other_matrix, as_ints}) == 3
    assert Source({"w": weight.reshape(3, 4).clone()}, "d").fingerprint() == as_matrix
