"""Triton backend of kd_loss and fused_linear_kd_loss (canonical signatures: collab_ops.ops.distill).

kd_loss with reduction "mean"/"sum": one launch of the row kernel computes the loss and writes
the gradient (for grad_output 1), re-reading each row right after its first pass, backwards, so
that much of it still sits in L2; backward scales that gradient by grad_output in place, and a
row program whose scale is 1 (the usual loss.backward()) returns without touching it. Forward +
backward then reads both logit rows about once from memory and writes the gradient once, where a
separate backward launch would read both rows a second time. (The gradient is allocated in forward
and held until backward; a grad_output other than 1 rounds it to the logits' dtype twice.) With
reduction "none" the per-row weights come only with backward, so forward keeps four fp32 numbers
per row (the normalisers and C) and backward runs the kernel's gradient pass with them.

fused_linear_kd_loss (the Liger approach): positions are taken chunk_size at a time; per chunk the
student's logits (and the teacher's) come from cuBLAS in the input dtype with fp32 accumulation,
the row kernel writes ∂loss/∂logits over the student's logits in place, and two more GEMMs turn
that into grad_hidden (chunk rows) and grad_weight (accumulated across chunks). With reduction
"mean"/"sum" all of this happens in forward, so backward only scales the saved gradients by
grad_output, in place (one backward per graph). With "none" the per-row weights are known only in
backward, so forward computes the losses alone and backward recomputes the chunks with them.
Peak extra memory: the chunk's logit buffers plus grad_weight (in the weight's dtype: an fp32
accumulator for a 128256 × 4096 head would be 2 GiB; each chunk's GEMM accumulates in fp32 and
rounds once into it) and grad_hidden.

The kernels import triton on first use (see `_kernels`), so this module imports without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# A chunk's logit buffers (student + teacher) take about this much memory by default. At
# V=128256 in bf16 that is 512 positions, so the grad_weight GEMM (inner dimension = chunk) is
# compute bound instead of re-reading and re-writing the whole [V, H] gradient every 128 rows
# (Liger's rule, chunk logits ≈ hidden states, gives 128 rows at N=H=4096).
CHUNK_LOGITS_BUDGET_BYTES = 256 * 2**20
# Chunks are rounded down to a multiple of this many rows when larger (GEMM tile friendly).
CHUNK_ROW_MULTIPLE = 64
# Columns per block of the row kernel. On sm_90 a block of 4096 with 16 warps compiles to 128
# registers and no spills for every divergence (8192 spills); one program per SM then holds a
# 512 KiB bf16 row pair, so the reversed second pass finds most of it in L2. Under the
# interpreter, big blocks cost nothing but memory.
MAX_BLOCK_V_CUDA = 4096
NUM_WARPS_CUDA = 16
MAX_BLOCK_V_INTERPRETER = 1024
# Programs of the row kernel: None launches one per row (the GPU keeps as many in flight as fit);
# an int P makes at most P persistent programs share the rows, bounding the row pairs in flight
# (the L2 footprint of the second and third passes' re-reads) at P. bench/kd_triton_targets.py
# sweeps it on the GPU.
ROW_PROGRAMS = None


def _sparse_teacher_reason(teacher_indices) -> Optional[str]:
    if teacher_indices is not None:
        return "the triton kernels take a dense teacher; a sparse teacher (teacher_indices) runs on the reference backend"
    return None


def kd_loss_supports(*, teacher_indices=None, **_case) -> Optional[str]:
    return _sparse_teacher_reason(teacher_indices)


def fused_linear_kd_loss_supports(*, teacher_indices=None, **_case) -> Optional[str]:
    return _sparse_teacher_reason(teacher_indices)


def _kernels():
    from . import kd_kernels

    return kd_kernels


@dataclass(frozen=True)
class LossSpec:
    """The kernel's scalar options, derived once from the canonical keywords."""

    divergence: str
    beta: float
    inv_temperature: float
    soft_scale: float
    hard_weight: float
    ignore_index: int
    softcap: Optional[float]

    @property
    def has_soft(self) -> bool:
        return self.soft_scale != 0

    @property
    def has_hard(self) -> bool:
        return self.hard_weight != 0


