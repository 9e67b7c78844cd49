"""The backends a test on CPU tensors can exercise: registered for the op and runnable on CPU
tensors here (triton only in its interpreter, i.e. when no GPU is visible; see conftest.py)."""
import torch

from collab_ops import _availability, _dispatch


def cpu_backends(op: str, candidates=("reference", "cpu", "triton")) -> list[str]:
    cpu = torch.device("cpu")
    return [
        b for b in candidates if b in _dispatch.registered_backends(op) and _availability.unavailable_reason(b, cpu) is None
    ]
