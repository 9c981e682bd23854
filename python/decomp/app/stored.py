"""Tensors kept on disk rather than in memory: a read-only mapping over a safetensors file that reads a tensor when
it is asked for and keeps nothing, so a run can hold many model-sized statistics (Fishers, Grams) at once."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


class StoredTensors(Mapping):
    """name -> tensor, read from a safetensors file at each lookup (the caller frees what it is done with)."""

    def __init__(self, path):
        from safetensors import safe_open
        self.path = Path(path)
        with safe_open(str(self.path), framework="pt") as handle:
            self._keys = list(handle.keys())
        self._known = set(self._keys)

    @classmethod
    def write(cls, tensors: Mapping, path) -> "StoredTensors":
        """Saves `tensors` to `path` (atomically, never through a link: gradients/writing.py) and returns the
        mapping that reads them back."""
        from safetensors.torch import save_file

        from ..gradients.writing import refuse_links, write_file
        refuse_links(path)
        plain = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        write_file(path, lambda partial: save_file(plain, str(partial)), what="the tensors", wrap=Exception)
        return cls(path)

    def __getitem__(self, name: str):
        if name not in self._known:
            raise KeyError(name)
        from safetensors import safe_open
        with safe_open(str(self.path), framework="pt") as handle:
            return handle.get_tensor(name)

    def __contains__(self, name) -> bool:
        return name in self._known

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"StoredTensors({str(self.path)!r}, {len(self)} tensors)"
