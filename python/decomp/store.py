"""A resumable row store: [N, K] float32 features plus example indices, labels and predictions, on disk.

Layout of a store directory: ``meta.json`` (configuration, column layout, number of committed rows) and one raw
little-endian file per column (``features.f32`` [rows, K], ``indices.i64``, ``labels.i64``, ``predictions.i64``,
-1 where unknown). Rows are appended and fsynced first, then ``meta.json`` is replaced atomically: after a kill,
the rows beyond the committed count are cut off on reopening, so a resumed run continues exactly where the
last committed batch ended.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

FORMAT = "decomp.sketch/1"
COLUMNS = {"features": np.float32, "indices": np.int64, "labels": np.int64, "predictions": np.int64}
_SUFFIX = {np.float32: "f32", np.int64: "i64"}


def column_path(root: Path, column: str) -> Path:
    return root / f"{column}.{_SUFFIX[COLUMNS[column]]}"


def write_meta(root: Path, meta: dict) -> None:
    partial = root / "meta.json.partial"
    partial.write_text(json.dumps(meta, indent=1, sort_keys=True))
    with open(partial, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, root / "meta.json")


def read_meta(root: Path) -> Optional[dict]:
    path = Path(root) / "meta.json"
    if not path.exists():
        return None
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{root} is not a decomp sketch store (format {meta.get('format')!r}, expected {FORMAT!r})")
    return meta


class RowStore:
    """Appends batches of rows to a store directory, committing each batch atomically."""

    def __init__(self, root, config: dict, dim: int, blocks: list):
        self.root = Path(root)
        meta = read_meta(self.root)
        if meta is None:
            if self.root.exists() and any(self.root.iterdir()):
                raise ValueError(f"store {self.root} exists and is not empty, but holds no decomp sketch; "
                                 f"choose a new directory")
            self.root.mkdir(parents=True, exist_ok=True)
            meta = {"format": FORMAT, "config": config, "dim": dim, "blocks": blocks, "rows": 0, "complete": False}
            for column in COLUMNS:
                column_path(self.root, column).write_bytes(b"")
            write_meta(self.root, meta)
        elif meta["config"] != config or meta["dim"] != dim:
            different = sorted(k for k in set(config) | set(meta["config"]) if config.get(k) != meta["config"].get(k))
            raise ValueError(f"store {self.root} holds a run with a different configuration ({', '.join(different)}"
                             f": {[meta['config'].get(k) for k in different]} there, {[config.get(k) for k in different]}"
                             f" now); use a new directory or the same settings to resume")
        self.meta = meta
        self._truncate()

    @property
    def rows(self) -> int:
        return self.meta["rows"]

    def _truncate(self) -> None:
        """Cuts off rows written after the last commit (a run killed between writing and committing)."""
        for column, dtype in COLUMNS.items():
            width = self.meta["dim"] if column == "features" else 1
            size = self.rows * width * np.dtype(dtype).itemsize
            path = column_path(self.root, column)
            if path.stat().st_size < size:
                raise ValueError(f"store {self.root} is damaged: {path.name} holds fewer rows than meta.json says")
            with open(path, "rb+") as handle:
                handle.truncate(size)

    def append(self, features: Tensor, indices: Tensor, labels: Optional[Tensor], predictions: Optional[Tensor]):
        n = features.shape[0]
        values = {"features": features, "indices": indices, "labels": labels, "predictions": predictions}
        for column, dtype in COLUMNS.items():
            value = values[column]
            array = np.full(n, -1, dtype=dtype) if value is None else value.detach().cpu().numpy().astype(dtype)
            with open(column_path(self.root, column), "ab") as handle:
                handle.write(np.ascontiguousarray(array).tobytes())
                handle.flush()
                os.fsync(handle.fileno())
        self.meta["rows"] += n
        write_meta(self.root, self.meta)

    def finish(self, extra: dict) -> None:
        self.meta.update(extra, complete=True)
        write_meta(self.root, self.meta)


def read_columns(root) -> tuple[dict, dict]:
    """(meta, columns): features as a copy-on-write memory map [rows, K] (nothing is read until used)."""
    root = Path(root)
    meta = read_meta(root)
    if meta is None:
        raise FileNotFoundError(f"{root} holds no decomp sketch (meta.json is missing)")
    rows, dim = meta["rows"], meta["dim"]
    columns = {}
    for column, dtype in COLUMNS.items():
        shape = (rows, dim) if column == "features" else (rows,)
        if rows == 0 or (column == "features" and dim == 0):
            columns[column] = torch.from_numpy(np.zeros(shape, dtype=dtype))
            continue
        array = np.memmap(column_path(root, column), dtype=dtype, mode="c", shape=shape)
        columns[column] = torch.from_numpy(array)
    return meta, columns
