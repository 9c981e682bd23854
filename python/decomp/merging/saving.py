"""Writing a merge: a save_pretrained folder with a model card naming the recipe and the inputs' content hashes.

save_merged never deletes what it did not write: an existing non-empty target is refused unless overwrite=True,
and even then replaced only when it holds a decomp model card (a folder save_merged wrote); a link, or a folder
holding one, is always refused. The folder is written into a fresh hidden sibling and moved into place at the end,
so a failure (or a kill) leaves no trace and an existing merge is replaced only by a complete one (the policy of
every decomp writer: gradients/writing.py).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..gradients import writing
from .sources import Source

CARD_TITLE = "# Merged with decomp"   # the line that marks a folder as written by save_merged
DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "float64": torch.float64, "fp64": torch.float64}


def written_by_decomp(folder: Path) -> bool:
    """Whether `folder` holds a decomp merge's model card."""
    card = Path(folder) / "README.md"
    return card.is_file() and CARD_TITLE in card.read_text(errors="replace")


def check_target(out_dir, overwrite: bool = False) -> Path:
    """The target folder, or a FileExistsError when save_merged may not write it: a link or a folder holding one,
    a file, or a non-empty folder that is not a decomp merge (always), or is one and overwrite is False."""
    return writing.check_target(out_dir, overwrite=overwrite, ours=written_by_decomp, what="a merge written by decomp",
                                writer="save_merged", argument="out_dir", folder=True)


def resolve_dtype(dtype) -> Optional[torch.dtype]:
    """None, a torch floating dtype, or its name (float16, bfloat16, float32, float64 and mergekit's fp16...)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")


def save_merged(state: Mapping, out_dir, *, like, recipe: Optional[dict] = None, inputs: Sequence = (),
                dtype=None, tokenizer=None, overwrite: bool = False) -> Path:
    """Writes a save_pretrained folder (safetensors weights, config, tokenizer when `like` has one) and a model card
    naming the recipe and the inputs' content hashes.

    like: the model (or its folder) whose config the output takes; tokenizer: the folder whose tokenizer it takes
    (default: like's). dtype: the floating dtype of the saved weights (torch dtype or name; default: the model's).
    overwrite: replace an earlier merge written by save_merged (never anything else); see the module's
    docstring."""
    out_dir = check_target(out_dir, overwrite)
    dtype = resolve_dtype(dtype)
    template = _template(like)
    missing = [k for k in template.state_dict() if k not in state]
    if missing:
        raise ValueError(f"the merged state lacks {len(missing)} tensors of the model, e.g. {missing[0]!r} (kept per "
                         f"task?): save one task's model with its head added")
    created = _first_missing(out_dir.parent)   # folders made here, removed again if the save fails
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    def fill(partial: Path) -> None:
        model = type(template)(template.config)
        if dtype is not None:
            model.to(dtype)
        model.load_state_dict(dict(state), strict=True)
        _check_saved(model, dtype)
        model.save_pretrained(partial)
        source = tokenizer or (getattr(template.config, "_name_or_path", None)
                               if not isinstance(like, (str, Path)) else like)
        _copy_tokenizer(source, partial)
        (partial / "README.md").write_text(_card(dict(recipe or getattr(state, "recipe", {}) or {}), inputs))
    try:
        return writing.write_folder(out_dir, fill, recheck=lambda target: check_target(target, overwrite),
                                    kill="merge")
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _first_missing(folder: Path) -> Optional[Path]:
    """The outermost ancestor of `folder` (or itself) that does not exist yet, or None."""
    missing = None
    for candidate in [folder, *folder.parents]:
        if candidate.exists():
            break
        missing = candidate
    return missing


def _template(like) -> torch.nn.Module:
    if isinstance(like, torch.nn.Module):
        return like
    import transformers
    from transformers import AutoConfig, AutoModel
    config = AutoConfig.from_pretrained(like)
    architecture = (config.architectures or [None])[0]
    cls = getattr(transformers, architecture) if architecture and hasattr(transformers, architecture) else AutoModel
    return cls.from_pretrained(like)


def _check_saved(model: torch.nn.Module, dtype) -> None:
    """Every floating tensor of the model to save is finite (a cast to a narrower dtype may overflow)."""
    for key, value in model.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            from .engine import first_bad
            raise ValueError(f"tensor {key!r} is not finite once saved as {value.dtype} "
                             f"({first_bad(value, ~torch.isfinite(value))}){': pick a wider dtype' if dtype else ''}")


def _copy_tokenizer(source, folder: Path) -> None:
    if not source:
        return
    from transformers import AutoTokenizer
    try:
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    except (OSError, ValueError):
        pass   # a model without a tokenizer folder: the weights and config are still complete


def _card(recipe: dict, inputs: Sequence) -> str:
    hashes = [{"input": str(getattr(s, "path", None) or f"model {i}"), "sha256": s.fingerprint()}
              for i, s in enumerate(Source(x, f"input {i}") for i, x in enumerate(inputs))]
    card = ["---", "library_name: transformers", "tags: [decomp, merge]", "---", "", CARD_TITLE, "", "Recipe:", "",
            "```json", json.dumps(recipe, indent=2, default=str), "```", ""]
    if hashes:
        card += ["Inputs:", ""] + [f"- {h['input']}: sha256 {h['sha256']}" for h in hashes] + [""]
    return "\n".join(card)
