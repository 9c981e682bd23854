"""The `decomp` command line: fisher, sketch, decompose, merge, evaluate, demo, report (`decomp <command> --help`).

Models are Hub names or local save_pretrained folders; data are Hub dataset names or local csv/json/jsonl/parquet
files. Errors are one line on stderr and a non-zero exit, never a traceback (set DECOMP_DEBUG=1 for one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

LOCAL_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class CommandError(Exception):
    """A problem with the user's input, reported as one line."""


# --- loading -----------------------------------------------------------------------------------------------------

def load_data(source: str, *, split: str, text_column: str, label_column: str | None, max_examples: int | None):
    """A datasets.Dataset from a local csv/json/parquet file or a Hub name, with its columns checked."""
    import datasets
    path = Path(source)
    if path.suffix.lower() in LOCAL_FORMATS or path.exists():
        if not path.exists():
            raise CommandError(f"data file {source} does not exist")
        kind = LOCAL_FORMATS.get(path.suffix.lower())
        if kind is None:
            raise CommandError(f"data file {source} is not csv, json, jsonl or parquet")
        data = datasets.load_dataset(kind, data_files=str(path), split="train")
    else:
        try:
            data = datasets.load_dataset(source, split=split)
        except Exception as error:  # the Hub's errors are long; the first line says what happened
            raise CommandError(f"could not load dataset {source!r} (split {split!r}): "
                               f"{str(error).splitlines()[0][:200]}") from error
    for column, what in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column is not None and column not in data.column_names:
            raise CommandError(f"data {source} has no column {column!r} ({what}); its columns are "
                               f"{', '.join(data.column_names)}")
    if label_column is not None and len(data) and not isinstance(data[0][label_column], int):
        data = data.class_encode_column(label_column)   # string labels -> class ids, in sorted order
    if max_examples is not None:
        data = data.select(range(min(max_examples, len(data))))
    return data


def check_model_source(source: str) -> None:
    if source.startswith((".", "/", "~")) and not Path(source).expanduser().exists():
        raise CommandError(f"model folder {source} does not exist")


def load_model(source: str, task: str | None):
    """(model, tokenizer) from a local folder or a Hub name; the task decides the head."""
    import transformers
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    check_model_source(source)
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except OSError as error:
        raise CommandError(f"could not load model {source!r}: {str(error).splitlines()[0][:200]}") from error
    architecture = (config.architectures or [""])[0]
    if task is None:
        task = ("seq2seq" if config.is_encoder_decoder else "causal_lm" if "CausalLM" in architecture or
                "LMHead" in architecture else "classification")
    classes = {"classification": transformers.AutoModelForSequenceClassification,
               "causal_lm": transformers.AutoModelForCausalLM, "seq2seq": transformers.AutoModelForSeq2SeqLM}
    model = classes[task].from_pretrained(source)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:   # decoder-only tokenizers often lack one; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _data_and_model(args, task):
    """The data, then the model: the cheap checks (paths, columns) fail before any model is loaded."""
    check_model_source(args.model)
    data = load_data(args.data, split=args.split, text_column=args.text_column, label_column=args.label_column,
                     max_examples=args.max_examples)
    return (data, *load_model(args.model, task))


