"""One registry that picks the backend for every op.

Each op registers its implementations with `register(op, backend, fn, supports=None)`. A call goes
through `dispatch(op, device, backend, **case)`: the requested backend (argument, else the
COLLAB_OPS_BACKEND environment variable), or the first of the device's priority list that is
available, has a kernel for the op and accepts the case. When nothing fits, the error lists every
backend that was considered and why it could not serve (as xformers' fmha dispatch does).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from . import _availability

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Best first. Triton is a second GPU path; on CPU tensors it only runs under TRITON_INTERPRET=1,
# which is for tests, so it is never picked automatically there.
PRIORITY = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}

# supports(**case) returns None when the implementation can serve the case, else the reason.
Supports = Callable[..., Optional[str]]


@dataclass(frozen=True)
class Implementation:
    op: str
    backend: str
    fn: Callable
    supports: Optional[Supports] = None


_REGISTRY: dict[str, dict[str, Implementation]] = {}
# Lists that `recording()` blocks are collecting into; empty outside such blocks.
_RECORDERS: list[list[Implementation]] = []


class BackendUnavailableError(RuntimeError):
    """No backend could serve the call; the message lists each candidate and its reason."""


def register(op: str, backend: str, fn: Callable, supports: Optional[Supports] = None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = Implementation(op, backend, fn, supports)


def registered_backends(op: str) -> tuple[str, ...]:
    return tuple(_REGISTRY.get(op, {}))


def requested_backend(backend: Optional[str]) -> Optional[str]:
    """The explicit argument wins over COLLAB_OPS_BACKEND; both are validated."""
    if backend is None:
        backend = os.environ.get("COLLAB_OPS_BACKEND") or None
        origin = "COLLAB_OPS_BACKEND"
    else:
        origin = "backend"
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{origin}={backend!r} is not a backend; expected one of {BACKENDS}")
    return backend


def why_not(op: str, backend: str, device: torch.device, case: dict) -> Optional[str]:
    """None when `backend` can run `op` on `device` for `case`, else the reason it cannot."""
    reason = _availability.unavailable_reason(backend, device)
    if reason is not None:
        return reason
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return f"no {backend} kernel for {op} yet"
    if impl.supports is not None:
        return impl.supports(**case)
    return None


def dispatch(op: str, device: torch.device, backend: Optional[str] = None, **case) -> Implementation:
    """The implementation of `op` that serves this call, or BackendUnavailableError saying why none can."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    wanted = requested_backend(backend)
    candidates = (wanted,) if wanted is not None else PRIORITY.get(device.type, ("reference",))
    reasons = []
    for name in candidates:
        reason = why_not(op, name, device, case)
        if reason is None:
            chosen = _REGISTRY[op][name]
            for recorder in _RECORDERS:
                recorder.append(chosen)
            return chosen
        reasons.append(f"  {name}: {reason}")
    raise BackendUnavailableError(
        f"no backend can run {op} on {device.type}:\n" + "\n".join(reasons)
    )


@contextlib.contextmanager
def recording() -> Iterator[list[Implementation]]:
    """Collects the implementation that every dispatch inside the block chooses (for tests and
    benchmarks that must say which backend ran)."""
    chosen: list[Implementation] = []
    _RECORDERS.append(chosen)
    try:
        yield chosen
    finally:
        _RECORDERS.remove(chosen)
