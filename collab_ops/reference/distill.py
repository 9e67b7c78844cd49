"""Pure-PyTorch references of the distillation losses: the oracle every backend is tested against.

Written for clarity, not speed. Inputs are the canonical arguments of `collab_ops.ops.distill`
(already validated and flattened to positions × vocabulary); the signatures and the semantics of
every edge case are documented there. These functions compute in float64 when an input is
float64 and in float32 otherwise, and rely on autograd for their gradients. Teacher inputs are
detached: gradients reach the student side only.

Two rules keep masked tokens (−inf logits) from turning into NaN, in the value or the gradient:
a probability of 0 contributes 0 to p·log(p/q) (0·log 0 = 0), and no logarithm or log-sum-exp is
ever evaluated where its argument is 0 on a branch that autograd differentiates.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

NumItems = Union[None, float, torch.Tensor]


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 when any input is float64, else float32 (bf16/fp16/fp32 are computed in fp32)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def log_or_neg_inf(x: torch.Tensor) -> torch.Tensor:
    """log(x) for x ≥ 0, with log(0) = −inf and a zero (not NaN) gradient at 0."""
    positive = x > 0
    return torch.where(positive, torch.log(torch.where(positive, x, torch.ones_like(x))), -math.inf)


def masked_logsumexp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """logsumexp whose gradient stays finite when every entry is −inf (torch's is NaN there)."""
    shift = x.detach().amax(dim, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    return log_or_neg_inf(torch.exp(x - shift).sum(dim)) + shift.squeeze(dim)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ_x p(x)·(log p(x) − log q(x)) over the last dimension; terms with p(x) = 0 are 0."""
    p = torch.exp(log_p)
    log_ratio = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * log_ratio).sum(-1)


def log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight·p + (1 − weight)·q)."""
    return log_or_neg_inf(weight * torch.exp(log_p) + (1 - weight) * torch.exp(log_q))


def divergence_per_position(
    divergence: str, log_p_teacher: torch.Tensor, log_p_student: torch.Tensor, beta: float
) -> torch.Tensor:
    """The soft loss of each row, from both sides' log-probabilities over the same support."""
    if divergence == "forward_kl":
        return kl_divergence(log_p_teacher, log_p_student)
    if divergence == "reverse_kl":
        return kl_divergence(log_p_student, log_p_teacher)
    if divergence == "jsd":
        # The generalised JSD tends to 0 at both ends; like Liger, the endpoints are defined as the
        # two KL directions and computed by their own formulas so that they are exact.
        if beta == 0:
            return kl_divergence(log_p_teacher, log_p_student)
        if beta == 1:
            return kl_divergence(log_p_student, log_p_teacher)
        log_m = log_mixture(log_p_teacher, log_p_student, beta)
        return beta * kl_divergence(log_p_teacher, log_m) + (1 - beta) * kl_divergence(log_p_student, log_m)
    # At β = 0 the skew KLs are the plain KL directions, computed from the log-probabilities: the
    # mixture's probabilities would underflow where those are finite.
    if divergence == "skew_forward_kl":
        if beta == 0:
            return kl_divergence(log_p_teacher, log_p_student)
        return kl_divergence(log_p_teacher, log_mixture(log_p_teacher, log_p_student, beta))
    if divergence == "skew_reverse_kl":
        if beta == 0:
            return kl_divergence(log_p_student, log_p_teacher)
        return kl_divergence(log_p_student, log_mixture(log_p_student, log_p_teacher, beta))
    if divergence == "tvd":
        return 0.5 * (torch.exp(log_p_teacher) - torch.exp(log_p_student)).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}")


def counted_positions(labels: Optional[torch.Tensor], ignore_index: int, num_positions: int, device) -> torch.Tensor:
    if labels is None:
        return torch.ones(num_positions, dtype=torch.bool, device=device)
    return labels != ignore_index


def zero_ignored_rows(x: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Ignored rows may hold anything (all −inf padding, NaN); zeros keep their gradient exactly 0."""
    return torch.where(counted[:, None], x, torch.zeros_like(x))


def collapse_to_teacher_support(
    log_p_student: torch.Tensor, teacher_log_probs: torch.Tensor, teacher_indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both distributions over the k teacher ids plus one tail bucket holding the rest of the mass.

    Returns (teacher [N, k+1], student [N, k+1], valid [N]); a row is invalid when one of its ids
    lies outside [0, V) or appears twice. When the ids cover the vocabulary both tails are empty.
    """
    vocab = log_p_student.shape[-1]
    in_range = (teacher_indices >= 0) & (teacher_indices < vocab)
    ids = torch.where(in_range, teacher_indices, torch.zeros_like(teacher_indices))
    at_ids = torch.zeros_like(log_p_student, dtype=torch.bool).scatter_(1, ids, True)
    valid = in_range.all(-1) & (at_ids.sum(-1) == teacher_indices.shape[-1])

    student_at_ids = log_p_student.gather(1, ids)
    student_tail = masked_logsumexp(log_p_student.masked_fill(at_ids, -math.inf))
    if teacher_indices.shape[-1] >= vocab:
        # The ids cover the vocabulary: no tail, even where the given log-probs sum to 1 − ulp.
        teacher_tail = torch.full_like(student_tail, -math.inf)
    else:
        # Rounding can make the given teacher mass exceed 1 by an ulp: that is an empty tail.
        teacher_tail = torch.log1p(-torch.exp(teacher_log_probs).sum(-1).clamp(max=1))
    teacher = torch.cat([teacher_log_probs, teacher_tail[:, None]], dim=-1)
    student = torch.cat([student_at_ids, student_tail[:, None]], dim=-1)
    return teacher, student, valid


def soft_loss_per_position(
    student: torch.Tensor,
    teacher: torch.Tensor,
    teacher_indices: Optional[torch.Tensor],
    *,
    divergence: str,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """Dense: divergence of softmax(teacher/T) and softmax(student/T). Sparse: `teacher` holds the
    teacher's log-probabilities at `teacher_indices` (already at temperature T); the temperature
    applies to the student, and both sides are collapsed to the teacher's ids plus a tail bucket."""
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    # A side whose logits are all −inf has no distribution: the row's loss is NaN.
    valid = ~torch.isneginf(student).all(-1)
    if teacher_indices is None:
        log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
        loss = divergence_per_position(divergence, log_p_teacher, log_p_student, beta)
        valid &= ~torch.isneginf(teacher).all(-1)
    else:
        log_p_teacher, log_p_student, valid_ids = collapse_to_teacher_support(log_p_student, teacher, teacher_indices)
        loss = divergence_per_position(divergence, log_p_teacher, log_p_student, beta)
        valid &= valid_ids
    return torch.where(valid, loss, torch.full_like(loss, math.nan))


def hard_cross_entropy(student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """−log softmax(student)[label] per row; NaN where the label lies outside [0, V)."""
    in_range = (labels >= 0) & (labels < student.shape[-1])
    safe_labels = torch.where(in_range, labels, torch.zeros_like(labels))
    nll = -F.log_softmax(student, dim=-1).gather(1, safe_labels[:, None]).squeeze(1)
    return torch.where(in_range, nll, torch.full_like(nll, math.nan))


def reduce_positions(
    per_position: torch.Tensor, counted: torch.Tensor, reduction: str, num_items_in_batch: NumItems
) -> torch.Tensor:
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    if isinstance(num_items_in_batch, torch.Tensor):  # its dtype must not promote the loss (float64)
        return total / num_items_in_batch.to(dtype=total.dtype)
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    # A batch with nothing counted contributes 0 (not NaN) so accumulation across ranks stays finite.
    return total / counted.sum().clamp(min=1)


def kd_per_position(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    teacher_indices: Optional[torch.Tensor],
    counted: torch.Tensor,
    *,
    divergence: str,
    beta: float,
    temperature: float,
    scale_by_t2: bool,
    soft_weight: float,
    hard_weight: float,
    vocab_size: Optional[int],
) -> torch.Tensor:
    """soft_weight·soft (·T²) + hard_weight·CE of every row, 0 at rows that are not counted."""
    dtype = compute_dtype(student_logits, teacher_logits)
    vocab_size = student_logits.shape[-1] if vocab_size is None else vocab_size
    student = zero_ignored_rows(student_logits[:, :vocab_size].to(dtype), counted)
    per_position = torch.zeros(student.shape[0], dtype=dtype, device=student.device)
    # A term of weight 0 is skipped, so an infinite or NaN value in it cannot leak into the total.
    if soft_weight != 0:
        teacher = teacher_logits.detach().to(dtype)
        if teacher_indices is None:
            teacher = teacher[:, :vocab_size]
        teacher = zero_ignored_rows(teacher, counted)
        soft = soft_loss_per_position(
            student, teacher, teacher_indices, divergence=divergence, beta=beta, temperature=temperature
        )
        scale = soft_weight * temperature**2 if scale_by_t2 else soft_weight
        per_position = per_position + scale * soft
    if hard_weight != 0:
        per_position = per_position + hard_weight * hard_cross_entropy(student, labels)
    return torch.where(counted, per_position, torch.zeros_like(per_position))


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    teacher_indices: Optional[torch.Tensor] = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: NumItems = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Distillation loss of student_logits [N, V_s] against a dense [N, V_t] or sparse [N, k] teacher."""
    counted = counted_positions(labels, ignore_index, student_logits.shape[0], student_logits.device)
    per_position = kd_per_position(
        student_logits, teacher_logits, labels, teacher_indices, counted,
        divergence=divergence, beta=beta, temperature=temperature, scale_by_t2=scale_by_t2,
        soft_weight=soft_weight, hard_weight=hard_weight, vocab_size=vocab_size,
    )
    return reduce_positions(per_position, counted, reduction, num_items_in_batch)


def default_chunk_size(num_positions: int, vocab: int, hidden: int) -> int:
    """As Liger: rows per chunk such that a chunk of logits is about as large as the hidden states."""
    return max(1, math.ceil(num_positions / math.ceil(vocab / max(hidden, 1))))


def linear_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], logit_softcap: Optional[float], dtype
) -> torch.Tensor:
    logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return logits


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: Optional[torch.Tensor] = None,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    teacher_logits: Optional[torch.Tensor] = None,
    teacher_indices: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    *,
    logit_softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: NumItems = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """kd_loss of (student_hidden @ student_weightᵀ + student_bias) against the teacher's logits
    (teacher_hidden @ teacher_weightᵀ + teacher_bias, or the given teacher_logits), chunk by chunk
    of positions. Each chunk is checkpointed, so autograd keeps only its inputs: nothing of size
    [N, V] is alive at any time, at the price of computing each chunk's logits again in backward."""
    num_positions = student_hidden.shape[0]
    dtype = compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits)
    if chunk_size is None:
        chunk_size = default_chunk_size(num_positions, student_weight.shape[0], student_hidden.shape[-1])
    counted = counted_positions(labels, ignore_index, num_positions, student_hidden.device)
    options = dict(
        divergence=divergence, beta=beta, temperature=temperature, scale_by_t2=scale_by_t2,
        soft_weight=soft_weight, hard_weight=hard_weight, vocab_size=vocab_size,
    )

    def chunk_loss(rows: slice, student_hidden_rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        student_rows = linear_logits(student_hidden_rows, weight, bias, logit_softcap, dtype)
        if teacher_logits is not None:
            teacher_rows = teacher_logits[rows]
        else:
            with torch.no_grad():
                teacher_rows = linear_logits(teacher_hidden[rows], teacher_weight, teacher_bias, logit_softcap, dtype)
        return kd_per_position(
            student_rows,
            teacher_rows,
            None if labels is None else labels[rows],
            None if teacher_indices is None else teacher_indices[rows],
            counted[rows],
            **options,
        )

    # With no positions the single empty chunk still connects the loss to the weights' graph.
    chunks = [slice(start, start + chunk_size) for start in range(0, max(num_positions, 1), chunk_size)]
    per_position = torch.cat([
        checkpoint(chunk_loss, rows, student_hidden[rows], student_weight, student_bias,
                   use_reentrant=False, preserve_rng_state=False)  # nothing random to replay
        for rows in chunks
    ])
    return reduce_positions(per_position, counted, reduction, num_items_in_batch)


def weak_to_strong_loss(logits: torch.Tensor, weak_labels: torch.Tensor, *, coef: float) -> torch.Tensor:
    """openai/weak-to-strong `logconf_loss_fn`: cross-entropy against (1−coef)·weak + coef·hardened
    strong predictions. Two classes are hardened at the quantile of p_0 given by the weak labels'
    mean of class 1 (so the strong model predicts class 1 as often as the weak labels do); more
    classes are hardened by argmax. weak_labels [N, C] are probabilities."""
    dtype = compute_dtype(logits, weak_labels)
    logits = logits.to(dtype)
    weak = weak_labels.detach().to(dtype)
    # Comparisons and argmax make the hardened predictions constants: no gradient flows through them.
    probs = torch.softmax(logits, dim=-1)
    if logits.shape[-1] == 2:
        threshold = torch.quantile(probs[:, 0], weak.mean(0)[1])
        strong = torch.stack([probs[:, 0] >= threshold, probs[:, 0] < threshold], dim=1).to(dtype)
    else:
        strong = F.one_hot(probs.argmax(-1), logits.shape[-1]).to(dtype)
    target = weak * (1 - coef) + strong * coef
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def attention_map(features: torch.Tensor, p: float) -> torch.Tensor:
    """Zagoruyko & Komodakis: mean over channels of |f|^p, flattened per example, L2-normalised."""
    return F.normalize(features.abs().pow(p).mean(1).flatten(1), dim=1)


def attention_transfer_loss(
    student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor], *, p: float
) -> torch.Tensor:
    """Σ over pairs of mean((a_s − a_t)²), as `at_loss` in szagoruyko/attention-transfer."""
    dtype = compute_dtype(*student_feats, *teacher_feats)
    pair_losses = [
        (attention_map(student.to(dtype), p) - attention_map(teacher.detach().to(dtype), p)).pow(2).mean()
        for student, teacher in zip(student_feats, teacher_feats)
    ]
    return torch.stack(pair_losses).sum()


def hidden_cosine_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """DistilBERT's cosine loss: mean over selected rows of 1 − cos(s, t); 0 when none is selected."""
    dtype = compute_dtype(student_hidden, teacher_hidden)
    if mask is None:
        selected = torch.ones(student_hidden.shape[0], dtype=torch.bool, device=student_hidden.device)
    else:
        selected = mask
    student = zero_ignored_rows(student_hidden.to(dtype), selected)
    teacher = zero_ignored_rows(teacher_hidden.detach().to(dtype), selected)
    per_row = 1 - F.cosine_similarity(student, teacher, dim=-1)
    per_row = torch.where(selected, per_row, torch.zeros_like(per_row))
    return per_row.sum() / selected.sum().clamp(min=1)
