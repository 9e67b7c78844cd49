"""Logit fusion: a proxy-tuning decoding step, fuse_logits, and dynamic fusion weights.

The eager baselines are what a user writes without collab_ops: one log_softmax per model, the
weighted sum, then softmax + multinomial (or log_softmax), each step a full pass over [B, V].
"""
from __future__ import annotations

import torch

from bench.harness import Case, benchmark, public_op_call
from collab_ops.baselines import eager_dynamic_fusion_weights, eager_fuse_logits, eager_proxy_tuning_step

QWEN25_VOCAB = 152064  # Qwen2.5-7B's padded vocabulary
QUICK_VOCAB = 32000
# Proxy-tuning with K=3 models: base_large + (tuned_small - base_small).
PROXY_TUNING_WEIGHTS = (1.0, 1.0, -1.0)
DYNAMIC_FUSION_GRID = tuple(round(0.1 * step, 1) for step in range(21))  # DESIGN.md's default 0..2


def triton_backend_call(device: torch.device, op_name: str, *args, **kwargs):
    """The op pinned to its triton backend, timed beside the dispatched (CUDA) one; CPU tensors
    would need Triton's interpreter, which is for tests, not timing."""
    if device.type != "cuda":
        return "the triton fusion kernels are timed on CUDA only (on the CPU they need the interpreter)"
    return public_op_call("fusion", op_name, *args, backend="triton", **kwargs)


def model_logits(count: int, batch: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int) -> list:
    generator = torch.Generator(device=device).manual_seed(seed)
    return [
        (3 * torch.randn(batch, vocab, generator=generator, device=device)).to(dtype) for _ in range(count)
    ]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


_PROXY_SHAPES = dict(
    cuda=[dict(B=b, K=3, V=QWEN25_VOCAB) for b in (1, 16, 128)],
    cpu=[dict(B=b, K=3, V=QWEN25_VOCAB) for b in (1, 4, 16, 64)],
    quick=[dict(B=b, K=3, V=QUICK_VOCAB) for b in (1, 8)],
)


@benchmark("fusion.proxy_tuning_sample", **_PROXY_SHAPES)
def proxy_tuning_sample(shape: dict, device: torch.device) -> Case:
    """One proxy-tuning decoding step: K=3 bf16 logits -> one sampled token per row."""
    logits = model_logits(shape["K"], shape["B"], shape["V"], torch.bfloat16, device, seed=0)
    return Case(
        op="fused_sample",
        shape=f"B={shape['B']} K={shape['K']} V={shape['V']}",
        dtype=torch.bfloat16,
        bytes_moved=_nbytes(logits) + shape["B"] * 8,
        eager=eager_proxy_tuning_step,
        eager_args=(logits, PROXY_TUNING_WEIGHTS),
        ours=public_op_call("fusion", "fused_sample", logits, list(PROXY_TUNING_WEIGHTS)),
        peers={"collab_ops (triton)": triton_backend_call(device, "fused_sample", logits, list(PROXY_TUNING_WEIGHTS))},
    )


@benchmark("fusion.fuse_logits", **_PROXY_SHAPES)
def fuse_logits(shape: dict, device: torch.device) -> Case:
    """fuse_logits: K=3 bf16 logits -> fp32 fused log-probs [B, V]."""
    logits = model_logits(shape["K"], shape["B"], shape["V"], torch.bfloat16, device, seed=1)
    return Case(
        op="fuse_logits",
        shape=f"B={shape['B']} K={shape['K']} V={shape['V']}",
        dtype=torch.bfloat16,
        bytes_moved=_nbytes(logits) + shape["B"] * shape["V"] * 4,
        eager=eager_fuse_logits,
        eager_args=(logits, PROXY_TUNING_WEIGHTS),
        ours=public_op_call("fusion", "fuse_logits", logits, list(PROXY_TUNING_WEIGHTS)),
        peers={"collab_ops (triton)": triton_backend_call(device, "fuse_logits", logits, list(PROXY_TUNING_WEIGHTS))},
    )


@benchmark(
    "fusion.dynamic_fusion_weights",
    cuda=[dict(B=16, V=QWEN25_VOCAB)],
    cpu=[dict(B=16, V=QWEN25_VOCAB)],
    quick=[dict(B=4, V=QUICK_VOCAB)],
)
def dynamic_fusion_weights(shape: dict, device: torch.device) -> Case:
    """dynamic_fusion_weights: one expert, 21-point grid, vs an eager loop over the candidates."""
    large, expert, base = model_logits(3, shape["B"], shape["V"], torch.bfloat16, device, seed=2)
    return Case(
        op="dynamic_fusion_weights",
        shape=f"B={shape['B']} experts=1 grid={len(DYNAMIC_FUSION_GRID)} V={shape['V']}",
        dtype=torch.bfloat16,
        bytes_moved=_nbytes((large, expert, base)) + shape["B"] * 4,
        eager=eager_dynamic_fusion_weights,
        eager_args=(large, expert, base, DYNAMIC_FUSION_GRID),
        # The op's default grid is DYNAMIC_FUSION_GRID (DESIGN.md).
        ours=public_op_call("fusion", "dynamic_fusion_weights", large, [expert], base),
    )
