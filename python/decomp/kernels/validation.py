"""Argument checks shared by the ops: each error names the argument, what was expected and what was given."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_INPUTS = (torch.float32, torch.bfloat16)


def describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}"
    dtype = str(t.dtype).replace("torch.", "")
    return f"[{', '.join(str(s) for s in t.shape)}] {dtype} on {t.device}"


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return " or ".join(names)


def tensor(name: str, t, *, shape: str, ranks: Sequence[int], dtypes: Sequence[torch.dtype],
           device: Optional[torch.device] = None, device_of: str = "") -> None:
    """Checks rank, dtype and device; `shape` is the documented shape, quoted in the error."""
    ok = (isinstance(t, torch.Tensor) and t.dim() in ranks and t.dtype in dtypes
          and (device is None or t.device == device))
    if not ok:
        where = f" on the same device as {device_of}" if device_of else ""
        raise ValueError(f"{name} must be {shape} {dtype_names(dtypes)}{where}; got {describe(t)}")


def same_size(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name} must have {what} = {expected} in dimension {dim}; got {describe(t)}")


def lengths(t, n: int, device: torch.device) -> Optional[torch.Tensor]:
    """lengths [N] int64 (int32 accepted) on the inputs' device; returned contiguous int64."""
    if t is None:
        return None
    tensor("lengths", t, shape="[N]", ranks=(1,), dtypes=(torch.int64, torch.int32), device=device,
           device_of="the inputs")
    same_size("lengths", t, 0, n, "N")
    return t.to(torch.int64).contiguous()


def weights(t, n: int, device: torch.device) -> Optional[torch.Tensor]:
    """weights [N] floating on the inputs' device; returned contiguous float32."""
    if t is None:
        return None
    tensor("weights", t, shape="[N]", ranks=(1,), dtypes=(torch.float32, torch.float64, torch.bfloat16),
           device=device, device_of="the inputs")
    same_size("weights", t, 0, n, "N")
    return t.to(torch.float32).contiguous()


def out(t, shape: Sequence[int], device: torch.device) -> None:
    if (not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.shape != tuple(shape)
            or t.device != device or not t.is_contiguous()):
        expected = f"[{', '.join(str(s) for s in shape)}]"
        raise ValueError(f"out must be a contiguous {expected} float32 tensor on the inputs' device; "
                         f"got {describe(t)}")


# Value checks: they read the data, so they run inside the ops' implementations (eagerly, also under
# torch.compile) rather than in the traced wrappers.

def lengths_values(t: Optional[torch.Tensor], T: int) -> None:
    if t is not None and t.numel() and (bool((t < 0).any()) or bool((t > T).any())):
        raise ValueError(f"lengths must lie in [0, T={T}]; got values from {int(t.min())} to {int(t.max())}")


def weights_values(t: Optional[torch.Tensor]) -> None:
    if t is not None and t.numel() and not bool(((t >= 0) & torch.isfinite(t)).all()):
        bad = t[~((t >= 0) & torch.isfinite(t))][0].item()
        raise ValueError(f"weights must be finite and >= 0 (they weight squared gradients); got {bad}")


def valid_mask(lengths_t: Optional[torch.Tensor], N: int, T: int, device: torch.device) -> torch.Tensor:
    """[N, T] bool: True at each example's valid prefix."""
    if lengths_t is None:
        return torch.ones(N, T, dtype=torch.bool, device=device)
    return torch.arange(T, device=device)[None, :] < lengths_t[:, None]


def ids_values(ids: torch.Tensor, lengths_t: Optional[torch.Tensor], num_embeddings: int) -> None:
    valid = ids[valid_mask(lengths_t, ids.shape[0], ids.shape[1], ids.device)]
    if valid.numel() and (bool((valid < 0).any()) or bool((valid >= num_embeddings).any())):
        raise ValueError(f"ids must lie in [0, num_embeddings={num_embeddings}) at valid positions; got values "
                         f"from {int(valid.min())} to {int(valid.max())}")


SEED_LIMIT = 2 ** 32
DISTRIBUTIONS = ("rademacher", "gaussian")


def positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value!r}")


def seed(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**32); got {value!r}")


def offset(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
        raise ValueError(f"offset must be an int in [0, 2**63); got {value!r}")


def column_range(offset_value: int, columns: int) -> None:
    """Column indices offset .. offset + columns - 1 must stay below 2**63 (the generator's column counter)."""
    if offset_value + columns > 2 ** 63:
        raise ValueError(f"offset must leave room for the {columns} columns below 2**63 (offset + columns <= 2**63); "
                         f"got offset={offset_value}")


def choice(name: str, value, choices: Sequence) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def distribution(value) -> None:
    choice("dist", value, DISTRIBUTIONS)
