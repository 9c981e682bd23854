"""Inputs of a merge, read lazily tensor by tensor: an nn.Module, a state dict, a safetensors file or a
save_pretrained folder, behind one small interface (keys, shape, dtype, get, fingerprint)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor


class Source:
    """Uniform, lazy access to the tensors of an nn.Module, a state dict, a safetensors file or a folder."""

    def __init__(self, model, name: str):
        self.name = name
        if isinstance(model, torch.nn.Module):
            self._tensors = model.state_dict()
            self.path = getattr(getattr(model, "config", None), "_name_or_path", None)
            self.model = model
        elif isinstance(model, Mapping):
            self._tensors, self.path, self.model = dict(model), None, None
        else:
            self.path, self.model = Path(model), None
            self._tensors = {}
            for file in _safetensors_files(self.path):
                reader = SafetensorsReader(file)
                self._tensors.update({key: reader for key in reader.entries})
        self.keys = list(self._tensors)

    def stored_in_out(self) -> Optional[frozenset]:
        """The module names whose weight is stored [in, out] (transformers' Conv1D), from the nn.Module itself or
        from a save_pretrained folder's architecture (built on the meta device: no weights); None when the source
        is a bare state dict or safetensors file, or its architecture cannot be built here."""
        if not hasattr(self, "_stored_in_out"):
            self._stored_in_out = _conv1d_modules(self.model, self.path)
        return self._stored_in_out

    def get(self, key: str, rows: Optional[slice] = None) -> Tensor:
        """The tensor `key`, or only its `rows` (a slice of the first dimension, step 1): a view of an in-memory
        tensor, or just those bytes read from a file."""
        value = self._tensors[key]
        if isinstance(value, Tensor):
            return value if rows is None else value[rows]
        return value.get(key, rows)

    def shape(self, key: str) -> tuple:
        value = self._tensors[key]
        return tuple(value.shape) if isinstance(value, Tensor) else tuple(value.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        value = self._tensors[key]
        return value.dtype if isinstance(value, Tensor) else value.dtype(key)

    def fingerprint(self) -> str:
        """A content hash (sha256 of the safetensors files, or of the tensors' bytes)."""
        digest = hashlib.sha256()
        if self.path is not None and Path(self.path).exists():
            for file in _safetensors_files(Path(self.path)):
                with open(file, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
            return digest.hexdigest()
        for key in sorted(self.keys):
            tensor = self.get(key).detach().cpu().contiguous()
            # the same bytes read as another dtype or shape are another model
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


class SafetensorsReader:
    """Reads single tensors from a safetensors file with plain reads (no memory map), so that what a merge has
    read is freed when it is done with it and resident memory tracks the tensors in use."""

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        header.pop("__metadata__", None)
        self.start = 8 + size
        self.entries = header

    def dtype(self, key: str) -> torch.dtype:
        return self.DTYPES[self.entries[key]["dtype"]]

    def get(self, key: str, rows: Optional[slice] = None) -> Tensor:
        """The tensor, or its `rows` (a slice of the first dimension, step 1): tensors are stored row-major, so
        those rows are one contiguous run of bytes."""
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        shape = list(entry["shape"])
        if rows is not None:
            start, stop, _ = rows.indices(shape[0])
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            begin, end = begin + start * row_bytes, begin + max(stop, start) * row_bytes
            shape[0] = max(stop - start, 0)
        with open(self.path, "rb") as handle:
            handle.seek(self.start + begin)
            data = bytearray(handle.read(end - begin))
        if not data:
            return torch.empty(shape, dtype=self.dtype(key))
        return torch.frombuffer(data, dtype=self.dtype(key)).reshape(shape)


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"model {path} does not exist")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model folder {path} holds no .safetensors file")
    return files


def _conv1d_modules(model, path) -> Optional[frozenset]:
    from ..gradients.rules import is_conv1d
    if model is None and path is not None and (Path(path) / "config.json").is_file():
        try:
            import transformers
            config = transformers.AutoConfig.from_pretrained(str(path))
            architecture = getattr(transformers, (config.architectures or [""])[0], None)
            if architecture is None:
                return None
            with torch.device("meta"):
                model = architecture(config)
        except Exception:   # an architecture this transformers cannot build: the layout stays unknown
            return None
    if model is None:
        return None
    return frozenset(name for name, module in model.named_modules() if is_conv1d(module))
