"""The backends a test on CPU tensors can exercise: registered for the op and runnable on CPU
tensors here (triton only in its interpreter, i.e. when no GPU is visible; see conftest.py)."""
import pytest
import torch

from collab_ops import BackendUnavailableError, _availability, _dispatch
from collab_ops.ops import distill as ops


def cpu_backends(op: str, candidates=("reference", "cpu", "triton")) -> list[str]:
    cpu = torch.device("cpu")
    return [
        b for b in candidates if b in _dispatch.registered_backends(op) and _availability.unavailable_reason(b, cpu) is None
    ]


def skip_if_sparse_teacher_refused(op: str, backend: str) -> None:
    """A compiled kernel may leave sparse teachers (teacher_indices) to the reference; its
    `supports` says why, and that reason becomes the skip's."""
    sparse = dict(teacher_logits=torch.zeros(1, 1), teacher_indices=torch.zeros(1, 1, dtype=torch.int64), backend=backend)
    try:
        if op == "kd_loss":
            ops.kd_loss(torch.zeros(1, 3), **sparse)
        elif op == "fused_linear_kd_loss":
            ops.fused_linear_kd_loss(torch.zeros(1, 2), torch.zeros(3, 2), **sparse)
        else:
            raise ValueError(f"{op} takes no sparse teacher")
    except BackendUnavailableError as refusal:
        pytest.skip(str(refusal))
