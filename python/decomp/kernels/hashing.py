"""The counter-based hash (bit for bit the one of csrc/common/hash.h) and every stream id, in one place.

Everything random in decomp is a pure function of (seed, stream, row, word): sketches, sampled labels, DARE's
drops, per-block seeds. Streams keep those uses independent; they are declared here and nowhere else, so that
two uses can never share one by accident. Values live in int64 tensors holding uint32s.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF

# The native kernels hard-code 0..4 through the stream argument they are passed; the rest are Python-side.
STREAM_DENSE = 0        # sketch_dense / projection_matrix
STREAM_KRON_OUT = 1     # sketch_linear: S_out
STREAM_KRON_IN = 2      # sketch_linear: S_in
STREAM_COUNT_OUT = 3    # count_sketch_linear: h_out, s_out
STREAM_COUNT_IN = 4     # count_sketch_linear: h_in, s_in
STREAM_SAMPLE = 5       # labels drawn from the model (output="sampled", kind="sampled")
STREAM_DERIVE = 6       # per-block seeds of sketch_gradients
STREAM_DARE = 7         # DARE / DELLA drop masks

STREAMS = {name: value for name, value in globals().items() if name.startswith("STREAM_")}
assert len(set(STREAMS.values())) == len(STREAMS), f"stream ids must be unique: {STREAMS}"


def _mul32(x: Tensor, constant: int) -> Tensor:
    """(x * constant) mod 2^32, split in 16-bit halves so that no int64 product overflows."""
    high = ((x >> 16) * constant) & 0xFFFF
    return ((high << 16) + (x & 0xFFFF) * constant) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_row(seed: int, stream: int, rows: Tensor) -> Tensor:
    """The hash state of each row (int64 tensor of uint32 values)."""
    start = _mix32(torch.tensor((seed ^ 0x9E3779B9) & _MASK32, dtype=torch.int64))
    return _mix32(_mix32(start ^ stream) ^ rows.to(torch.int64))


def hash_word(state: Tensor, words: Tensor) -> Tensor:
    """hash32 of (row state, 64-bit word); broadcasts state against words."""
    words = words.to(torch.int64)
    return _mix32(_mix32(state ^ (words & _MASK32)) ^ (words >> 32))


def hash32(seed: int, stream: int, rows: Tensor, words: Tensor) -> Tensor:
    return hash_word(hash_row(seed, stream, rows), words)


def name_hash(name: str) -> int:
    """A stable 32-bit id of a name (a parameter, a tensor key), for use as a hash row."""
    return zlib.crc32(name.encode())
