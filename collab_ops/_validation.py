"""Argument checks shared by the public ops.

They look at shapes, dtypes, devices and Python scalars only, so they never synchronise with the
device. Each error names the argument it is about.
"""
from __future__ import annotations

import functools
import math
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)


def check_tensor(
    name: str,
    value,
    *,
    ndim: Optional[int] = None,
    dtypes: Optional[Sequence[torch.dtype]] = None,
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(value.dtype).replace('torch.', '')}")
    return value


def check_float_tensor(name: str, value, *, ndim: Optional[int] = None) -> torch.Tensor:
    """A logits/probability/hidden-state tensor: fp32, bf16 or fp16."""
    return check_tensor(name, value, ndim=ndim, dtypes=FLOAT_DTYPES)


def check_same_device(named_tensors: Iterable[tuple[str, Optional[torch.Tensor]]]) -> torch.device:
    """All given tensors live on one device; returns it. None entries are skipped."""
    device = None
    first = None
    for name, tensor in named_tensors:
        if tensor is None:
            continue
        if device is None:
            device, first = tensor.device, name
        elif tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but {first} is on {device}; all inputs must share a device")
    if device is None:
        raise ValueError("no tensor inputs were given")
    return device


def check_dim_size(name: str, tensor: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if tensor.shape[dim] != expected:
        raise ValueError(
            f"{name} has size {tensor.shape[dim]} in dimension {dim} but {what} is {expected} "
            f"(shape {tuple(tensor.shape)})"
        )


def check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


# Reals at or above this magnitude round to ±inf in float32 (FLT_MAX plus half its last unit).
FLOAT32_OVERFLOW = 3.4028235677973366e38


def check_float32(name: str, value) -> float:
    """A real the kernels take as float32 (a fusion weight): finite before and after rounding."""
    value = check_real(name, value)
    if not abs(value) < FLOAT32_OVERFLOW:
        raise ValueError(f"{name} must be finite in float32 (|value| < 3.4e38), got {value}")
    return value


def host_constant_cache(maxsize: int):
    """functools.lru_cache for builders of small constant tensors that kernels only read (a
    decoding loop asks for the same ones every step). Builders name their device (device="cpu", or
    the one they are given), so a default-device context (`with torch.device(...)`,
    `torch.set_default_device`) cannot place a cached tensor. A
    cached tensor is built outside inference mode, so autograd may later save it; while torch.compile
    traces or a torch dispatch mode is active (FakeTensorMode, non-strict torch.export, make_fx) the
    builder runs each call and nothing is cached: a fake or traced tensor must not outlive its mode."""

    def decorate(build):
        @functools.lru_cache(maxsize=maxsize)
        def cached(*args):
            with torch.inference_mode(False):
                return build(*args)

        @functools.wraps(build)
        def get(*args):
            if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
                return build(*args)
            return cached(*args)

        get.cache_info, get.cache_clear = cached.cache_info, cached.cache_clear
        return get

    return decorate


def constant_float32_vector(name: str, values: Sequence) -> torch.Tensor:
    """The [K] CPU float32 tensor of K reals, each checked with check_float32 (named name[k]).
    A tuple or list of Python floats and ints is built once per distinct list (a decoding loop
    passes the same weights every step); callers and kernels never write the result."""
    values = tuple(values)
    if all(type(v) is float or type(v) is int for v in values):
        return _cached_float32_vector(name, values)
    return _cached_float32_vector.__wrapped__(name, values)  # bool, numpy scalars, ...: checked, not cached


@host_constant_cache(maxsize=256)
def _cached_float32_vector(name: str, values: tuple) -> torch.Tensor:
    checked = [check_float32(f"{name}[{k}]", v) for k, v in enumerate(values)]
    return torch.tensor(checked, dtype=torch.float32, device="cpu")


def check_positive(name: str, value) -> float:
    value = check_real(name, value)
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_in_range(name: str, value, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> float:
    value = check_real(name, value)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def check_int(name: str, value, *, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_seed(name: str, seed, *, device: torch.device, batch: int) -> None:
    """A seed `canonical_seed` accepts: None, an int that fits in int64, or an integer scalar or
    [batch] tensor on `device`. Builds nothing and draws nothing (for calls that ignore the seed)."""
    if seed is None:
        return
    if isinstance(seed, torch.Tensor):
        check_tensor(name, seed, dtypes=INDEX_DTYPES)
        if seed.dim() > 1 or (seed.dim() == 1 and seed.shape[0] != batch):
            raise ValueError(f"{name} must be a scalar or have shape ({batch},), got shape {tuple(seed.shape)}")
        if seed.device != device:
            raise ValueError(f"{name} is on {seed.device} but the inputs are on {device}")
        return
    seed = check_int(name, seed)
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"{name} must fit in int64, got {seed}")


def canonical_seed(name: str, seed, *, device: torch.device, batch: int) -> torch.Tensor:
    """The int64 seed tensor (shape () or [batch], on `device`) that sampling kernels take.

    None draws a fresh seed from torch's default CPU generator, so `torch.manual_seed` makes the
    call reproducible; an int becomes a scalar tensor; a tensor seed must already be an integer
    scalar or [batch] tensor on `device` (per-row seeds). Nothing here reads a device value.
    """
    check_seed(name, seed, device=device, batch=batch)
    if seed is None:
        seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    if isinstance(seed, torch.Tensor):
        return seed if seed.dtype == torch.int64 else seed.to(torch.int64)
    # A fill kernel, not a host-to-device copy: no synchronisation, and capturable in a CUDA graph.
    return torch.full((), seed, dtype=torch.int64, device=device)
