"""Loading of the native core and the raw tensor views handed to it (no libtorch crosses the boundary)."""

from __future__ import annotations

from typing import Optional

import torch

try:
    from .. import _C
except ImportError as error:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "decomp's native core (decomp._C) is missing or failed to load: install the package with "
        "`pip install .` from a source checkout so that it is compiled"
    ) from error

_DTYPE_CODES = {
    torch.float32: _C.DType.float32,
    torch.bfloat16: _C.DType.bfloat16,
    torch.int64: _C.DType.int64,
    torch.int32: _C.DType.int32,
    torch.float64: _C.DType.float64,
}


def view(t: torch.Tensor) -> "_C.TensorView":
    """The raw view (pointer, shape, strides in elements, dtype, device) of a tensor the kernel reads or writes."""
    return _C.TensorView(t.data_ptr(), t.shape, t.stride(), _DTYPE_CODES[t.dtype], t.is_cuda,
                         t.get_device() if t.is_cuda else 0)


def optional_view(t: Optional[torch.Tensor]):
    return None if t is None else view(t)


def stream_of(t: torch.Tensor) -> int:
    """The handle of torch's current CUDA stream on t's device (0 for CPU tensors): kernels launch on it."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def num_threads() -> int:
    """CPU kernels use as many threads as torch does, so torch.set_num_threads governs both."""
    return torch.get_num_threads()


def build_info() -> dict:
    """How the native core was built: version, cuda_compiled, cuda_archs, openmp_threads, simd_width."""
    return dict(_C.build_info())
