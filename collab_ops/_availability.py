"""What this build and this machine can run, and why the rest cannot.

Loading the compiled extension never raises: a missing or broken `collab_ops._C` leaves the
reference backend and records the reason, which `available_backends()` reports and one warning
states at import.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from functools import lru_cache
from typing import Optional

import torch

_C = None
_C_ERROR: Optional[str] = None

if importlib.util.find_spec(f"{__package__}._C") is None:
    _C_ERROR = "collab_ops._C is not built"
else:
    try:
        from . import _C  # noqa: F811  (registers torch.ops.collab_ops.*)
    except Exception as exc:  # e.g. an undefined symbol from a torch other than the one it was built with
        _C_ERROR = f"collab_ops._C did not load ({type(exc).__name__}: {exc})"


def extension():
    return _C


def compiled_with_cuda() -> bool:
    return _C is not None and bool(_C.compiled_with_cuda())


@lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:
        return f"triton failed to import ({type(exc).__name__}: {exc})"
    return None


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """None when `backend` can run on tensors of `device` here, else why not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend takes CPU tensors, not {device.type}"
        return _C_ERROR
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend takes CUDA tensors, not {device.type}"
        if _C is None:
            return _C_ERROR
        if not compiled_with_cuda():
            return "collab_ops._C was built without CUDA (set COLLAB_OPS_CUDA=1 with nvcc and a CUDA torch)"
        return None
    if backend == "triton":
        error = _triton_import_error()
        if error is not None:
            return error
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreter_enabled():
            return None
        return f"triton runs on CUDA tensors, or on CPU tensors only with TRITON_INTERPRET=1 (got {device.type})"
    return f"unknown backend {backend!r}"


def backend_status() -> dict[str, str]:
    """Every backend mapped to "available" or the reason this build or machine cannot run it."""
    cuda_visible = torch.cuda.is_available()
    status = {"reference": None, "cpu": _C_ERROR}
    if _C is None:
        status["cuda"] = _C_ERROR
    elif not compiled_with_cuda():
        status["cuda"] = unavailable_reason("cuda", torch.device("cuda"))
    elif not cuda_visible:
        status["cuda"] = "built with CUDA, but no CUDA device is visible"
    else:
        status["cuda"] = None
    triton_error = _triton_import_error()
    if triton_error is not None:
        status["triton"] = triton_error
    elif cuda_visible or triton_interpreter_enabled():
        status["triton"] = None
    else:
        status["triton"] = "no CUDA device is visible (TRITON_INTERPRET=1 runs it on CPU tensors)"
    return {name: reason or "available" for name, reason in status.items()}


def available_backends() -> list[str]:
    """The names of the backends that can run on some device here (see backend_status for the rest)."""
    return [name for name, reason in backend_status().items() if reason == "available"]


def warn_if_degraded() -> None:
    if _C_ERROR is not None:
        warnings.warn(
            f"{_C_ERROR}; only the reference backend is available. Rebuild with "
            "`pip install --no-build-isolation -e .` (see collab_ops.available_backends()).",
            RuntimeWarning,
            stacklevel=3,
        )
