"""The command line's error boundary: every known bad input is one line on stderr naming the argument or value, and
exit code 2, never a traceback; an unexpected error is one line naming its log; Ctrl-C exits with 130 and the same
command resumes; outputs never overwrite what decomp did not write.

The cases of the issue run as `python -m decomp` subprocesses, a few at a time (each mostly imports torch), started
once for the module; more cases call the same main() in this process, which the boundary serves alike."""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import test_cli

workspace = test_cli.workspace   # the fixture: tiny models (base, tuned0, tuned1) and data.csv

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
EXAMPLES = 200   # sketched one at a time: long enough to interrupt part way


def _files(root):
    (root / "empty.csv").write_bytes(b"")
    (root / "binary.csv").write_bytes(bytes(range(256)) * 8)
    (root / "latin1.csv").write_bytes("review,label\ncaf\xe9 film,good\n".encode("latin-1"))
    (root / "no-text.csv").write_text("review,label\nthe film was good,good\n,bad\n")
    (root / "no-label.csv").write_text("review,label\nthe film was good,good\na dull plot,\n")
    (root / "header-only.csv").write_text("review,label\n")
    (root / "malformed.yaml").write_text("method: ties\nmodels: [tuned0, tuned1\nparameters: {density: 0.5}\n")
    (root / "list.yaml").write_text("- ties\n- tuned0\n")
    (root / "notes.txt").write_text("not a Fisher\n")
    (root / "text-fisher.yaml").write_text("method: fisher\nmodels: [tuned0, tuned1]\n"
                                           "fishers: [notes.txt, notes.txt]\n")
    (root / "unknown.yaml").write_text("method: magic\nmodels: [tuned0, tuned1]\n")
    (root / "ties.yaml").write_text("method: ties\nbase: base\nmodels: [tuned0, tuned1]\n")
    (root / "foreign").mkdir()
    (root / "foreign" / "mine.txt").write_text("the user's own file\n")
    (root / "foreign.safetensors").write_text("the user's own file, named like an output\n")


def fisher(data, *extra):
    return ["fisher", "base", data, "--text-column", "review", "--label-column", "label", *extra, "-o",
            "f.safetensors"]


# case -> (arguments, what the one line must say); run as subprocesses
CASES = {
    "malformed yaml": (["merge", "malformed.yaml", "-o", "out-a"], "recipe malformed.yaml is not valid YAML at line"),
    "empty csv": (fisher("empty.csv"), "data file empty.csv is empty"),
    "binary csv": (fisher("binary.csv"), "data file binary.csv is binary, not csv text"),
    "empty text cell": (fisher("no-text.csv"), "example 2 has an empty 'review' cell (--text-column)"),
    "empty label cell": (fisher("no-label.csv"), "example 2 has an empty 'label' cell (--label-column)"),
    "fisher not safetensors": (["merge", "text-fisher.yaml", "-o", "out-b"],
                               "Fisher file notes.txt is not a safetensors file"),
    "max-length 0": (fisher("data.csv", "--max-length", "0"),
                     "argument --max-length: must be a positive integer, got 0"),
    "batch-size 0": (fisher("data.csv", "--batch-size", "0"),
                     "argument --batch-size: must be a positive integer, got 0"),
    "unknown method": (["merge", "unknown.yaml", "-o", "out-c"], "'magic'"),
}
# more bad input, through main() in this process
MORE = {
    "not utf-8": (fisher("latin1.csv"), "data file latin1.csv is not UTF-8 text"),
    "header only": (fisher("header-only.csv"), "data file header-only.csv holds no examples"),
    "yaml not a mapping": (["merge", "list.yaml", "-o", "out-d"], "must be a YAML mapping"),
    "unknown fisher kind": (fisher("data.csv", "--kind", "fancy"), "argument --kind: invalid choice: 'fancy'"),
    "missing argument": (["fisher", "base", "data.csv"], "the following arguments are required: -o/--output"),
    "foreign output folder": (["merge", "ties.yaml", "-o", "foreign", "--overwrite"],
                              "foreign exists and holds something decomp did not write"),
    "foreign output file": (["fisher", "base", "data.csv", "--text-column", "review", "-o", "foreign.safetensors",
                             "--overwrite"], "foreign.safetensors exists and holds something decomp did not write"),
    "demo into a foreign folder": (["demo", "--quick", "-o", "foreign", "--overwrite"],
                                   "foreign exists and holds something decomp did not write"),
    "demo size of an unknown key": (["demo", "--quick", "--size", "examples=3", "-o", "out-d"],
                                    "argument --size: expected KEY=VALUE with KEY one of train, validation"),
    "demo size not a number": (["demo", "--size", "train=many", "-o", "out-d"],
                               "argument --size: train must be an integer; got 'many'"),
    "demo size of zero": (["demo", "--size", "learning_rate=0", "-o", "out-d"],
                          "argument --size: learning_rate must be positive and finite; got '0'"),
    "demo fisher above train": (["demo", "--quick", "--size", "train=32", "-o", "out-d"],
                                "fisher (the training examples the merges' statistics use) must not exceed train; "
                                "got fisher=64, train=32"),
    "a file where a folder goes": (["sketch", "base", "data.csv", "--text-column", "review", "-o", "data.csv"],
                                   "data.csv is a file; the output must be a folder"),
    "own output without --overwrite": (["merge", "ties.yaml", "-o", "merged"],
                                       "merged exists (a merged model written by decomp); pass --overwrite to "
                                       "replace it"),
}


def call(arguments, cwd):
    done = subprocess.run([sys.executable, "-m", "decomp", *arguments], cwd=cwd, env=ENV, text=True,
                          capture_output=True, timeout=300)
    return done.returncode, done.stderr


def call_main(arguments, cwd, capsys, monkeypatch):
    """(exit code, stderr) of main(arguments) in this process."""
    from decomp.app.cli import main
    monkeypatch.chdir(cwd)
    try:
        code = main(arguments)
    except SystemExit as stop:   # argparse's errors exit
        code = stop.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def prepared(workspace):
    import decomp
    _files(workspace)
    decomp.merge_recipe(workspace / "ties.yaml", workspace / "merged")   # an output decomp wrote
    return workspace


@pytest.fixture(scope="module")
def outcomes(prepared):
    with ThreadPoolExecutor(max_workers=6) as pool:
        return dict(zip(CASES, pool.map(lambda args: call(args, prepared), (a for a, _ in CASES.values()))))


def assert_one_line(code, stderr, message, workspace):
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith("decomp ") and message in stderr, stderr
    assert not any((workspace / name).exists() for name in ("out-a", "out-b", "out-c", "out-d", "f.safetensors"))
    assert (workspace / "foreign" / "mine.txt").exists() and (workspace / "foreign.safetensors").read_text()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_code_2(outcomes, prepared, case):
    assert_one_line(*outcomes[case], CASES[case][1], prepared)


@pytest.mark.parametrize("case", list(MORE))
def test_more_bad_input_through_main(prepared, capsys, monkeypatch, case):
    arguments, message = MORE[case]
    assert_one_line(*call_main(arguments, prepared, capsys, monkeypatch), message, prepared)


def test_choices_come_from_the_library():
    from decomp.app.cli import build_parser
    from decomp.gradients.outputs import FISHER_KINDS, OUTPUTS
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    kinds = {a.dest: a.choices for a in commands["fisher"]._actions} | {a.dest: a.choices for a in
                                                                         commands["sketch"]._actions}
    assert tuple(kinds["kind"]) == FISHER_KINDS and tuple(kinds["output_kind"]) == OUTPUTS


def test_unexpected_error_is_one_line_naming_its_log(tmp_path, capsys, monkeypatch):
    """A bug (an exception no input check knows) prints one line naming a log that holds the traceback, exit code
    1; --debug lets the traceback through."""
    from decomp.app import commands

    def broken(args):
        raise RuntimeError("a bug\nsecond line")

    monkeypatch.setattr(commands, "command_report", broken)
    code, stderr = call_main(["report", "."], tmp_path, capsys, monkeypatch)
    assert code == 1 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("decomp report: unexpected error: RuntimeError: a bug (traceback in ")
    log = stderr.split("traceback in ")[1].split(";")[0]
    text = open(log).read()
    os.remove(log)
    assert "Traceback" in text and "second line" in text and "broken" in text
    with pytest.raises(RuntimeError, match="a bug"):
        call_main(["--debug", "report", "."], tmp_path, capsys, monkeypatch)


def test_own_outputs_are_replaced_with_overwrite(prepared, capsys, monkeypatch):
    (prepared / "merged" / "model.safetensors").write_bytes(b"stale")
    code, stderr = call_main(["merge", "ties.yaml", "-o", "merged", "--overwrite"], prepared, capsys, monkeypatch)
    assert code == 0, stderr
    assert (prepared / "merged" / "model.safetensors").stat().st_size > 1000


def test_ctrl_c_exits_130_and_the_same_command_resumes(workspace, tmp_path):
    import decomp
    from decomp.app.loading import load_data, load_model
    from decomp.gradients.store import committed_rows
    words = "the film was a fresh rotten plot summary of story good bad great dull".split()
    generator = torch.Generator().manual_seed(0)
    rows = [" ".join(words[i] for i in torch.randint(len(words), (int(length),), generator=generator))
            for length in torch.randint(3, 12, (EXAMPLES,), generator=generator)]
    (tmp_path / "long.csv").write_text("review,label\n" + "".join(f"{r},{n % 2}\n" for n, r in enumerate(rows)))
    store = tmp_path / "store"
    settings = ["--text-column", "review", "--label-column", "label", "--k-out", "2", "--k-in", "2", "--k-vector", "16"]
    command = [sys.executable, "-m", "decomp", "sketch", str(workspace / "base"), str(tmp_path / "long.csv"),
               *settings, "--batch-size", "1", "-o", str(store)]
    process = subprocess.Popen(command, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(store.glob("progress-*.json")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "decomp sketch: interrupted; run the same command to resume"
    assert "Traceback" not in stderr
    assert 0 < committed_rows(store) < EXAMPLES, "interrupted part way"
    resumed = subprocess.run(command, env=ENV, text=True, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    sketch = decomp.GradientSketch.load(store)
    assert torch.equal(sketch.indices, torch.arange(EXAMPLES))
    # the same as one uninterrupted run (in batches of 50: equal to float rounding)
    data = load_data(str(tmp_path / "long.csv"), split="train", text_column="review", label_column="label",
                     max_examples=None)
    model, tokenizer = load_model(str(workspace / "base"), None)
    whole = decomp.sketch_gradients(model, data, k_out=2, k_in=2, k_vector=16, batch_size=50, tokenizer=tokenizer,
                                    text_column="review", label_column="label", max_length=128, progress=False)
    assert torch.allclose(whole.features, sketch.features, rtol=1e-4, atol=1e-6)