def _data_arguments(parser, labels_required: bool = False):
    parser.add_argument("data", help="Hub dataset name, or a local .csv/.json/.jsonl/.parquet file")
    parser.add_argument("--split", default="train", help="split of a Hub dataset (default: train)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default=None if not labels_required else "label")
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (longer ones truncated)")
    parser.add_argument("--batch-size", type=int, default=32)


def _model_arguments(parser):
    parser.add_argument("model", help="Hub model name or a local save_pretrained folder")
    parser.add_argument("--task", choices=["classification", "causal_lm", "seq2seq"], default=None,
                        help="model head (default: from the model's config)")


# --- commands ------------------------------------------------------------------------------------------------------

def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def command_fisher(args):
    import decomp
    data, model, tokenizer = _data_and_model(args, args.task)
    fisher = decomp.compute_fisher(model, data, kind=args.kind, batch_size=args.batch_size, tokenizer=tokenizer,
                                   text_column=args.text_column, label_column=args.label_column,
                                   max_length=args.max_length, seed=args.seed)
    if _rank() == 0:    # every rank holds the same all-reduced Fisher; one writes it
        path = fisher.save(args.output)
        print(f"{fisher} -> {path}")


def command_sketch(args):
    import decomp
    data, model, tokenizer = _data_and_model(args, args.task)
    sketch = decomp.sketch_gradients(model, data, seed=args.seed, store=args.output, output=args.output_kind,
                                     k_out=args.k_out, k_in=args.k_in, k_vector=args.k_vector, k=args.k,
                                     batch_size=args.batch_size, tokenizer=tokenizer, text_column=args.text_column,
                                     label_column=args.label_column, max_length=args.max_length)
    if _rank() == 0:
        print(f"{sketch} -> {args.output}")


def command_decompose(args):
    import numpy as np

    import decomp
    from ..analysis.plots import plot_alignment, plot_spectrum, top_examples_markdown
    if not (Path(args.store) / "meta.json").exists():
        raise CommandError(f"{args.store} is not a sketch store (no meta.json): make one with `decomp sketch`")
    sketch = decomp.GradientSketch.load(args.store)
    prepared = sketch
    if args.sign_by or args.normalize:
        prepared = decomp.prepare(sketch, sign_by=args.sign_by, normalize=args.normalize)
    if args.method == "pca":
        components = decomp.pca(prepared, args.components)
    elif args.method == "ica":
        components = decomp.ica(prepared, args.components, seed=args.seed)
    else:
        components = decomp.cluster(prepared, args.components, seed=args.seed, whiten=args.whiten)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    components.save(out / "components.safetensors")
    spectrum = decomp.pca(prepared, min(len(sketch), sketch.features.shape[1], 200))
    plot_spectrum(spectrum, out / "spectrum.png")
    lines = [f"# Components of {args.store}", "",
             f"{len(sketch)} examples x {sketch.features.shape[1]} features (output {sketch.config.get('output')!r}); "
             f"{args.method} with {args.components} components; sign_by={args.sign_by}, normalize={args.normalize}.",
             "", f"Spectrum: {spectrum.components_for(0.5)} components hold 50% of the variance, "
             f"{spectrum.components_for(0.9)} hold 90% (of the first {spectrum.n_components}); effective rank "
             f"{spectrum.effective_rank():.1f}.", "", "![spectrum](spectrum.png)", ""]
    texts, labels = None, None
    if args.data:
        data = load_data(args.data, split=args.split, text_column=args.text_column, label_column=args.label_column,
                         max_examples=None)
        rows = sketch.indices.tolist()
        if max(rows) >= len(data):
            raise CommandError(f"the sketch holds example {max(rows)}, but {args.data} has {len(data)} rows")
        texts = [data[i][args.text_column] for i in rows] if args.text_column in data.column_names else None
        if args.label_column:
            labels = np.array([data[i][args.label_column] for i in rows])
    elif sketch.labels is not None:
        labels = sketch.labels.numpy()
    if labels is not None:
        alignment = components.align(labels, k=args.top)
        plot_alignment(alignment, out / "alignment.png")
        lines += ["## Alignment with the labels", "", alignment.to_markdown(), "![alignment](alignment.png)", ""]
        (out / "alignment.json").write_text(json.dumps({"nmi": alignment.nmi, "ami": alignment.ami,
                                                         "purity": alignment.purity}, indent=1))
    if texts is not None:
        lines += ["## Top examples", "", top_examples_markdown(components, texts, labels=None if labels is None
                                                              else list(labels), k=args.examples)]
    (out / "summary.md").write_text("\n".join(lines))
    print(f"{components.kind} components -> {out}/ (components.safetensors, spectrum.png, summary.md"
          f"{', alignment.png' if labels is not None else ''})")


def command_merge(args):
    import decomp
    if not Path(args.recipe).exists():
        raise CommandError(f"recipe {args.recipe} does not exist")
    decomp.merge_recipe(args.recipe, args.output)
    print(f"merged -> {args.output}")


def command_evaluate(args):
    from .finetune import accuracy
    data, model, tokenizer = _data_and_model(args, "classification")
    value = accuracy(model, tokenizer, list(data[args.text_column]), list(data[args.label_column]),
                     batch_size=args.batch_size, max_length=args.max_length)
    print(json.dumps({"model": args.model, "data": args.data, "examples": len(data), "accuracy": value}))


def command_demo(args):
    from .demo import run_demo
    results = run_demo(args.output, quick=args.quick)
    print(f"decomp demo: {results['total_seconds']:.0f} s; open {Path(args.output) / 'report.html'} in a browser "
          f"(tables also in results.md, numbers in results.json)")


def command_report(args):
    from .demo import rerender
    print(f"report -> {rerender(args.directory)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decomp", description="Decompose models into components from per-example "
                                     "gradients, and merge models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fisher = commands.add_parser("fisher", help="diagonal Fisher of a model over a dataset, as safetensors")
    _model_arguments(fisher)
    _data_arguments(fisher)
    fisher.add_argument("-o", "--output", required=True, help="output .safetensors file")
    fisher.add_argument("--kind", choices=["exact", "sampled", "empirical"], default="exact")
    fisher.add_argument("--seed", type=int, default=0)
    fisher.set_defaults(run=command_fisher)

    sketch = commands.add_parser("sketch", help="sketched per-example gradients into a resumable store folder")
    _model_arguments(sketch)
    _data_arguments(sketch)
    sketch.add_argument("-o", "--output", required=True, help="store folder (a second call resumes it)")
    sketch.add_argument("--output-kind", default="logprob", choices=["logprob", "predicted", "sampled", "loss",
                                                                      "logit"], help="the scalar differentiated")
    sketch.add_argument("--seed", type=int, default=0)
    sketch.add_argument("--k-out", type=int, default=8)
    sketch.add_argument("--k-in", type=int, default=8)
    sketch.add_argument("--k-vector", type=int, default=512)
    sketch.add_argument("--k", type=int, default=None, help="second-stage size (default: none)")
    sketch.set_defaults(run=command_sketch)

    decompose = commands.add_parser("decompose", help="components of a sketch store, with plots and a summary")
    decompose.add_argument("store", help="a store folder written by `decomp sketch`")
    decompose.add_argument("-o", "--output", required=True, help="output folder")
    decompose.add_argument("--method", choices=["pca", "ica", "kmeans"], default="ica")
    decompose.add_argument("-r", "--components", type=int, default=8, help="components (clusters for kmeans)")
    decompose.add_argument("--sign-by", choices=["predictions", "labels"], default=None)
    decompose.add_argument("--normalize", action="store_true", help="scale examples to unit length")
    decompose.add_argument("--whiten", type=int, default=None, help="kmeans on this many whitened components")
    decompose.add_argument("--seed", type=int, default=0)
    decompose.add_argument("--top", type=int, default=30, help="top-k examples for purity")
    decompose.add_argument("--examples", type=int, default=5, help="examples shown per component and sign")
    decompose.add_argument("--data", default=None, help="the sketched data, for texts and labels")
    decompose.add_argument("--split", default="train")
    decompose.add_argument("--text-column", default="text")
    decompose.add_argument("--label-column", default=None)
    decompose.set_defaults(run=command_decompose)

    merge = commands.add_parser("merge", help="merge models by a YAML recipe into a save_pretrained folder")
    merge.add_argument("recipe", help="YAML: method, models (path, weight), base, fishers, heads, parameters")
    merge.add_argument("-o", "--output", required=True, help="output folder")
    merge.set_defaults(run=command_merge)

    evaluate = commands.add_parser("evaluate", help="accuracy of a sequence classifier on labelled data")
    _model_arguments(evaluate)
    _data_arguments(evaluate, labels_required=True)
    evaluate.set_defaults(run=command_evaluate)

    demo = commands.add_parser("demo", help="the built-in demo on MiniLM and real data: decomposition, merging, "
                                            "report.html")
    demo.add_argument("-o", "--output", default="decomp-demo", help="output folder (default: decomp-demo)")
    demo.add_argument("--quick", action="store_true", help="fewer examples and grid points (a few minutes)")
    demo.set_defaults(run=command_demo)

    report = commands.add_parser("report", help="re-render report.html and results.md of a demo folder")
    report.add_argument("directory", help="a folder written by `decomp demo`")
    report.set_defaults(run=command_report)
    return parser


DISTRIBUTED_COMMANDS = ("fisher", "sketch")


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from .. import distributed
    launched = distributed.init_from_environment()   # under torchrun: one process group for the whole command
    try:
        if launched and args.command not in DISTRIBUTED_COMMANDS:
            raise CommandError(f"`decomp {args.command}` runs in one process; run it without torchrun (only "
                               f"{' and '.join(DISTRIBUTED_COMMANDS)} shard their work across processes)")
        args.run(args)
    except (CommandError, ValueError, FileNotFoundError, KeyError, OSError, FloatingPointError) as error:
        if os.environ.get("DECOMP_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"decomp {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        if launched:
            import torch.distributed as dist
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
