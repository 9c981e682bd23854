"""A resumable row store: [N, K] float32 features plus example indices, labels and predictions, on disk.

Layout of a store directory: ``meta.json`` (configuration, column layout, a fingerprint of the model's weights;
the number of rows and ``complete`` once finished), one raw little-endian file per column (``features.f32``
[rows, K], ``indices.i64``, ``labels.i64``, ``predictions.i64``, -1 where unknown, and ``checksums.u32``, the
CRC-32 of each row's bytes in every other column) holding example i's row at row i, and ``progress-R.json`` for
each writing process R (the next example it resumes from, the rows it committed and a running CRC-32 of the
inputs of its committed batches: token ids, masks and labels, as batched). A batch's rows are written at their
examples' positions and fsynced first, then the progress file is replaced atomically: after a kill, a resumed run
rewrites from the last committed batch on, so it continues exactly where it stopped. Several processes (ranks of
torch.distributed) write disjoint rows of the same files, and the finished store reads as one [N, K] matrix in
example order, with no gather through one process.

A store never lies about what it holds: reopening it (to resume, or to reuse a finished run) with other settings,
other weights or other data is refused naming what differs, and committed rows are checked against their
checksums, so a truncated or damaged file is refused naming the file and its first bad row, never read as zeros.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

FORMAT = "decomp.sketch/2"
COLUMNS = {"features": np.float32, "indices": np.int64, "labels": np.int64, "predictions": np.int64,
           "checksums": np.uint32}
_SUFFIX = {np.float32: "f32", np.int64: "i64", np.uint32: "u32"}
_CHECKED = ("features", "indices", "labels", "predictions")   # the columns each row's checksum covers
DATA_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels", "decoder_input_ids",
             "decoder_attention_mask")
_FINGERPRINT_CHUNK = 1 << 24   # bytes copied to the host at a time when hashing weights


class DamagedStoreError(ValueError):
    """A store's files do not hold what its progress and checksums say was committed."""


def column_path(root: Path, column: str) -> Path:
    return root / f"{column}.{_SUFFIX[COLUMNS[column]]}"


def _row_bytes(column: str, dim: int) -> int:
    return (dim if column == "features" else 1) * np.dtype(COLUMNS[column]).itemsize


def _write_json(path: Path, value: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "w") as handle:
            handle.write(json.dumps(value, indent=1, sort_keys=True))
            handle.flush()
            os.fsync(handle.fileno())
        if path.name.startswith("progress-"):
            kill_point("progress")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedStoreError(f"{path} ({what}) cannot be read: {error}; the store is damaged") from None
    if not isinstance(value, dict):
        raise DamagedStoreError(f"{path} ({what}) holds a {type(value).__name__}, not an object; the store is "
                                f"damaged")
    return value


def write_meta(root: Path, meta: dict) -> None:
    _write_json(root / "meta.json", meta)


