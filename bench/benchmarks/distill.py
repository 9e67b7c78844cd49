"""Distillation losses, forward + backward: the fused LM-head JSD and kd_loss on materialised logits.

The naive baselines materialise [N, V] logits (and their fp32 softmax intermediates) on both
sides, which is where their memory goes; the fused op never holds an [N, V] tensor.
"""
from __future__ import annotations

import torch

from bench.harness import Case, CallOrReason, benchmark, public_op_call
from collab_ops.baselines import eager_forward_kl, eager_linear_jsd

LLAMA3_VOCAB = 128256
JSD_BETA = 0.5


def liger_call(student_hidden, student_weight, teacher_hidden, teacher_weight, device: torch.device) -> CallOrReason:
    if device.type != "cuda":
        return "Liger-Kernel runs on CUDA only"
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    except ImportError:
        return "not installed"
    except Exception as exc:
        return f"liger_kernel does not import ({type(exc).__name__}: {exc})"
    loss = LigerFusedLinearJSD(jsd_beta=JSD_BETA)
    return lambda: loss(student_hidden, student_weight, teacher_hidden, teacher_weight, None)  # no shift_labels


def _tensor(generator, *shape, dtype, device, scale=1.0, requires_grad=False) -> torch.Tensor:
    values = (scale * torch.randn(*shape, generator=generator, device=device)).to(dtype)
    return values.requires_grad_(requires_grad)


# kd_loss first: a run cut short by its time budget still times it (the fused case takes long).
@benchmark(
    "distill.kd_loss",
    cuda=[dict(N=4096, V=LLAMA3_VOCAB)],
    cpu=[dict(N=1024, V=32000)],
    quick=[dict(N=256, V=8192)],
)
def kd_loss(shape: dict, device: torch.device) -> Case:
    """kd_loss, forward KL, on bf16 logits: forward + backward to the student logits."""
    n, v = shape["N"], shape["V"]
    dtype = torch.bfloat16
    generator = torch.Generator(device=device).manual_seed(5)
    student = _tensor(generator, n, v, dtype=dtype, device=device, scale=3.0, requires_grad=True)
    teacher = _tensor(generator, n, v, dtype=dtype, device=device, scale=3.0)
    element = torch.finfo(dtype).bits // 8
    return Case(
        op="kd_loss",
        shape=f"N={n} V={v} forward_kl",
        dtype=dtype,
        bytes_moved=element * 3 * n * v + 4,  # read both logits, write the student's gradient
        eager=eager_forward_kl,
        eager_args=(student, teacher),
        ours=public_op_call("distill", "kd_loss", student, teacher),
        grad_wrt=(student,),
    )


@benchmark(
    "distill.fused_linear_jsd",
    cuda=[dict(N=512, H=4096, V=LLAMA3_VOCAB), dict(N=4096, H=4096, V=LLAMA3_VOCAB)],
    cpu=[dict(N=1024, H=256, V=32000)],
    quick=[dict(N=128, H=64, V=4096)],
)
def fused_linear_jsd(shape: dict, device: torch.device) -> Case:
    """fused_linear_kd_loss, JSD(beta=0.5), bf16: LM heads fused, vs materialised logits and Liger."""
    n, h, v = shape["N"], shape["H"], shape["V"]
    dtype = torch.bfloat16
    generator = torch.Generator(device=device).manual_seed(4)
    student_hidden = _tensor(generator, n, h, dtype=dtype, device=device, requires_grad=True)
    student_weight = _tensor(generator, v, h, dtype=dtype, device=device, scale=h**-0.5, requires_grad=True)
    teacher_hidden = _tensor(generator, n, h, dtype=dtype, device=device)
    teacher_weight = _tensor(generator, v, h, dtype=dtype, device=device, scale=h**-0.5)
    inputs = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    element = torch.finfo(dtype).bits // 8
    # Read both sides' hidden states and heads, write the student's two gradients and the loss.
    bytes_moved = element * (2 * (n * h + v * h) + (n * h + v * h)) + 4
    return Case(
        op="fused_linear_kd_loss",
        shape=f"N={n} H={h} V={v} jsd",
        dtype=dtype,
        bytes_moved=bytes_moved,
        eager=eager_linear_jsd,
        eager_args=(*inputs, JSD_BETA),
        ours=public_op_call("distill", "fused_linear_kd_loss", *inputs, divergence="jsd", beta=JSD_BETA),
        peers={"liger-kernel": liger_call(*inputs, device)},
        grad_wrt=(student_hidden, student_weight),
        # Two forward GEMMs (student, teacher) and the student's two backward GEMMs, 2*N*H*V each.
        flops=8.0 * n * h * v,
    )
