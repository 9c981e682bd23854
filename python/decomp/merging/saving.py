"""Writing a merge: a save_pretrained folder with a model card naming the recipe and the inputs' content hashes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Sequence

import torch

from .sources import Source


def save_merged(state: Mapping, out_dir, *, like, recipe: Optional[dict] = None, inputs: Sequence = ()) -> Path:
    """Writes a save_pretrained folder (safetensors weights, config, tokenizer when `like` has one) and a model card
    naming the recipe and the inputs' content hashes. Written into a temporary sibling and renamed, so a failure
    leaves no partial folder."""
    from transformers import AutoTokenizer
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    template = like if isinstance(like, torch.nn.Module) else None
    if template is None:
        from transformers import AutoConfig, AutoModel
        config = AutoConfig.from_pretrained(like)
        architecture = (config.architectures or [None])[0]
        import transformers
        cls = getattr(transformers, architecture) if architecture and hasattr(transformers, architecture) else AutoModel
        template = cls.from_pretrained(like)
    missing = [k for k in template.state_dict() if k not in state]
    if missing:
        raise ValueError(f"the merged state lacks {len(missing)} tensors of the model, e.g. {missing[0]!r} (kept per "
                         f"task?): save one task's model with its head added")
    try:
        model = type(template)(template.config)
        model.load_state_dict(dict(state), strict=True)
        model.save_pretrained(partial)
        source = getattr(template.config, "_name_or_path", None) if not isinstance(like, (str, Path)) else like
        if source:
            try:
                AutoTokenizer.from_pretrained(source).save_pretrained(partial)
            except (OSError, ValueError):
                pass   # a model without a tokenizer folder: the weights and config are still complete
        recipe = dict(recipe or getattr(state, "recipe", {}) or {})
        hashes = [{"input": str(getattr(s, "path", None) or f"model {i}"), "sha256": s.fingerprint()}
                  for i, s in enumerate(Source(x, f"input {i}") for i, x in enumerate(inputs))]
        card = ["---", "library_name: transformers", "tags: [decomp, merge]", "---", "",
                "# Merged with decomp", "", "Recipe:", "", "```json", json.dumps(recipe, indent=2, default=str),
                "```", ""]
        if hashes:
            card += ["Inputs:", ""] + [f"- {h['input']}: sha256 {h['sha256']}" for h in hashes] + [""]
        (partial / "README.md").write_text("\n".join(card))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        partial.rename(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir
