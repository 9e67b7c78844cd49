"""collab_ops: fused kernels for large/small language-model collaboration.

The public ops (DESIGN.md): logit fusion and sampling, speculative verification, distillation
losses; `available_backends()` / `backend_status()` say what this build can run and why not the rest.
"""
from ._availability import available_backends, backend_status, warn_if_degraded
from ._dispatch import BackendUnavailableError
from . import presets
from .ops.distill import (
    attention_transfer_loss,
    fused_linear_kd_loss,
    hidden_cosine_loss,
    kd_loss,
    weak_to_strong_loss,
)
from .ops.fusion import dynamic_fusion_weights, fuse_logits, fused_sample
from .ops.speculative import speculative_verify

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "backend_status",
    "BackendUnavailableError",
    "presets",
    "fuse_logits",
    "fused_sample",
    "dynamic_fusion_weights",
    "speculative_verify",
    "kd_loss",
    "fused_linear_kd_loss",
    "weak_to_strong_loss",
    "attention_transfer_loss",
    "hidden_cosine_loss",
]

warn_if_degraded()