def loss_spec(*, divergence, beta, temperature, scale_by_t2, soft_weight, hard_weight, ignore_index,
              logit_softcap=None) -> LossSpec:
    # The jsd endpoints and the skew KLs at β = 0 are the KL directions; running their own code
    # makes them exact (a mixture probability would underflow where a log-probability does not).
    if divergence in ("jsd", "skew_forward_kl") and beta == 0:
        divergence = "forward_kl"
    elif (divergence == "jsd" and beta == 1) or (divergence == "skew_reverse_kl" and beta == 0):
        divergence = "reverse_kl"
    return LossSpec(
        divergence=divergence,
        beta=float(beta),
        inv_temperature=1.0 / temperature,
        soft_scale=soft_weight * temperature**2 if scale_by_t2 else float(soft_weight),
        hard_weight=float(hard_weight),
        ignore_index=int(ignore_index),
        softcap=logit_softcap,
    )


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block_config(vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of `vocab` columns."""
    if device.type == "cuda":
        block = min(MAX_BLOCK_V_CUDA, _next_power_of_two(vocab))
        return block, max(1, min(NUM_WARPS_CUDA, block // 256))
    return min(MAX_BLOCK_V_INTERPRETER, _next_power_of_two(vocab)), 1


def launch_rows(
    spec: LossSpec,
    *,
    student: torch.Tensor,
    teacher: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    vocab: int,
    loss: Optional[torch.Tensor] = None,
    stats: Optional[torch.Tensor] = None,
    load_stats: bool = False,
    grad: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
    softcap_teacher: bool = False,
) -> None:
    """The row kernel over the rows of `student` (one program per row, or ROW_PROGRAMS persistent
    ones). Writes the per-row loss into `loss`, the statistics into
    `stats` (or reads them from it with load_stats), and the gradient into `grad` scaled by
    `row_scale` ([rows], or [1] for every row). `grad` may be `student` itself."""
    rows = student.shape[0]
    if rows == 0:
        return
    kernels = _kernels()
    block, num_warps = _block_config(vocab, student.device)
    unused = student  # a pointer the kernel never dereferences for a disabled feature
    if grad is not None:
        assert row_scale is not None and row_scale.dtype == torch.float32
    programs = rows if ROW_PROGRAMS is None else max(1, min(rows, ROW_PROGRAMS))
    kernels.kd_rows_kernel[(programs,)](
        student, student.stride(0),
        teacher if teacher is not None else unused, teacher.stride(0) if teacher is not None else 0,
        labels if labels is not None else unused,
        loss if loss is not None else unused,
        stats if stats is not None else unused,
        grad if grad is not None else unused, grad.stride(0) if grad is not None else 0,
        row_scale if row_scale is not None else unused,
        1 if row_scale is not None and row_scale.numel() > 1 else 0,
        vocab, grad.shape[1] if grad is not None else vocab, rows,
        spec.inv_temperature, spec.beta, spec.soft_scale, spec.hard_weight,
        spec.softcap if spec.softcap is not None else 1.0, spec.ignore_index,
        DIVERGENCE=kernels.DIVERGENCE_CODES[spec.divergence],
        HAS_LABELS=labels is not None,
        HAS_SOFT=spec.has_soft,
        HAS_HARD=spec.has_hard,
        HARD_SHARES_SOFT_STATS=spec.has_soft and spec.inv_temperature == 1.0,
        SOFTCAP_STUDENT=spec.softcap is not None,
        SOFTCAP_TEACHER=softcap_teacher and spec.softcap is not None,
        LOAD_STATS=load_stats,
        STORE_STATS=stats is not None and not load_stats,
        WRITE_LOSS=loss is not None,
        WRITE_GRAD=grad is not None,
        BLOCK_V=block,
        PERSISTENT=programs < rows,
        num_warps=num_warps,
    )


def _mean_denominator(labels, ignore_index, num_items_in_batch, num_positions, device) -> torch.Tensor:
    """What reduction="mean" divides by, as a 0-d fp32 tensor (no synchronisation)."""
    if num_items_in_batch is not None:
        return torch.as_tensor(num_items_in_batch, device=device).to(torch.float32).reshape(())
    if labels is None:
        return torch.tensor(float(max(num_positions, 1)), device=device)
    return (labels != ignore_index).sum().clamp(min=1).to(torch.float32)


def _reduce(per_position: torch.Tensor, reduction: str, denominator: Optional[torch.Tensor]) -> torch.Tensor:
    if reduction == "none":
        return per_position
    total = per_position.sum()
    return total / denominator if reduction == "mean" else total


def _row_scale(grad_output: torch.Tensor) -> torch.Tensor:
    """The per-position grad_output of reduction "none" as the kernel's row_scale."""
    return grad_output.to(torch.float32).reshape(-1).contiguous()


def scale_rows_in_place(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad[row] *= scale[row] ([rows], or [1] for every row), leaving rows whose scale is 1 untouched."""
    rows = grad.shape[0]
    if rows == 0:
        return
    block, num_warps = _block_config(grad.shape[1], grad.device)
    _kernels().scale_rows_kernel[(rows,)](grad, grad.stride(0), grad.shape[1], scale, 1 if scale.numel() > 1 else 0,
                                          BLOCK_V=block, num_warps=num_warps)


class _KDLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, spec, vocab, reduction, denominator):
        rows = student_logits.shape[0]
        device = student_logits.device
        per_position = torch.empty(rows, dtype=torch.float32, device=device)
        needs_grad = ctx.needs_input_grad[0]
        teacher = teacher_logits if spec.has_soft else None
        ctx.spec, ctx.vocab, ctx.reduction = spec, vocab, reduction
        ctx.eager = needs_grad and reduction != "none"
        if ctx.eager:
            grad = torch.empty(student_logits.shape, dtype=student_logits.dtype, device=device)
            ones = torch.ones(1, dtype=torch.float32, device=device)
            launch_rows(spec, student=student_logits, teacher=teacher, labels=labels, vocab=vocab, loss=per_position,
                        grad=grad, row_scale=ones / denominator if reduction == "mean" else ones)
            ctx.save_for_backward(grad)
            ctx.grad_consumed = False
        else:
            stats = None
            if needs_grad:
                stats = torch.empty((rows, _kernels().NUM_STATS.value), dtype=torch.float32, device=device)
            launch_rows(spec, student=student_logits, teacher=teacher, labels=labels, vocab=vocab, loss=per_position,
                        stats=stats)
            if needs_grad:
                ctx.save_for_backward(student_logits, teacher_logits, labels, stats)
        return _reduce(per_position, reduction, denominator)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.eager:
            if ctx.grad_consumed:
                raise RuntimeError(
                    "kd_loss (triton) with reduction 'mean'/'sum' computes its gradient in forward and scales it in "
                    "place in backward, so its graph supports a single backward; call the op again for a second one"
                )
            ctx.grad_consumed = True
            (grad,) = ctx.saved_tensors
            scale_rows_in_place(grad, grad_output.to(torch.float32).reshape(1))
            return grad, None, None, None, None, None, None
        student_logits, teacher_logits, labels, stats = ctx.saved_tensors
        grad = torch.empty(student_logits.shape, dtype=student_logits.dtype, device=student_logits.device)
        launch_rows(ctx.spec, student=student_logits, teacher=teacher_logits if ctx.spec.has_soft else None,
                    labels=labels, vocab=ctx.vocab, stats=stats, load_stats=True, grad=grad,
                    row_scale=_row_scale(grad_output))
        return grad, None, None, None, None, None, None


def kd_loss(student_logits, teacher_logits, labels, teacher_indices, *, divergence, beta, temperature,
            scale_by_t2, soft_weight, hard_weight, ignore_index, reduction, num_items_in_batch, vocab_size):
    assert teacher_indices is None, "kd_loss_supports refuses a sparse teacher"
    labels = None if labels is None else labels.contiguous()  # the kernel reads one label per row at unit stride
    spec = loss_spec(divergence=divergence, beta=beta, temperature=temperature, scale_by_t2=scale_by_t2,
                     soft_weight=soft_weight, hard_weight=hard_weight, ignore_index=ignore_index)
    denominator = None
    if reduction == "mean":
        denominator = _mean_denominator(labels, ignore_index, num_items_in_batch, student_logits.shape[0],
                                        student_logits.device)
    return _KDLossFunction.apply(student_logits, teacher_logits.detach(), labels, spec, vocab_size, reduction,
                                 denominator)


@dataclass(frozen=True)
class ChunkPlan:
    spec: LossSpec
    vocab: int
    chunk_size: int
    reduction: str


def default_chunk_size(num_positions: int, bytes_per_position: int) -> int:
    rows = max(1, CHUNK_LOGITS_BUDGET_BYTES // max(bytes_per_position, 1))
    if rows >= CHUNK_ROW_MULTIPLE:
        rows -= rows % CHUNK_ROW_MULTIPLE
    return max(1, min(rows, num_positions))


def _linear_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if bias is None:
        torch.mm(hidden, weight.t(), out=out)
    else:
        torch.addmm(bias, hidden, weight.t(), out=out)


def run_chunks(plan: ChunkPlan, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
               teacher_bias, teacher_logits, labels, *, per_position: Optional[torch.Tensor],
               row_scale: Optional[torch.Tensor], wanted: tuple[bool, bool, bool]):
    """Loss per position (into per_position, when given) and, for the student inputs flagged in
    `wanted`, their gradients with each row's loss weighted by row_scale ([N] or [1])."""
    vocab, spec = plan.vocab, plan.spec
    rows_total = student_hidden.shape[0]
    device = student_hidden.device
    want_hidden, want_weight, want_bias = wanted
    write_grad = any(wanted)
    weight = student_weight[:vocab]
    bias = student_bias[:vocab] if student_bias is not None else None
    computes_teacher = spec.has_soft and teacher_hidden is not None
    if computes_teacher:
        teacher_weight = teacher_weight[:vocab]
        teacher_bias = teacher_bias[:vocab] if teacher_bias is not None else None

    chunk = plan.chunk_size
    buffer_rows = min(chunk, rows_total)
    student_buffer = torch.empty((buffer_rows, vocab), dtype=student_weight.dtype, device=device)
    teacher_buffer = None
    if computes_teacher:
        teacher_buffer = torch.empty((buffer_rows, vocab), dtype=teacher_weight.dtype, device=device)
    grad_hidden = torch.empty_like(student_hidden) if want_hidden else None
    grad_weight = torch.zeros_like(student_weight) if want_weight else None
    grad_bias = torch.zeros(student_weight.shape[0], dtype=torch.float32, device=device) if want_bias else None
    per_row_scale = row_scale is not None and row_scale.numel() > 1

    for start in range(0, rows_total, chunk):
        rows = slice(start, min(start + chunk, rows_total))
        count = rows.stop - rows.start
        logits = student_buffer[:count]
        _linear_into(logits, student_hidden[rows], weight, bias)
        teacher_rows = None
        if computes_teacher:
            teacher_rows = teacher_buffer[:count]
            _linear_into(teacher_rows, teacher_hidden[rows], teacher_weight, teacher_bias)
        elif spec.has_soft:
            teacher_rows = teacher_logits[rows]
        launch_rows(
            spec, student=logits, teacher=teacher_rows, labels=None if labels is None else labels[rows], vocab=vocab,
            loss=None if per_position is None else per_position[rows],
            grad=logits if write_grad else None,
            row_scale=(row_scale[rows] if per_row_scale else row_scale) if write_grad else None,
            softcap_teacher=computes_teacher,
        )
        if want_hidden:
            torch.mm(logits, weight, out=grad_hidden[rows])
        if want_weight:
            grad_weight[:vocab].addmm_(logits.t(), student_hidden[rows])
        if want_bias:
            grad_bias[:vocab] += logits.sum(0, dtype=torch.float32)
    if grad_bias is not None:
        grad_bias = grad_bias.to(student_bias.dtype)
    return grad_hidden, grad_weight, grad_bias


class _FusedLinearKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                teacher_logits, labels, plan, denominator):
        wanted = tuple(ctx.needs_input_grad[:3])
        teacher = (teacher_hidden, teacher_weight, teacher_bias, teacher_logits)
        per_position = torch.empty(student_hidden.shape[0], dtype=torch.float32, device=student_hidden.device)
        ctx.plan, ctx.eager = plan, plan.reduction != "none"
        if ctx.eager and any(wanted):
            ones = torch.ones(1, dtype=torch.float32, device=student_hidden.device)
            row_scale = ones / denominator if plan.reduction == "mean" else ones
            grads = run_chunks(plan, student_hidden, student_weight, student_bias, *teacher, labels,
                               per_position=per_position, row_scale=row_scale, wanted=wanted)
            ctx.save_for_backward(*grads)
            ctx.grads_consumed = False
        else:
            run_chunks(plan, student_hidden, student_weight, student_bias, *teacher, labels,
                       per_position=per_position, row_scale=None, wanted=(False, False, False))
            if any(wanted):
                ctx.save_for_backward(student_hidden, student_weight, student_bias, *teacher, labels)
        return _reduce(per_position, plan.reduction, denominator)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.eager:
            if ctx.grads_consumed:
                raise RuntimeError(
                    "fused_linear_kd_loss (triton) computes its gradients in forward and scales them in place in "
                    "backward, so its graph supports a single backward; call the op again for a second one"
                )
            ctx.grads_consumed = True
            scale = grad_output.to(torch.float32)
            grads = tuple(None if g is None else g.mul_(scale) for g in ctx.saved_tensors)
        else:
            student_hidden, student_weight, student_bias, *teacher, labels = ctx.saved_tensors
            grads = run_chunks(ctx.plan, student_hidden, student_weight, student_bias, *teacher, labels,
                               per_position=None, row_scale=_row_scale(grad_output),
                               wanted=tuple(ctx.needs_input_grad[:3]))
        return (*grads, None, None, None, None, None, None, None)


def fused_linear_kd_loss(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                         teacher_logits, teacher_indices, labels, *, logit_softcap, chunk_size, divergence, beta,
                         temperature, scale_by_t2, soft_weight, hard_weight, ignore_index, reduction,
                         num_items_in_batch, vocab_size):
    assert teacher_indices is None, "fused_linear_kd_loss_supports refuses a sparse teacher"
    labels = None if labels is None else labels.contiguous()  # the kernel reads one label per row at unit stride
    spec = loss_spec(divergence=divergence, beta=beta, temperature=temperature, scale_by_t2=scale_by_t2,
                     soft_weight=soft_weight, hard_weight=hard_weight, ignore_index=ignore_index,
                     logit_softcap=logit_softcap)
    num_positions = student_hidden.shape[0]
    if chunk_size is None:
        bytes_per_position = vocab_size * student_weight.element_size()
        if teacher_weight is not None and spec.has_soft:
            bytes_per_position += vocab_size * teacher_weight.element_size()
        chunk_size = default_chunk_size(num_positions, bytes_per_position)
    denominator = None
    if reduction == "mean":
        denominator = _mean_denominator(labels, ignore_index, num_items_in_batch, num_positions, student_hidden.device)
    plan = ChunkPlan(spec=spec, vocab=vocab_size, chunk_size=chunk_size, reduction=reduction)

    def detached(t):
        return None if t is None else t.detach()

    return _FusedLinearKDFunction.apply(
        student_hidden, student_weight, student_bias, detached(teacher_hidden), detached(teacher_weight),
        detached(teacher_bias), detached(teacher_logits), labels, plan, denominator,
    )
