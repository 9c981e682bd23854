"""A resumable row store: [N, K] float32 features plus example indices, labels and predictions, on disk.

Layout of a store directory: ``meta.json`` (configuration, column layout; the number of rows and ``complete``
once finished), one raw little-endian file per column (``features.f32`` [rows, K], ``indices.i64``,
``labels.i64``, ``predictions.i64``, -1 where unknown) holding example i's row at row i, and ``progress-R.json``
for each writing process R (the next example it resumes from and the rows it committed). A batch's rows are
written at their examples' positions and fsynced first, then the progress file is replaced atomically: after a
kill, a resumed run rewrites from the last committed batch on, so it continues exactly where it stopped. Several
processes (ranks of torch.distributed) write disjoint rows of the same files, and the finished store reads as one
[N, K] matrix in example order, with no gather through one process.
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


def _write_json(path: Path, value: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1, sort_keys=True))
    with open(partial, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)


def write_meta(root: Path, meta: dict) -> None:
    _write_json(root / "meta.json", meta)


def read_meta(root: Path) -> Optional[dict]:
    path = Path(root) / "meta.json"
    if not path.exists():
        return None
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{root} is not a decomp sketch store (format {meta.get('format')!r}, expected {FORMAT!r})")
    return meta


def committed_rows(root) -> int:
    """Rows committed so far by every writer of an unfinished store."""
    return sum(json.loads(p.read_text())["rows"] for p in Path(root).glob("progress-*.json"))


class RowStore:
    """Writes batches of rows into a store directory, committing each batch atomically. `rank` names this
    writer's progress file; with several writers, rank 0 opens the store first (creating it)."""

    def __init__(self, root, config: dict, dim: int, blocks: list, rank: int = 0):
        self.root = Path(root)
        meta = read_meta(self.root)
        if meta is None:
            if rank != 0:
                raise ValueError(f"store {self.root} was not created by rank 0")
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
        self.progress_path = self.root / f"progress-{rank}.json"
        if self.progress_path.exists():
            self.progress = json.loads(self.progress_path.read_text())
        elif meta["complete"]:
            self.progress = {"next": meta["rows"], "rows": meta["rows"] if rank == 0 else 0}
        else:
            self.progress = {"next": 0, "rows": 0}

    @property
    def next_example(self) -> int:
        """The example this writer resumes from: the one after its last committed batch."""
        return self.progress["next"]

    def write(self, first: int, features: Tensor, indices: Tensor, labels: Optional[Tensor],
              predictions: Optional[Tensor]) -> None:
        """Writes a batch as rows first, first + 1, ... and commits it: this writer resumes from row first + n."""
        n = features.shape[0]
        values = {"features": features, "indices": indices, "labels": labels, "predictions": predictions}
        for column, dtype in COLUMNS.items():
            value = values[column]
            array = np.full(n, -1, dtype=dtype) if value is None else value.detach().cpu().numpy().astype(dtype)
            row_bytes = (self.meta["dim"] if column == "features" else 1) * np.dtype(dtype).itemsize
            with open(column_path(self.root, column), "r+b") as handle:
                handle.seek(first * row_bytes)
                handle.write(np.ascontiguousarray(array).tobytes())
                handle.flush()
                os.fsync(handle.fileno())
        self.progress = {"next": first + n, "rows": self.progress["rows"] + n}
        _write_json(self.progress_path, self.progress)

    def finish(self, rows: int, extra: dict) -> None:
        """Marks the store complete with `rows` rows (every writer's committed rows, which must cover 0..rows-1),
        cutting off anything a killed writer left beyond them. Called by one writer after all have finished."""
        for column, dtype in COLUMNS.items():
            size = rows * (self.meta["dim"] if column == "features" else 1) * np.dtype(dtype).itemsize
            path = column_path(self.root, column)
            if path.stat().st_size < size:
                raise ValueError(f"store {self.root} is damaged: {path.name} holds fewer than {rows} rows")
            with open(path, "rb+") as handle:
                handle.truncate(size)
        self.meta.update(extra, rows=rows, complete=True)
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