def read_meta(root) -> Optional[dict]:
    path = Path(root) / "meta.json"
    if not path.exists():
        return None
    meta = _read_json(path, "the store's manifest")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{root} is not a decomp sketch store of this version (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    missing = [key for key in ("config", "dim", "blocks", "rows", "complete") if key not in meta]
    if missing:
        raise DamagedStoreError(f"{path} lacks {', '.join(missing)}; the store is damaged")
    return meta


def _progress_files(root: Path) -> list:
    return sorted(root.glob("progress-*.json"))


def committed_rows(root) -> int:
    """Rows committed so far by every writer of an unfinished store."""
    return sum(int(_read_json(p, "a writer's progress").get("rows", 0)) for p in _progress_files(Path(root)))


def weights_fingerprint(model) -> str:
    """CRC-32 of every parameter's and buffer's name, shape, dtype and bytes (streamed, a chunk at a time, so a
    model on an accelerator is copied to the host a few MB at a time; the same on every device)."""
    crc = 0
    seen = set()
    with torch.no_grad():
        for kind, named in (("p", model.named_parameters()), ("b", model.named_buffers())):
            for name, tensor in named:
                if id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                crc = zlib.crc32(f"{kind}:{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode(), crc)
                flat = tensor.detach().reshape(-1)
                if flat.numel() == 0:
                    continue
                raw = flat.contiguous().view(torch.uint8)
                for start in range(0, raw.numel(), _FINGERPRINT_CHUNK):
                    crc = zlib.crc32(raw[start:start + _FINGERPRINT_CHUNK].cpu().numpy().tobytes(), crc)
    return f"{crc:08x}"


def data_digest(indices: Tensor, batch: dict, previous: int = 0) -> int:
    """The running CRC-32 of the examples' inputs, folded batch by batch: indices, token ids, masks, labels."""
    crc = zlib.crc32(indices.detach().to(torch.int64).cpu().contiguous().numpy().tobytes(), previous)
    for key in DATA_KEYS:
        value = batch.get(key)
        if isinstance(value, Tensor):
            value = value.detach().cpu().contiguous()
            crc = zlib.crc32(f"{key}:{tuple(value.shape)}:{value.dtype};".encode(), crc)
            if value.numel():
                crc = zlib.crc32(value.reshape(-1).view(torch.uint8).numpy().tobytes(), crc)
    return crc


def row_checksums(columns: dict, dim: int) -> np.ndarray:
    """[n] uint32: the CRC-32 of each row's bytes in the checked columns."""
    parts = [np.ascontiguousarray(columns[c]).reshape(len(columns["indices"]), -1).view(np.uint8) for c in _CHECKED]
    rows = np.concatenate(parts, axis=1) if parts[0].shape[0] else np.zeros((0, 0), np.uint8)
    return np.array([zlib.crc32(row.tobytes()) for row in rows], dtype=np.uint32)


def verify_rows(root: Path, dim: int, rows: range) -> None:
    """Raises DamagedStoreError naming the file and the first row in `rows` that is missing or does not match its
    checksum. Reads the rows once, a chunk at a time."""
    root = Path(root)
    if not len(rows):
        return
    for column in COLUMNS:
        path = column_path(root, column)
        held = path.stat().st_size // _row_bytes(column, dim) if path.exists() else 0
        if held < rows.stop:
            raise DamagedStoreError(f"store {root} is damaged: {path.name} holds {held} rows, fewer than the "
                                    f"{rows.stop} committed; first bad row {max(held, rows.start)}. Use a new "
                                    f"directory (or delete this one) and run again")
    chunk = max(1, (1 << 26) // max(1, dim * 4 + 28))
    for start in range(rows.start, rows.stop, chunk):
        stop = min(start + chunk, rows.stop)
        columns = {}
        for column, dtype in COLUMNS.items():
            width = dim if column == "features" else 1
            with open(column_path(root, column), "rb") as handle:
                handle.seek(start * _row_bytes(column, dim))
                raw = handle.read((stop - start) * _row_bytes(column, dim))
            columns[column] = np.frombuffer(raw, dtype=dtype).reshape(stop - start, width)
        bad = np.nonzero(row_checksums(columns, dim) != columns["checksums"][:, 0])[0]
        if len(bad):
            raise DamagedStoreError(f"store {root} is damaged: row {start + int(bad[0])} does not match its "
                                    f"checksum (first bad row {start + int(bad[0])} of the {rows.stop} committed). "
                                    f"Use a new directory (or delete this one) and run again")


def _differences(theirs: dict, ours: dict) -> list:
    return sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))


class RowStore:
    """Writes batches of rows into a store directory, committing each batch atomically. `rank` names this
    writer's progress file; with several writers, rank 0 opens the store first (creating it). `weights`
    (weights_fingerprint of the model) is recorded by a new store and must match an existing one."""

    def __init__(self, root, config: dict, dim: int, blocks: list, rank: int = 0, weights: Optional[str] = None):
        from .writing import refuse_links
        self.root = Path(root)
        refuse_links(self.root, "store")   # a store is a folder of plain files: a link is never written through
        meta = read_meta(self.root)
        if meta is None:
            if rank != 0:
                raise ValueError(f"store {self.root} was not created by rank 0")
            if self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir())):
                raise ValueError(f"store {self.root} exists and is not an empty directory, but holds no decomp "
                                 f"sketch; choose a new directory")
            self.root.mkdir(parents=True, exist_ok=True)
            meta = {"format": FORMAT, "config": config, "dim": dim, "blocks": blocks, "rows": 0, "complete": False,
                    "weights": weights}
            for column in COLUMNS:
                column_path(self.root, column).write_bytes(b"")
            write_meta(self.root, meta)
        else:
            self._check(meta, config, dim, weights)
        self.meta = meta
        self.rank = rank
        self.progress_path = self.root / f"progress-{rank}.json"
        if self.progress_path.exists():
            self.progress = _read_json(self.progress_path, "this writer's progress")
            if not all(isinstance(self.progress.get(k), int) for k in ("next", "rows")):
                raise DamagedStoreError(f"{self.progress_path} lacks next/rows; the store is damaged")
        elif meta["complete"]:
            self.progress = {"next": meta["rows"], "rows": meta["rows"] if rank == 0 else 0, "data": None}
        else:
            self.progress = {"next": 0, "rows": 0, "data": 0}
        self.progress.setdefault("data", None)
        if meta["complete"]:
            verify_rows(self.root, dim, range(meta["rows"]))
        elif config.get("world_size", 1) == 1:   # one writer: its committed rows are 0 .. next - 1
            verify_rows(self.root, dim, range(self.progress["next"]))
        # (several writers: each committed batch's rows are checked as the resumed run re-reads it)

    def _check(self, meta: dict, config: dict, dim: int, weights: Optional[str]) -> None:
        if meta["config"] != config or meta["dim"] != dim:
            different = _differences(meta["config"], config)
            raise ValueError(f"store {self.root} holds a run with a different configuration ({', '.join(different)}"
                             f": {[meta['config'].get(k) for k in different]} there, {[config.get(k) for k in different]}"
                             f" now); use a new directory or the same settings to resume")
        if weights is not None and meta.get("weights") != weights:
            if meta.get("weights") is None:
                raise ValueError(f"store {self.root} was saved from a GradientSketch and records no model weights: "
                                 f"load it with GradientSketch.load, or use a new directory to sketch again")
            raise ValueError(f"store {self.root} was written with other model weights (fingerprint "
                             f"{meta['weights']} there, {weights} now; model {meta['config'].get('model')!r}): use "
                             f"a new directory, or the same checkpoint to resume")

    @property
    def next_example(self) -> int:
        """The example this writer resumes from: the one after its last committed batch."""
        return self.progress["next"]

    def check_data(self, digest: int, examples: int, more: bool) -> None:
        """Compares the running digest of the inputs of this writer's committed examples, recomputed from the data
        now given, with the recorded one; `more`: the data go on beyond them."""
        recorded = self.progress.get("data")
        if recorded is None:
            raise ValueError(f"store {self.root} records no digest of its data (saved from a GradientSketch): load "
                             f"it with GradientSketch.load, or use a new directory to sketch again")
        if digest != recorded or examples != self.progress["rows"]:
            raise ValueError(f"store {self.root} was written from other data: the inputs (token ids, masks, labels as "
                             f"batched) of its {self.progress['rows']} committed examples differ from those of the "
                             f"first {examples} examples given now (digest {recorded:08x} there, {digest:08x} now): "
                             f"use a new directory, or the same data, tokenizer and batch size to resume")
        if more and self.meta["complete"]:
            raise ValueError(f"store {self.root} holds a finished run of {self.meta['rows']} examples, and the data "
                             f"given now hold more: use a new directory, or the same data")

    def write(self, first: int, features: Tensor, indices: Tensor, labels: Optional[Tensor],
              predictions: Optional[Tensor], data: Optional[int] = None) -> None:
        """Writes a batch as rows first, first + 1, ... and commits it: this writer resumes from row first + n.
        `data`: the running digest of the inputs, this batch's included."""
        n = features.shape[0]
        values = {"features": features, "indices": indices, "labels": labels, "predictions": predictions}
        arrays = {}
        for column in _CHECKED:
            value, dtype = values[column], COLUMNS[column]
            arrays[column] = (np.full(n, -1, dtype=dtype) if value is None
                              else np.ascontiguousarray(value.detach().cpu().numpy().astype(dtype)))
        arrays["checksums"] = row_checksums(arrays, self.meta["dim"])
        progress = {"next": first + n, "rows": self.progress["rows"] + n, "data": data}
        try:
            for column in COLUMNS:
                with open(column_path(self.root, column), "r+b") as handle:
                    handle.seek(first * _row_bytes(column, self.meta["dim"]))
                    handle.write(arrays[column].tobytes())
                    handle.flush()
                    os.fsync(handle.fileno())
            kill_point("commit")
            _write_json(self.progress_path, progress)
        except OSError as error:
            raise OSError(error.errno, f"store {self.root}: writing the rows of examples {first}..{first + n - 1} "
                                       f"failed ({error.strerror or error}); the {self.progress['rows']} rows "
                                       f"committed before them are intact: free space (or fix the error) and call "
                                       f"again with the same store to resume") from error
        self.progress = progress

    def finish(self, rows: int, extra: dict) -> None:
        """Marks the store complete with `rows` rows (every writer's committed rows, which must cover 0..rows-1),
        cutting off anything a killed writer left beyond them, after checking every row against its checksum.
        Called by one writer after all have finished."""
        verify_rows(self.root, self.meta["dim"], range(rows))
        for column in COLUMNS:
            with open(column_path(self.root, column), "rb+") as handle:
                handle.truncate(rows * _row_bytes(column, self.meta["dim"]))
        self.meta.update(extra, rows=rows, complete=True)
        write_meta(self.root, self.meta)


