"""Where the command line writes: outputs never overwrite or delete what decomp did not write.

A target that does not exist, or an empty folder, is written. A target that holds an output of the same kind
(recognised by its content) is resumed where the kind resumes (a sketch store, a demo folder), and otherwise
replaced only with --overwrite. Anything else is refused, --overwrite or not: decomp does not know it wrote it; so
is a symbolic link, or a folder holding one (decomp never writes through or deletes a link)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from ..gradients.writing import refuse_links
from .errors import CommandError

NEW, RESUME, REPLACE = "new", "resume", "replace"

DECOMPOSE_FILES = ("components.safetensors", "summary.md", "spectrum.png", "alignment.png", "alignment.json")
DEMO_FILES = ("models", "figures", "results.json", "results.md", "report.html")


def _safetensors_metadata(path: Path):
    """The __metadata__ of a safetensors file's header, or None if the file is not one."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size < 100_000_000:
                return None
            header = json.loads(handle.read(size))
    except (OSError, ValueError):
        return None
    return header.get("__metadata__") or {} if isinstance(header, dict) else None


def _store_file(name: str) -> bool:
    from ..gradients.store import COLUMNS, column_path
    names = {"meta.json"} | {column_path(Path(), column).name for column in COLUMNS}
    return name.removesuffix(".partial") in names or re.fullmatch(r"progress-\d+\.json(\.partial)?", name) is not None


def _only(folder: Path, allowed) -> bool:
    """Whether every entry of `folder` is one a decomp output of this kind holds."""
    return all((allowed(p.name) if callable(allowed) else p.name in allowed) for p in folder.iterdir())


def _only_in(folder: Path, test) -> bool:
    return not folder.exists() or (folder.is_dir() and all(test(p) for p in folder.iterdir()))


def is_own(path: Path, kind: str) -> bool:
    """Whether `path` holds a decomp output of `kind` (fisher, store, decompose, merge or demo)."""
    if kind == "fisher":
        return path.is_file() and "decomp" in (_safetensors_metadata(path) or {})
    if not path.is_dir():
        return False
    if kind == "store":
        return (path / "meta.json").is_file() and _only(path, _store_file)
    if kind == "decompose":
        return (path / "components.safetensors").is_file() and _only(path, DECOMPOSE_FILES)
    if kind == "demo":
        return _only(path, DEMO_FILES) and _only_in(path / "models", lambda p: (p / "config.json").is_file() or
                                                    p.name.endswith(".partial")) and \
            _only_in(path / "figures", lambda p: p.suffix == ".png")
    if kind == "merge":
        from ..merging.saving import written_by_decomp
        return written_by_decomp(path)
    raise ValueError(f"unknown output kind {kind!r}")


WHAT = {"fisher": "a Fisher file", "store": "a sketch store", "decompose": "a components folder",
        "merge": "a merged model", "demo": "a demo folder"}


def claim(target, kind: str, *, overwrite: bool, resumable: bool = False) -> str:
    """NEW, RESUME or REPLACE: how the command may write `target`; a CommandError where it may not."""
    path = Path(target)
    folder = kind != "fisher"
    try:
        refuse_links(path, "--output")   # a link, or a folder holding one, is never written through or deleted
    except FileExistsError as error:
        raise CommandError(str(error)) from None
    if not path.exists():
        return NEW
    if folder != path.is_dir():
        raise CommandError(f"{target} is a {'file' if folder else 'folder'}; the output must be a "
                           f"{'folder' if folder else 'file'}")
    if folder and not any(path.iterdir()):
        return NEW
    if not is_own(path, kind):
        raise CommandError(f"{target} exists and holds something decomp did not write; decomp never overwrites "
                           f"it: choose another output path")
    if overwrite:
        return REPLACE
    if resumable:
        return RESUME
    raise CommandError(f"{target} exists ({WHAT[kind]} written by decomp); pass --overwrite to replace it")


def clear(target, kind: str) -> None:
    """Deletes an output of `kind` decomp wrote (checked again here), so the command starts afresh."""
    path = Path(target)
    if path.is_symlink() or not is_own(path, kind):
        raise CommandError(f"{target} holds something decomp did not write (or is a link); it is not deleted")
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
