"""The `decomp` command line: fisher, sketch, decompose, merge, evaluate, demo, report (`decomp <command> --help`).

Models are Hub names or local save_pretrained folders; data are Hub dataset names or local csv/json/jsonl/parquet
files. Bad input is one line on stderr and exit code 2; an unexpected error is one line naming the log file that
holds its traceback (exit code 1; --debug or DECOMP_DEBUG=1 prints tracebacks instead); Ctrl-C exits with 130 and
a rerun of the same command resumes. Outputs never overwrite or delete what decomp did not write; --overwrite
replaces decomp's own.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import commands
from .._startup import release
from .errors import INTERRUPTED, guarded
from .tasks import SETTABLE, parse_size
from ..gradients.hf import TASKS
from ..gradients.outputs import FISHER_KINDS, OUTPUTS

DISTRIBUTED_COMMANDS = ("fisher", "sketch")


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (naming the argument and the value) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def size(text: str) -> tuple:
    """One `decomp demo --size KEY=VALUE`."""
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _common(parser, *, writes: bool = False):
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of any error")
    if writes:
        parser.add_argument("--overwrite", action="store_true",
                            help="replace an existing output of this command (never anything decomp did not write)")


def _data_arguments(parser, labels_required: bool = False):
    parser.add_argument("data", help="Hub dataset name, or a local .csv/.json/.jsonl/.parquet file")
    parser.add_argument("--split", default="train", help="split of a Hub dataset (default: train)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default=None if not labels_required else "label")
    parser.add_argument("--max-examples", type=positive, default=None)
    parser.add_argument("--max-length", type=positive, default=128, help="tokens per example (longer ones truncated)")
    parser.add_argument("--batch-size", type=positive, default=32)


def _model_arguments(parser):
    parser.add_argument("model", help="Hub model name or a local save_pretrained folder")
    parser.add_argument("--task", choices=TASKS, default=None, help="model head (default: from the model's config)")


def _fisher_parser(commands_):
    fisher = commands_.add_parser("fisher", help="diagonal Fisher of a model over a dataset, as safetensors")
    _model_arguments(fisher)
    _data_arguments(fisher)
    fisher.add_argument("-o", "--output", required=True, help="output .safetensors file")
    fisher.add_argument("--kind", choices=FISHER_KINDS, default="exact")
    fisher.add_argument("--seed", type=int, default=0)
    _common(fisher, writes=True)
    fisher.set_defaults(run=commands.command_fisher)


def _arguments(parser, table) -> None:
    """Adds the arguments of a table of (flags, settings)."""
    for flags, settings in table:
        parser.add_argument(*flags.split(), **settings)


SKETCH = [("-o --output", dict(required=True, help="store folder (a second call with the same settings resumes it)")),
          ("--output-kind", dict(default="logprob", choices=OUTPUTS, help="the scalar differentiated")),
          ("--seed", dict(type=int, default=0)),
          ("--k-out", dict(type=positive, default=8)),
          ("--k-in", dict(type=positive, default=8)),
          ("--k-vector", dict(type=positive, default=512)),
          ("--k", dict(type=positive, default=None, help="second-stage size (default: none)"))]

DECOMPOSE = [("store", dict(help="a store folder written by `decomp sketch`")),
             ("-o --output", dict(required=True, help="output folder")),
             ("--method", dict(choices=["pca", "ica", "kmeans"], default="ica")),
             ("-r --components", dict(type=positive, default=8, help="components (clusters for kmeans)")),
             ("--sign-by", dict(choices=["predictions", "labels"], default=None)),
             ("--normalize", dict(action="store_true", help="scale examples to unit length")),
             ("--whiten", dict(type=positive, default=None, help="kmeans on this many whitened components")),
             ("--seed", dict(type=int, default=0)),
             ("--top", dict(type=positive, default=30, help="top-k examples for purity")),
             ("--examples", dict(type=positive, default=5, help="examples shown per component and sign")),
             ("--data", dict(default=None, help="the sketched data, for texts and labels")),
             ("--split", dict(default="train")),
             ("--text-column", dict(default="text")),
             ("--label-column", dict(default=None))]


def _sketch_parser(commands_):
    sketch = commands_.add_parser("sketch", help="sketched per-example gradients into a resumable store folder")
    _model_arguments(sketch)
    _data_arguments(sketch)
    _arguments(sketch, SKETCH)
    _common(sketch, writes=True)
    sketch.set_defaults(run=commands.command_sketch)


def _decompose_parser(commands_):
    decompose = commands_.add_parser("decompose", help="components of a sketch store, with plots and a summary")
    _arguments(decompose, DECOMPOSE)
    _common(decompose, writes=True)
    decompose.set_defaults(run=commands.command_decompose)


def _other_parsers(commands_):
    merge = commands_.add_parser("merge", help="merge models by a YAML recipe into a save_pretrained folder")
    merge.add_argument("recipe", help="YAML: method, models (path, weight), base, fishers, heads, parameters")
    merge.add_argument("-o", "--output", required=True, help="output folder")
    _common(merge, writes=True)
    merge.set_defaults(run=commands.command_merge)

    evaluate = commands_.add_parser("evaluate", help="accuracy of a sequence classifier on labelled data")
    _model_arguments(evaluate)
    _data_arguments(evaluate, labels_required=True)
    _common(evaluate)
    evaluate.set_defaults(run=commands.command_evaluate)

    demo = commands_.add_parser("demo", help="the built-in demo on MiniLM and real data: decomposition, merging, "
                                             "report.html")
    demo.add_argument("-o", "--output", default="decomp-demo",
                      help="output folder (default: decomp-demo; a second run reuses its fine-tunes)")
    demo.add_argument("--quick", action="store_true", help="fewer examples and grid points (a few minutes)")
    demo.add_argument("--size", type=size, action="append", default=[], metavar="KEY=VALUE",
                      help=f"change one of the run's sizes ({', '.join(SETTABLE)}), e.g. --size train=1000; "
                           f"repeatable")
    _common(demo, writes=True)
    demo.set_defaults(run=commands.command_demo)

    report = commands_.add_parser("report", help="re-render report.html and results.md of a demo folder")
    report.add_argument("directory", help="a folder written by `decomp demo`")
    _common(report)
    report.set_defaults(run=commands.command_report)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="decomp", description="Decompose models into components from per-example gradients, and "
                    "merge models.")
    parser.add_argument("--debug", action="store_true", help="print the traceback of any error")
    commands_ = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_fisher_parser, _sketch_parser, _decompose_parser, _other_parsers):
        add(commands_)
    return parser


def _run(args) -> None:
    from .. import distributed
    from .errors import CommandError
    launched = distributed.init_from_environment()   # under torchrun: one process group for the whole command
    try:
        if launched and args.command not in DISTRIBUTED_COMMANDS:
            raise CommandError(f"`decomp {args.command}` runs in one process; run it without torchrun (only "
                               f"{' and '.join(DISTRIBUTED_COMMANDS)} shard their work across processes)")
        args.run(args)
    finally:
        if launched:
            import torch.distributed as dist
            dist.destroy_process_group()


def main(argv=None) -> int:
    try:
        release()   # from here on Ctrl-C is a KeyboardInterrupt, reported by guarded (or just below)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        args = build_parser().parse_args(argv)
        debug = args.debug or bool(os.environ.get("DECOMP_DEBUG"))
        return guarded(args.command, debug, lambda: _run(args))
    except KeyboardInterrupt:
        print("decomp: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
