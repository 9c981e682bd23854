"""What each `decomp` command does, once its arguments are parsed (cli.py holds the parser and the error boundary).
Every command checks its output target and its cheap inputs (paths, columns, cells) before loading a model."""

from __future__ import annotations

import json
from pathlib import Path

from ..gradients.writing import write_folder
from .errors import CommandError
from .loading import check_model_source, load_data, load_model, read_recipe
from .outputs import REPLACE, claim, clear


def _data_and_model(args, task):
    """The data, then the model: the cheap checks (paths, columns) fail before any model is loaded."""
    check_model_source(args.model)
    data = load_data(args.data, split=args.split, text_column=args.text_column, label_column=args.label_column,
                     max_examples=args.max_examples)
    return (data, *load_model(args.model, task))


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def command_fisher(args):
    import decomp
    claim(args.output, "fisher", overwrite=args.overwrite)   # the save replaces a file atomically
    data, model, tokenizer = _data_and_model(args, args.task)
    fisher = decomp.compute_fisher(model, data, kind=args.kind, batch_size=args.batch_size, tokenizer=tokenizer,
                                   text_column=args.text_column, label_column=args.label_column,
                                   max_length=args.max_length, seed=args.seed)
    if _rank() == 0:    # every rank holds the same all-reduced Fisher; one writes it
        path = fisher.save(args.output, overwrite=args.overwrite)
        print(f"{fisher} -> {path}")


def command_sketch(args):
    import decomp
    if claim(args.output, "store", overwrite=args.overwrite, resumable=True) == REPLACE:
        _barrier()      # every rank has looked at the old store before rank 0 deletes it
        if _rank() == 0:
            clear(args.output, "store")
        _barrier()
    data, model, tokenizer = _data_and_model(args, args.task)
    sketch = decomp.sketch_gradients(model, data, seed=args.seed, store=args.output, output=args.output_kind,
                                     k_out=args.k_out, k_in=args.k_in, k_vector=args.k_vector, k=args.k,
                                     batch_size=args.batch_size, tokenizer=tokenizer, text_column=args.text_column,
                                     label_column=args.label_column, max_length=args.max_length)
    if _rank() == 0:
        print(f"{sketch} -> {args.output}")


def _components(args, sketch):
    """(the analysed features, the components)."""
    import decomp
    prepared = sketch
    if args.sign_by or args.normalize:
        prepared = decomp.prepare(sketch, sign_by=args.sign_by, normalize=args.normalize)
    if args.method == "pca":
        return prepared, decomp.pca(prepared, args.components)
    if args.method == "ica":
        return prepared, decomp.ica(prepared, args.components, seed=args.seed)
    return prepared, decomp.cluster(prepared, args.components, seed=args.seed, whiten=args.whiten)


def _texts_and_labels(args, sketch):
    """The sketched examples' texts and labels, from --data when given, else the labels the store holds."""
    import numpy as np
    if not args.data:
        return None, None if sketch.labels is None else sketch.labels.numpy()
    data = load_data(args.data, split=args.split, text_column=args.text_column, label_column=args.label_column,
                     max_examples=None)
    rows = sketch.indices.tolist()
    if max(rows) >= len(data):
        raise CommandError(f"the sketch holds example {max(rows)}, but {args.data} has {len(data)} rows")
    texts = [data[i][args.text_column] for i in rows] if args.text_column in data.column_names else None
    labels = np.array([data[i][args.label_column] for i in rows]) if args.label_column else None
    return texts, labels


def _write_components(args, sketch, folder: Path) -> list:
    """components.safetensors, the figures, alignment.json and summary.md in `folder`; returns the files."""
    import decomp
    from ..analysis.plots import plot_alignment, plot_spectrum, top_examples_markdown
    prepared, components = _components(args, sketch)
    texts, labels = _texts_and_labels(args, sketch)
    components.save(folder / "components.safetensors")
    spectrum = decomp.pca(prepared, max(1, min(len(sketch) - 1, sketch.features.shape[1], 200)))   # centred rank
    plot_spectrum(spectrum, folder / "spectrum.png")
    lines = [f"# Components of {args.store}", "",
             f"{len(sketch)} examples x {sketch.features.shape[1]} features (output {sketch.config.get('output')!r}); "
             f"{args.method} with {args.components} components; sign_by={args.sign_by}, normalize={args.normalize}.",
             "", f"Spectrum: {spectrum.components_for(0.5)} components hold 50% of the variance, "
             f"{spectrum.components_for(0.9)} hold 90% (of the first {spectrum.n_components}); effective rank "
             f"{spectrum.effective_rank():.1f}.", "", "![spectrum](spectrum.png)", ""]
    if labels is not None:
        alignment = components.align(labels, k=args.top)
        plot_alignment(alignment, folder / "alignment.png")
        lines += ["## Alignment with the labels", "", alignment.to_markdown(), "![alignment](alignment.png)", ""]
        (folder / "alignment.json").write_text(json.dumps({"nmi": alignment.nmi, "ami": alignment.ami,
                                                            "purity": alignment.purity}, indent=1))
    if texts is not None:
        lines += ["## Top examples", "", top_examples_markdown(components, texts, labels=None if labels is None
                                                              else list(labels), k=args.examples)]
    (folder / "summary.md").write_text("\n".join(lines))
    return sorted(p.name for p in folder.iterdir())


def command_decompose(args):
    import decomp
    out = Path(args.output)
    claim(out, "decompose", overwrite=args.overwrite)
    if not (Path(args.store) / "meta.json").exists():
        raise CommandError(f"{args.store} is not a sketch store (no meta.json): make one with `decomp sketch`")
    sketch = decomp.GradientSketch.load(args.store)
    files: list = []
    out.parent.mkdir(parents=True, exist_ok=True)
    # written whole into a hidden sibling, then moved into place (an earlier output is moved aside and deleted
    # last): no half-written output, and nothing beside it is touched
    write_folder(out, lambda partial: files.extend(_write_components(args, sketch, partial)),
                 recheck=lambda target: claim(target, "decompose", overwrite=args.overwrite), kill="decompose")
    components = decomp.Components.load(out / "components.safetensors")
    print(f"{components.kind} components -> {out}/ ({', '.join(files)})")


def command_merge(args):
    import decomp
    read_recipe(args.recipe)
    claim(args.output, "merge", overwrite=args.overwrite)   # in the CLI's words; the save checks again
    decomp.merge_recipe(args.recipe, args.output, overwrite=args.overwrite)
    print(f"merged -> {args.output}")


def command_evaluate(args):
    from .finetune import accuracy
    data, model, tokenizer = _data_and_model(args, "classification")
    value = accuracy(model, tokenizer, list(data[args.text_column]), list(data[args.label_column]),
                     batch_size=args.batch_size, max_length=args.max_length)
    print(json.dumps({"model": args.model, "data": args.data, "examples": len(data), "accuracy": value}))


def command_demo(args):
    from .demo import demo_sizes, run_demo
    demo_sizes(args.quick, dict(args.size))   # checked before the output folder is claimed
    if claim(args.output, "demo", overwrite=args.overwrite, resumable=True) == REPLACE:
        clear(args.output, "demo")
    results = run_demo(args.output, quick=args.quick, sizes=dict(args.size))
    print(f"decomp demo: {results['total_seconds']:.0f} s; open {Path(args.output) / 'report.html'} in a browser "
          f"(tables also in results.md, numbers in results.json)")


def command_report(args):
    from .report import rerender
    print(f"report -> {rerender(args.directory)}")