_HOOK_COUNTS: dict = {}


def kill_point(point: str) -> None:
    """Fault injection for tests: DECOMP_TEST_KILL_AT=<point>[:<n>] SIGKILLs this process the n-th time (default
    the first) it passes `point` ("commit": a batch's rows written, its progress not yet; "progress": the new
    progress file written, not yet renamed; "fisher": a Fisher file written, not yet renamed; "merge": a merged
    folder written, not yet moved into place; "merge-swap": an earlier merge moved aside, the new one not yet in
    its place; see gradients/writing.py)."""
    wanted = os.environ.get("DECOMP_TEST_KILL_AT")
    if not wanted or wanted.split(":")[0] != point:
        return
    _HOOK_COUNTS[point] = _HOOK_COUNTS.get(point, 0) + 1
    if _HOOK_COUNTS[point] == int(wanted.split(":")[1] if ":" in wanted else 1):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def read_columns(root, verify: bool = True) -> tuple[dict, dict]:
    """(meta, columns): features as a copy-on-write memory map [rows, K] (nothing is read until used). With
    `verify`, a finished store's rows are first checked against their checksums (one read of the store)."""
    root = Path(root)
    meta = read_meta(root)
    if meta is None:
        raise FileNotFoundError(f"{root} holds no decomp sketch (meta.json is missing)")
    rows, dim = meta["rows"], meta["dim"]
    if meta["complete"]:
        if verify:
            verify_rows(root, dim, range(rows))
        else:   # at least never map beyond a file's end
            for column in COLUMNS:
                path = column_path(root, column)
                held = path.stat().st_size // _row_bytes(column, dim) if path.exists() else 0
                if held < rows:
                    raise DamagedStoreError(f"store {root} is damaged: {column_path(root, column).name} holds "
                                            f"{held} of its {rows} rows; first bad row {held}")
    columns = {}
    for column, dtype in COLUMNS.items():
        if column == "checksums":
            continue
        shape = (rows, dim) if column == "features" else (rows,)
        if rows == 0 or (column == "features" and dim == 0):
            columns[column] = torch.from_numpy(np.zeros(shape, dtype=dtype))
            continue
        array = np.memmap(column_path(root, column), dtype=dtype, mode="c", shape=shape)
        columns[column] = torch.from_numpy(array)
    return meta, columns
