"""Models and data: what kind of model this is, which inputs its forward takes, and batches from any data.

``data`` may be a ``datasets.Dataset`` (already tokenized, or with a text column and a tokenizer), any iterable
of batch dicts (a DataLoader, a list of dicts), or one batch dict. Batches come with the global index of each
example, so that everything random or stored is keyed by example, never by batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Iterator, Optional

import torch
from torch import Tensor

TASKS = ("classification", "causal_lm", "seq2seq", "token_classification")
LABEL_COLUMNS = ("labels", "label")
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "decoder_input_ids",
                 "decoder_attention_mask", "pixel_values")


def task_of(model) -> str:
    """The model's task: classification (logits [N, C]), causal_lm, seq2seq or token_classification."""
    name = type(model).__name__
    if name in _causal_lm_classes():
        return "causal_lm"
    if "SequenceClassification" in name or "ImageClassification" in name:   # BART's too, encoder-decoder or not
        return "classification"
    if "TokenClassification" in name:
        return "token_classification"
    if getattr(model.config, "is_encoder_decoder", False):
        return "seq2seq"
    if "CausalLM" in name or "LMHead" in name:
        return "causal_lm"
    raise ValueError(f"model must be a sequence-classification, causal-LM, token-classification or seq2seq "
                     f"model from transformers; got {name}, whose per-example output decomp cannot define")


def _causal_lm_classes() -> set:
    """transformers' causal-LM classes (BertGenerationDecoder and the like have no telling name)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is a dependency
        return set()
    return {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}


def encoder_modules(model) -> set:
    """ids of the modules that run on the encoder's sequence (all of them, unless encoder-decoder)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return {id(m) for m in model.get_encoder().modules()}
    return {id(m) for m in model.modules()}


def model_inputs(model, batch: Mapping, device) -> dict:
    """The batch entries the model's forward accepts, on its device. Left-padded batches get position ids
    counted from each example's first real token, so that padding never shifts positions."""
    accepted = inspect.signature(model.forward).parameters
    inputs = {key: batch[key].to(device) for key in _MODEL_INPUTS if key in batch and key in accepted}
    if task_of(model) == "seq2seq":
        if "labels" not in batch and "decoder_input_ids" not in batch:
            raise ValueError("a seq2seq model needs labels (or decoder_input_ids) in every batch; the batch has "
                             f"{sorted(batch)}")
        if "labels" in batch:
            inputs["labels"] = batch["labels"].to(device)   # the model shifts them into decoder inputs
    mask = inputs.get("attention_mask")
    if mask is not None and "position_ids" in accepted and "position_ids" not in inputs and not is_prefix(mask):
        start = position_start(model)   # RoBERTa-style tables count from padding_idx + 1
        inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0) + start
        if start:
            inputs["position_ids"].masked_fill_(~mask.bool(), start - 1)
    return inputs


def position_start(model) -> int:
    """The position id of a sequence's first token: padding_idx + 1 for learned position tables that reserve
    their padding row (RoBERTa and its descendants), else 0."""
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, torch.nn.Embedding):
            return 0 if module.padding_idx is None else module.padding_idx + 1
    return 0


def is_prefix(mask: Tensor) -> bool:
    """True when every row of the [N, T] mask is ones followed by zeros (right padding or none)."""
    mask = mask.bool()
    lengths = mask.sum(-1, keepdim=True)
    return bool(torch.equal(mask, torch.arange(mask.shape[-1], device=mask.device) < lengths))


def batches(data, *, batch_size: int = 32, tokenizer=None, text_column: Optional[str] = None,
            label_column: Optional[str] = None, max_length: Optional[int] = None, start: int = 0,
            max_examples: Optional[int] = None, shard=None) -> Iterator[tuple[Tensor, dict]]:
    """Yields (indices [B] int64, batch dict of tensors) from example `start` on, at most `max_examples` in all.

    A Dataset is read in order and padded per batch (right padding); iterables of batch dicts are used as they
    come (`start` must then fall on a batch boundary, which holds when resuming a run with the same batches).
    shard: a decomp.distributed.World; only the batches it owns are yielded (and, for a Dataset, collated), with
    their global indices, batch numbers counted from the first example whatever `start` is."""
    if isinstance(data, Mapping):
        data = [data]
    stop = None if max_examples is None else max_examples
    if _is_dataset(data):
        total = len(data) if stop is None else min(stop, len(data))
        collate = _dataset_collate(data, tokenizer, text_column, label_column, max_length)
        for first in range(start, total, batch_size):
            if shard is not None and not shard.owns(first // batch_size):
                continue
            last = min(first + batch_size, total)
            yield torch.arange(first, last), collate(data[first:last])
        return
    position = 0
    for number, batch in enumerate(data):
        if not isinstance(batch, Mapping):
            raise TypeError(f"data must be a datasets.Dataset or an iterable of batch dicts; got an item of type "
                            f"{type(batch).__name__}")
        size = _batch_size(batch)
        if stop is not None and position >= stop:
            return
        if position + size <= start:
            position += size
            continue
        if position < start:
            raise ValueError(f"cannot resume at example {start}: it falls inside a batch ({position}..."
                             f"{position + size}); resume with the batches of the interrupted run")
        if shard is not None and not shard.owns(number):
            position += size
            continue
        keep = size if stop is None else min(size, stop - position)
        batch = {key: value[:keep] if isinstance(value, Tensor) and value.dim() > 0 else value
                 for key, value in batch.items()}
        yield torch.arange(position, position + keep), batch
        position += size


def _batch_size(batch: Mapping) -> int:
    for key in ("input_ids", "pixel_values", "attention_mask", "labels"):
        if isinstance(batch.get(key), Tensor):
            return batch[key].shape[0]
    raise ValueError(f"a batch must hold an input_ids tensor [N, T]; got keys {sorted(batch)}")


def _is_dataset(data) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(data, datasets.Dataset)


def _dataset_collate(data, tokenizer, text_column, label_column, max_length):
    columns = list(data.column_names)
    label_column = label_column or next((c for c in LABEL_COLUMNS if c in columns), None)
    if label_column is not None and label_column not in columns:
        raise ValueError(f"label_column {label_column!r} is not a column of the data; columns are {columns}")
    tokenized = "input_ids" in columns
    if not tokenized:
        text_column = text_column or ("text" if "text" in columns else None)
        if text_column is None or text_column not in columns:
            raise ValueError(f"the data is not tokenized (no input_ids column) and has no text column "
                             f"{text_column or 'text'!r}; columns are {columns}: pass text_column=")
        if tokenizer is None:
            raise ValueError(f"the data holds raw text in column {text_column!r}: pass tokenizer= to tokenize it")
    if tokenized and len(data) and tokenizer is None and len({len(x) for x in data[:64]["input_ids"]}) > 1:
        raise ValueError("the data's input_ids have different lengths: pass tokenizer= so batches can be padded")

    def collate(rows: dict) -> dict:
        if tokenized:
            features = {k: rows[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in rows}
            if tokenizer is not None:
                batch = dict(tokenizer.pad(features, return_tensors="pt"))
            else:
                batch = {k: torch.tensor(v) for k, v in features.items()}
        else:
            batch = dict(tokenizer(list(rows[text_column]), padding=True, truncation=True,
                                   max_length=max_length, return_tensors="pt"))
        if label_column is not None:
            batch["labels"] = torch.as_tensor(rows[label_column])
        return batch

    return collate
