"""Loading the command line's inputs, each checked so that bad input fails early, as one line naming the argument:
data (a local csv/json/jsonl/parquet file or a Hub dataset), models (a save_pretrained folder or a Hub name) and
merge recipes (YAML, with the Fisher files they name)."""

from __future__ import annotations

import codecs
from pathlib import Path

from .errors import CommandError, first_line, root_cause

LOCAL_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SNIFF_BYTES = 1 << 16


def _check_content(path: Path, kind: str, source: str) -> None:
    """Empty, binary or non-UTF-8 files fail here with a message, before the parser's less telling one."""
    if path.stat().st_size == 0:
        raise CommandError(f"data file {source} is empty")
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    if kind == "parquet":
        if not head.startswith(b"PAR1"):
            raise CommandError(f"data file {source} is not a parquet file (no PAR1 magic)")
        return
    if b"\x00" in head:
        raise CommandError(f"data file {source} is binary, not {kind} text")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as error:
        raise CommandError(f"data file {source} is not UTF-8 text (byte {error.start}); convert it to UTF-8 "
                           f"{kind}") from error


def _load_local(path: Path, source: str):
    import datasets
    if not path.exists():
        raise CommandError(f"data file {source} does not exist")
    kind = LOCAL_FORMATS.get(path.suffix.lower())
    if kind is None or not path.is_file():
        raise CommandError(f"data {source} is not a csv, json, jsonl or parquet file")
    _check_content(path, kind, source)
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as error:   # datasets wraps the parser's error: the innermost one says what is wrong
        cause = root_cause(error)
        if "corresponds to no data" in str(cause):
            raise CommandError(f"data file {source} holds no examples") from error
        raise CommandError(f"could not read {source} as {kind}: {first_line(cause)[:200]}") from error


def _load_hub(source: str, split: str):
    import datasets
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as error:  # the Hub's errors are long; the first line says what happened
        raise CommandError(f"could not load dataset {source!r} (split {split!r}): "
                           f"{first_line(error)[:200]}") from error


def _check_cells(data, source: str, column: str, flag: str) -> None:
    for row, value in enumerate(data[column]):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise CommandError(f"data {source}: example {row + 1} has an empty {column!r} cell ({flag}); fill in "
                               f"or drop that row")


def load_data(source: str, *, split: str, text_column: str, label_column: str | None, max_examples: int | None):
    """A datasets.Dataset from a local csv/json/parquet file or a Hub name, with its columns and cells checked."""
    import datasets
    datasets.disable_progress_bars()   # stderr is for the one line of an error
    path = Path(source)
    local = path.suffix.lower() in LOCAL_FORMATS or path.exists()
    data = _load_local(path, source) if local else _load_hub(source, split)
    for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column is not None and column not in data.column_names:
            raise CommandError(f"data {source} has no column {column!r} ({flag}); its columns are "
                               f"{', '.join(data.column_names)}")
    if max_examples is not None:
        data = data.select(range(min(max_examples, len(data))))
    if not len(data):
        raise CommandError(f"data {source} holds no examples")
    for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column is not None:
            _check_cells(data, source, column, flag)
    if label_column is not None and not isinstance(data[0][label_column], int):
        data = data.class_encode_column(label_column)   # string labels -> class ids, in sorted order
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
        raise CommandError(f"could not load model {source!r}: {first_line(error)[:200]}") from error
    architecture = (config.architectures or [""])[0]
    if task is None:
        task = ("seq2seq" if config.is_encoder_decoder else "causal_lm" if "CausalLM" in architecture or
                "LMHead" in architecture else "classification")
    classes = {"classification": transformers.AutoModelForSequenceClassification,
               "token_classification": transformers.AutoModelForTokenClassification,
               "causal_lm": transformers.AutoModelForCausalLM, "seq2seq": transformers.AutoModelForSeq2SeqLM}
    model = classes[task].from_pretrained(source)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:   # decoder-only tokenizers often lack one; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _recipe_path(recipe: Path, entry) -> Path:
    """A path named in a recipe: relative to the recipe's folder when it exists there (as merge_recipe resolves
    it), else as given."""
    beside = recipe.parent / str(entry)
    return beside if not Path(str(entry)).is_absolute() and beside.exists() else Path(str(entry))


def _check_fisher_file(recipe: Path, entry) -> None:
    from safetensors import safe_open
    path = _recipe_path(recipe, entry)
    if not path.is_file():
        raise CommandError(f"recipe {recipe}: Fisher file {entry} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:   # safetensors raises its own error types for a file that is not one of its own
        raise CommandError(f"recipe {recipe}: Fisher file {entry} is not a safetensors file "
                           f"({first_line(error)[:120]})") from error
    if "decomp" not in metadata:
        raise CommandError(f"recipe {recipe}: Fisher file {entry} holds no decomp Fisher (write one with "
                           f"`decomp fisher`)")


def read_recipe(source: str) -> dict:
    """The recipe's YAML mapping, checked: it parses to a mapping, and the Fisher files it names are decomp
    Fishers. The merge itself checks the rest (method, models, parameters)."""
    import yaml
    recipe = Path(source)
    if not recipe.is_file():
        raise CommandError(f"recipe {source} does not exist")
    try:
        spec = yaml.safe_load(recipe.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise CommandError(f"recipe {source} is not valid YAML{where}: "
                           f"{getattr(error, 'problem', None) or first_line(error)}") from error
    except UnicodeDecodeError as error:
        raise CommandError(f"recipe {source} is not a UTF-8 text file") from error
    if not isinstance(spec, dict):
        raise CommandError(f"recipe {source} must be a YAML mapping (method, models, ...); it holds a "
                           f"{type(spec).__name__}")
    for entry in spec.get("fishers") or []:
        _check_fisher_file(recipe, entry)
    return spec
