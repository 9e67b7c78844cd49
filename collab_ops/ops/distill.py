"""Distillation losses: argument checks, canonical arguments, dispatch.

The public functions (DESIGN.md "Distillation losses") check shapes, dtypes, devices and scalar
options, flatten the inputs to the canonical form below, and call the implementation that
`collab_ops._dispatch.dispatch` picks. Value problems are never checked here (that would need a
synchronisation); they show up in the output as documented on each function.

Canonical implementation signatures
-----------------------------------
A backend registers `fn` per op with `register(op, backend, fn, supports)`. `fn` is called with
keyword arguments only, exactly those listed; `supports(**case)` receives the same keywords.
"float" means fp32, bf16 or fp16 (each tensor may have its own); losses come back in fp32.
Matrices are 2-D with unit stride in the last dimension; N may be 0. Gradients go to the student
side only: an autograd.Function returns None for every teacher input.

kd_loss(student_logits, teacher_logits, labels, teacher_indices, *, divergence, beta, temperature,
        scale_by_t2, soft_weight, hard_weight, ignore_index, reduction, num_items_in_batch,
        vocab_size) -> Tensor
    student_logits   [N, V_s] float
    teacher_logits   [N, V_t] float logits (dense), or [N, k] float teacher log-probabilities at
                     teacher_indices (sparse, k ≥ 1)
    labels           [N] int64, or None (every position counts, no hard term)
    teacher_indices  [N, k] int64, or None (dense teacher)
    divergence       one of DIVERGENCES; beta: float in [0, 1]; temperature: float > 0
    scale_by_t2      bool; soft_weight, hard_weight: floats ≥ 0 (labels is given when hard_weight ≠ 0)
    ignore_index     int; reduction: "mean" | "sum" | "none"
    num_items_in_batch  None, a float > 0, or a 0-d tensor (any device, value unchecked)
    vocab_size       int ≥ 1: columns [0, vocab_size) of both sides are used (V_s ≥ vocab_size, and
                     V_t ≥ vocab_size when dense); sparse ids must lie below it
    returns          a 0-d tensor, or [N] for reduction="none"

fused_linear_kd_loss(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                     teacher_bias, teacher_logits, teacher_indices, labels, *, logit_softcap,
                     chunk_size, <every kd_loss keyword from divergence to vocab_size>) -> Tensor
    student_hidden [N, H_s], student_weight [V_s, H_s], student_bias [V_s] or None: one float dtype
    teacher: either teacher_hidden [N, H_t] + teacher_weight [V_t, H_t] (+ teacher_bias [V_t] or
             None), one float dtype, with teacher_logits = teacher_indices = None; or teacher_logits
             (+ teacher_indices) exactly as in kd_loss, with the three teacher_* linear inputs None
    logit_softcap  None or a float > 0, applied to the logits the op computes (both sides)
    chunk_size     None (the implementation picks) or an int ≥ 1: positions per chunk
    gradients to student_hidden, student_weight, student_bias

weak_to_strong_loss(logits, weak_labels, *, coef) -> Tensor
    logits [N, C] float with N ≥ 1, C ≥ 2; weak_labels [N, C] float probabilities
    coef   float in [0, 1], the warmed-up auxiliary coefficient
    returns a 0-d tensor; gradient to logits

attention_transfer_loss(student_feats, teacher_feats, *, p) -> Tensor
    student_feats, teacher_feats: lists of the same length ≥ 1; pair i is [B_i, C_s, *S_i] and
    [B_i, C_t, *S_i] float (channels may differ, at least one spatial dimension)
    p      float > 0
    returns a 0-d tensor; gradient to student_feats

hidden_cosine_loss(student_hidden, teacher_hidden, mask) -> Tensor
    student_hidden, teacher_hidden [N, H] float; mask [N] bool or None
    returns a 0-d tensor; gradient to student_hidden
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .. import _availability
from .. import _validation as check
from .._dispatch import dispatch, register
from ..reference import distill as reference

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
REDUCTIONS = ("mean", "sum", "none")

Features = Union[torch.Tensor, Sequence[torch.Tensor]]


def _check_leading_shape(name: str, tensor: torch.Tensor, leading: torch.Size, reference_name: str) -> None:
    if tensor.shape[:-1] != leading:
        raise ValueError(
            f"{name} has leading shape {tuple(tensor.shape[:-1])} but {reference_name} has "
            f"{tuple(leading)}; they must cover the same positions"
        )


def _check_labels(name: str, labels: Optional[torch.Tensor], leading: torch.Size, reference_name: str):
    if labels is None:
        return None
    check.check_tensor(name, labels, dtypes=check.INDEX_DTYPES)
    if labels.shape != leading:
        raise ValueError(
            f"{name} has shape {tuple(labels.shape)} but {reference_name} has leading shape {tuple(leading)}"
        )
    return labels.reshape(-1).to(torch.int64)


def _check_num_items(value) -> Union[None, float, torch.Tensor]:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(
                f"num_items_in_batch must be a number or a one-element real tensor, got a {value.dtype} "
                f"tensor of shape {tuple(value.shape)}"
            )
        return value.reshape(())
    return check.check_positive("num_items_in_batch", value)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., D] → [N, D] with unit stride in the last dimension."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _check_kd_options(
    *, divergence, beta, temperature, scale_by_t2, soft_weight, hard_weight, ignore_index, reduction,
    num_items_in_batch,
) -> dict:
    return dict(
        divergence=check.check_choice("divergence", divergence, DIVERGENCES),
        beta=check.check_in_range("beta", beta, 0.0, 1.0),
        temperature=check.check_positive("temperature", temperature),
        scale_by_t2=check.check_bool("scale_by_t2", scale_by_t2),
        soft_weight=check.check_in_range("soft_weight", soft_weight, 0.0, math.inf, high_open=True),
        hard_weight=check.check_in_range("hard_weight", hard_weight, 0.0, math.inf, high_open=True),
        ignore_index=check.check_int("ignore_index", ignore_index),
        reduction=check.check_choice("reduction", reduction, REDUCTIONS),
        num_items_in_batch=_check_num_items(num_items_in_batch),
    )


def _check_vocab_size(vocab_size, student_vocab: int, dense_teacher_vocab: Optional[int], student_name: str, teacher_name: str) -> int:
    """The shared vocabulary width; dense_teacher_vocab is None for a sparse teacher."""
    if vocab_size is None:
        if dense_teacher_vocab is not None and dense_teacher_vocab != student_vocab:
            raise ValueError(
                f"{teacher_name} covers a vocabulary of {dense_teacher_vocab} tokens but {student_name} covers "
                f"{student_vocab}; pass vocab_size to use the first vocab_size tokens of both"
            )
        return student_vocab
    vocab_size = check.check_int("vocab_size", vocab_size, minimum=1)
    for name, width in ((student_name, student_vocab), (teacher_name, dense_teacher_vocab)):
        if width is not None and width < vocab_size:
            raise ValueError(f"vocab_size={vocab_size} exceeds the vocabulary of {width} tokens of {name}")
    return vocab_size


def _check_teacher_logits(
    teacher_logits, teacher_indices, leading: torch.Size, student_name: str
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The dense [..., V_t] or sparse [..., k] teacher, flattened to rows."""
    check.check_float_tensor("teacher_logits", teacher_logits)
    _check_leading_shape("teacher_logits", teacher_logits, leading, student_name)
    if teacher_indices is None:
        return _as_rows(teacher_logits), None
    check.check_tensor("teacher_indices", teacher_indices, dtypes=check.INDEX_DTYPES)
    if teacher_indices.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_indices has shape {tuple(teacher_indices.shape)} but teacher_logits has "
            f"{tuple(teacher_logits.shape)}; the sparse teacher gives one log-probability per index"
        )
    if teacher_indices.shape[-1] == 0:
        raise ValueError("teacher_indices must hold at least one token id per position (k ≥ 1)")
    return _as_rows(teacher_logits), _as_rows(teacher_indices).to(torch.int64)


def _check_vocab_dim(name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() < 2:
        raise ValueError(f"{name} must have shape [..., V] with at least one leading dimension, got {tuple(tensor.shape)}")
    if tensor.shape[-1] == 0:
        raise ValueError(f"{name} has an empty last dimension (shape {tuple(tensor.shape)})")


def _check_hard_term(hard_weight: float, labels) -> None:
    if hard_weight != 0 and labels is None:
        raise ValueError("labels are required when hard_weight is non-zero (the hard term is CE against labels)")


def _call(op: str, device: torch.device, backend: Optional[str], **case) -> torch.Tensor:
    return dispatch(op, device, backend, **case).fn(**case)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    teacher_indices: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Knowledge-distillation loss between student and teacher next-token distributions.

    student_logits [..., V_s]; teacher_logits [..., V_t] logits, or with teacher_indices [..., k] the
    teacher's log-probabilities at those token ids; labels [...] token ids (int64/int32) or None.
    The leading dimensions are positions; "none" returns a loss per position with their shape.

    With p_T = softmax(t/T), p_S = softmax(s/T), the soft loss per position is
      forward_kl KL(p_T‖p_S); reverse_kl KL(p_S‖p_T);
      jsd β·KL(p_T‖m) + (1−β)·KL(p_S‖m), m = β·p_T + (1−β)·p_S, with β=0 exactly forward_kl and
          β=1 exactly reverse_kl (as in Liger; the formula itself tends to 0 at both ends);
      skew_forward_kl KL(p_T‖β·p_T + (1−β)·p_S); skew_reverse_kl KL(p_S‖β·p_S + (1−β)·p_T) (DistiLLM);
      tvd ½·Σ|p_T − p_S|.
    Loss per position = soft_weight·soft·(T² if scale_by_t2) + hard_weight·CE(student logits at
    temperature 1, label); a term whose weight is 0 is not computed. Positions whose label is
    ignore_index give 0 and count for neither term, whatever their logits hold.
    reduction: "mean" divides the sum by num_items_in_batch when given (gradient accumulation:
    pass the number of counted positions of the whole batch), else by the number of counted
    positions, and is 0 when there is none; "sum"; "none".

    Sparse teacher (teacher_indices given): both distributions are collapsed onto the k ids plus
    one tail bucket, the teacher's tail holding 1 − Σ exp(teacher_logits) (clamped at 0) and the
    student's the mass of softmax(s/T) outside the ids. teacher_logits are used as given, so they
    must already be log-probabilities at the distillation temperature (e.g. top-k of
    log_softmax(t/T)); the temperature applies to the student. When the ids cover the whole
    vocabulary (k = vocab) there is no tail, and with log_softmax(t/T) this equals the dense loss.

    vocab_size aligns models whose vocabularies are padded differently: only columns below it
    are used on either side. Without it, dense teacher and student widths must be equal.

    Values: −inf logits are masked tokens (0·log 0 = 0, no NaN); a token the teacher gives mass
    but the student −inf makes forward_kl (and reverse_kl, the other way round) +inf, as the
    formula does. A counted position whose student row is all −inf (or, with a soft term, whose
    dense teacher row is: neither side then has a distribution), with a label outside
    [0, vocab) (when hard_weight ≠ 0), or with sparse ids outside [0, vocab) or repeated, has a
    NaN loss; so does one with NaN logits.
    Gradients reach student_logits only. Returns fp32.
    """
    check.check_float_tensor("student_logits", student_logits)
    _check_vocab_dim("student_logits", student_logits)
    leading = student_logits.shape[:-1]
    options = _check_kd_options(
        divergence=divergence, beta=beta, temperature=temperature, scale_by_t2=scale_by_t2,
        soft_weight=soft_weight, hard_weight=hard_weight, ignore_index=ignore_index,
        reduction=reduction, num_items_in_batch=num_items_in_batch,
    )
    teacher_rows, index_rows = _check_teacher_logits(teacher_logits, teacher_indices, leading, "student_logits")
    options["vocab_size"] = _check_vocab_size(
        vocab_size, student_logits.shape[-1], None if teacher_indices is not None else teacher_logits.shape[-1],
        "student_logits", "teacher_logits",
    )
    label_rows = _check_labels("labels", labels, leading, "student_logits")
    _check_hard_term(options["hard_weight"], labels)
    device = check.check_same_device(
        [("student_logits", student_logits), ("teacher_logits", teacher_logits), ("labels", labels),
         ("teacher_indices", teacher_indices)]
    )
    loss = _call(
        "kd_loss", device, backend,
        student_logits=_as_rows(student_logits), teacher_logits=teacher_rows, labels=label_rows,
        teacher_indices=index_rows, **options,
    )
    return loss.reshape(leading) if options["reduction"] == "none" else loss


def _check_linear(
    hidden_name: str, hidden, weight_name: str, weight, bias_name: str, bias
) -> None:
    """hidden [..., H] @ weight [V, H]ᵀ + bias [V], all of one float dtype."""
    check.check_float_tensor(hidden_name, hidden)
    if hidden.dim() < 2:
        raise ValueError(f"{hidden_name} must have shape [..., H] with at least one leading dimension, got {tuple(hidden.shape)}")
    check.check_float_tensor(weight_name, weight, ndim=2)
    if weight.shape[0] == 0:
        raise ValueError(f"{weight_name} has no vocabulary rows (shape {tuple(weight.shape)})")
    check.check_dim_size(weight_name, weight, 1, hidden.shape[-1], f"the hidden size of {hidden_name}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{weight_name} has dtype {weight.dtype} but {hidden_name} has {hidden.dtype}; they must match")
    if bias is not None:
        check.check_float_tensor(bias_name, bias, ndim=1)
        check.check_dim_size(bias_name, bias, 0, weight.shape[0], f"the vocabulary size of {weight_name}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{bias_name} has dtype {bias.dtype} but {weight_name} has {weight.dtype}; they must match")


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    *,
    teacher_logits: Optional[torch.Tensor] = None,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
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
    num_items_in_batch=None,
    teacher_indices: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """kd_loss with the LM heads fused: the student's logits are student_hidden [..., H_s] @
    student_weight [V_s, H_s]ᵀ + student_bias, the teacher's teacher_hidden [..., H_t] @
    teacher_weight [V_t, H_t]ᵀ + teacher_bias, or teacher_logits given directly (dense, or sparse
    with teacher_indices, as in kd_loss). Positions are processed chunk_size at a time (default:
    the implementation's choice), so no [N, V] tensor is ever held; accumulation is in fp32.

    Autocast does not apply: the GEMMs run in the inputs' dtypes (cast them to choose), with fp32
    accumulation, on every backend.

    logit_softcap=c replaces the logits this op computes, on both sides, by c·tanh(z/c) (Gemma);
    given teacher_logits are used as they are (a model's returned logits are already capped).
    Every other option, and the treatment of values, is kd_loss's. Gradients reach
    student_hidden, student_weight and student_bias; the teacher gets none.
    """
    _check_linear("student_hidden", student_hidden, "student_weight", student_weight, "student_bias", student_bias)
    leading = student_hidden.shape[:-1]
    options = _check_kd_options(
        divergence=divergence, beta=beta, temperature=temperature, scale_by_t2=scale_by_t2,
        soft_weight=soft_weight, hard_weight=hard_weight, ignore_index=ignore_index,
        reduction=reduction, num_items_in_batch=num_items_in_batch,
    )
    if (teacher_hidden is None) == (teacher_logits is None):
        raise ValueError(
            "pass exactly one of teacher_hidden (with teacher_weight) and teacher_logits, got "
            + ("both" if teacher_hidden is not None else "neither")
        )
    teacher_linear = dict(teacher_hidden=None, teacher_weight=None, teacher_bias=None)
    if teacher_hidden is not None:
        if teacher_weight is None:
            raise ValueError("teacher_weight is required with teacher_hidden")
        if teacher_indices is not None:
            raise ValueError("teacher_indices describes a sparse teacher_logits; it cannot be used with teacher_hidden")
        _check_linear("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight, "teacher_bias", teacher_bias)
        _check_leading_shape("teacher_hidden", teacher_hidden, leading, "student_hidden")
        teacher_linear.update(
            teacher_hidden=_as_rows(teacher_hidden), teacher_weight=teacher_weight, teacher_bias=teacher_bias
        )
        teacher_rows, index_rows, dense_teacher_vocab = None, None, teacher_weight.shape[0]
    else:
        for name, value in (("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias)):
            if value is not None:
                raise ValueError(f"{name} belongs to teacher_hidden; it cannot be used with teacher_logits")
        teacher_rows, index_rows = _check_teacher_logits(teacher_logits, teacher_indices, leading, "student_hidden")
        dense_teacher_vocab = None if teacher_indices is not None else teacher_logits.shape[-1]
    student_vocab_name = "student_weight"
    teacher_vocab_name = "teacher_weight" if teacher_hidden is not None else "teacher_logits"
    options["vocab_size"] = _check_vocab_size(
        vocab_size, student_weight.shape[0], dense_teacher_vocab, student_vocab_name, teacher_vocab_name
    )
    label_rows = _check_labels("labels", labels, leading, "student_hidden")
    _check_hard_term(options["hard_weight"], labels)
    if logit_softcap is not None:
        logit_softcap = check.check_positive("logit_softcap", logit_softcap)
    if chunk_size is not None:
        chunk_size = check.check_int("chunk_size", chunk_size, minimum=1)
    device = check.check_same_device(
        [("student_hidden", student_hidden), ("student_weight", student_weight), ("student_bias", student_bias),
         ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias),
         ("teacher_logits", teacher_logits), ("teacher_indices", teacher_indices), ("labels", labels)]
    )
    # The GEMMs run in the inputs' dtypes with fp32 accumulation on every backend: autocast would
    # recast some backends' GEMMs and not others (cast the inputs to choose the GEMMs' dtype).
    with torch.autocast(device.type, enabled=False):
        loss = _call(
            "fused_linear_kd_loss", device, backend,
            student_hidden=_as_rows(student_hidden), student_weight=student_weight, student_bias=student_bias,
            **teacher_linear, teacher_logits=teacher_rows, teacher_indices=index_rows, labels=label_rows,
            logit_softcap=logit_softcap, chunk_size=chunk_size, **options,
        )
    return loss.reshape(leading) if options["reduction"] == "none" else loss


def weak_to_strong_loss(
    logits: torch.Tensor,
    weak_labels: torch.Tensor,
    *,
    aux_coef: float = 0.5,
    warmup_frac: float = 0.1,
    step_frac: float = 1.0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """The auxiliary confidence loss of openai/weak-to-strong (`logconf_loss_fn`).

    logits [N, C] of the strong model; weak_labels [N, C] the weak supervisor's class
    probabilities (soft labels, as in that code). coef = aux_coef·(step_frac if step_frac ≤
    warmup_frac else 1); target = (1−coef)·weak_labels + coef·hardened strong predictions
    (detached); loss = mean over rows of the soft-target cross-entropy. Two classes are hardened
    at threshold = quantile(p_0, mean of weak_labels[:, 1]) (class 0 where p_0 ≥ threshold),
    more classes by argmax. Returns fp32.
    """
    check.check_float_tensor("logits", logits, ndim=2)
    if logits.shape[0] == 0:
        raise ValueError("logits must hold at least one row")
    if logits.shape[1] < 2:
        raise ValueError(f"logits must have at least 2 classes, got shape {tuple(logits.shape)}")
    check.check_float_tensor("weak_labels", weak_labels)
    if weak_labels.shape != logits.shape:
        raise ValueError(
            f"weak_labels has shape {tuple(weak_labels.shape)} but logits has {tuple(logits.shape)}; "
            "weak_labels are class probabilities per row"
        )
    aux_coef = check.check_in_range("aux_coef", aux_coef, 0.0, 1.0)
    warmup_frac = check.check_in_range("warmup_frac", warmup_frac, 0.0, 1.0)
    step_frac = check.check_in_range("step_frac", step_frac, 0.0, 1.0)
    device = check.check_same_device([("logits", logits), ("weak_labels", weak_labels)])
    coef = aux_coef * (step_frac if step_frac <= warmup_frac else 1.0)
    return _call("weak_to_strong_loss", device, backend, logits=logits, weak_labels=weak_labels, coef=coef)


def _as_feature_list(name: str, feats: Features) -> list[tuple[str, torch.Tensor]]:
    if isinstance(feats, torch.Tensor):
        return [(name, feats)]
    if not isinstance(feats, (list, tuple)):
        raise TypeError(f"{name} must be a tensor or a list of tensors, got {type(feats).__name__}")
    if len(feats) == 0:
        raise ValueError(f"{name} must hold at least one feature map")
    return [(f"{name}[{i}]", f) for i, f in enumerate(feats)]


def attention_transfer_loss(
    student_feats: Features, teacher_feats: Features, *, p: float = 2, backend: Optional[str] = None
) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis): a(f) = normalize(mean over channels of |f|^p,
    flattened per example); loss = Σ over feature pairs of mean((a(f_s) − a(f_t))²), as `at_loss`
    in szagoruyko/attention-transfer (the paper's β/2 factor is left to the caller).

    Each feature map is [B, C, *spatial] (at least one spatial dimension); a pair must agree in
    batch and spatial sizes (pool beforehand if they do not), channels may differ. Pass one
    tensor each or equally long lists. Gradients reach the student's features. Returns fp32.
    """
    students = _as_feature_list("student_feats", student_feats)
    teachers = _as_feature_list("teacher_feats", teacher_feats)
    if len(students) != len(teachers):
        raise ValueError(f"teacher_feats holds {len(teachers)} feature maps but student_feats holds {len(students)}")
    for (student_name, student), (teacher_name, teacher) in zip(students, teachers):
        check.check_float_tensor(student_name, student)
        check.check_float_tensor(teacher_name, teacher)
        if student.dim() < 3:
            raise ValueError(f"{student_name} must have shape [B, C, *spatial], got {tuple(student.shape)}")
        if teacher.dim() != student.dim() or teacher.shape[0] != student.shape[0] or teacher.shape[2:] != student.shape[2:]:
            raise ValueError(
                f"{teacher_name} has shape {tuple(teacher.shape)} but {student_name} has {tuple(student.shape)}; "
                "batch and spatial sizes must match (channels may differ)"
            )
    p = check.check_positive("p", p)
    device = check.check_same_device(students + teachers)
    return _call(
        "attention_transfer_loss", device, backend,
        student_feats=[t for _, t in students], teacher_feats=[t for _, t in teachers], p=p,
    )


def hidden_cosine_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """DistilBERT's hidden-state loss: mean over the selected positions of 1 − cos(s, t)
    (CosineEmbeddingLoss with target 1 on the masked-in rows); 0 when no position is selected.

    student_hidden, teacher_hidden [..., H] of the same shape; mask [...] (bool or integer,
    non-zero selects, e.g. an attention mask) or None for every position. Gradients reach
    student_hidden. Returns fp32.
    """
    check.check_float_tensor("student_hidden", student_hidden)
    if student_hidden.dim() < 2:
        raise ValueError(f"student_hidden must have shape [..., H] with at least one leading dimension, got {tuple(student_hidden.shape)}")
    check.check_float_tensor("teacher_hidden", teacher_hidden)
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(
            f"teacher_hidden has shape {tuple(teacher_hidden.shape)} but student_hidden has "
            f"{tuple(student_hidden.shape)}; they must match"
        )
    if mask is not None:
        check.check_tensor("mask", mask, dtypes=(torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64))
        if mask.shape != student_hidden.shape[:-1]:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)} but student_hidden has leading shape {tuple(student_hidden.shape[:-1])}"
            )
    device = check.check_same_device([("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden), ("mask", mask)])
    return _call(
        "hidden_cosine_loss", device, backend,
        student_hidden=_as_rows(student_hidden), teacher_hidden=_as_rows(teacher_hidden),
        mask=None if mask is None else mask.reshape(-1) != 0,
    )


register("kd_loss", "reference", reference.kd_loss)
register("fused_linear_kd_loss", "reference", reference.fused_linear_kd_loss)
register("weak_to_strong_loss", "reference", reference.weak_to_strong_loss)
register("attention_transfer_loss", "reference", reference.attention_transfer_loss)
register("hidden_cosine_loss", "reference", reference.hidden_cosine_loss)

# Triton backend (collab_ops/triton/distill.py): a dense teacher only; triton itself is imported
# when a kernel first runs, so this registration costs nothing where triton is missing.
from ..triton import distill as _triton_distill  # noqa: E402  (registered after the public ops)

register("kd_loss", "triton", _triton_distill.kd_loss, supports=_triton_distill.kd_loss_supports)
register("fused_linear_kd_loss", "triton", _triton_distill.fused_linear_kd_loss,
         supports=_triton_distill.fused_linear_kd_loss_supports)

# Compiled CPU kernel of kd_loss (csrc/cpu/kd_loss.h): the op gives per-position losses, the
# reduction stays in torch (no host synchronisation), and autograd reaches the student only.
_KD_ROW_STATS = 7  # kKdRowStats in csrc/common/divergence.h


def _compiled_kd_refusal(*, teacher_indices, **_) -> Optional[str]:
    return "the cpu kd kernel takes dense teachers" if teacher_indices is not None else None


def _compiled_kd_loss(
    *, student_logits, teacher_logits, labels, teacher_indices, divergence, beta, temperature, scale_by_t2,
    soft_weight, hard_weight, ignore_index, reduction, num_items_in_batch, vocab_size,
) -> torch.Tensor:
    soft_scale = soft_weight * temperature**2 if scale_by_t2 else soft_weight
    per_position, _ = torch.ops.collab_ops.kd_loss_forward(
        student_logits, teacher_logits, labels, divergence, beta, temperature, soft_scale, hard_weight,
        ignore_index, vocab_size,
    )
    counted = reference.counted_positions(labels, ignore_index, per_position.shape[0], per_position.device)
    return reference.reduce_positions(per_position, counted, reduction, num_items_in_batch)


def _kd_loss_setup_context(ctx, inputs, output):
    student_logits, teacher_logits, labels, *ctx.options = inputs
    ctx.save_for_backward(student_logits, teacher_logits, labels, output[1])
    ctx.mark_non_differentiable(output[1])


def _kd_loss_backward(ctx, grad_per_position, _grad_row_stats):
    student_logits, teacher_logits, labels, row_stats = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = torch.ops.collab_ops.kd_loss_backward(
            grad_per_position, student_logits, teacher_logits, labels, row_stats, *ctx.options
        )
    return (grad_student,) + (None,) * (2 + len(ctx.options))


if _availability.extension() is not None:

    @torch.library.register_fake("collab_ops::kd_loss_forward")
    def _kd_loss_forward_fake(student_logits, teacher_logits, labels, *_options):
        rows = student_logits.shape[0]
        return (student_logits.new_empty((rows,), dtype=torch.float32),
                student_logits.new_empty((rows, _KD_ROW_STATS), dtype=torch.float32))

    @torch.library.register_fake("collab_ops::kd_loss_backward")
    def _kd_loss_backward_fake(grad_per_position, student_logits, *_inputs_and_options):
        return student_logits.new_empty(student_logits.shape)

    torch.library.register_autograd(
        "collab_ops::kd_loss_forward", _kd_loss_backward, setup_context=_kd_loss_setup_context
    )

    def _kd_loss_double_backward(ctx, *_grads):
        raise RuntimeError(
            "kd_loss (cpu) computes its gradient with a kernel that is not differentiable again (double "
            "backward, e.g. a gradient penalty); use backend='reference' for that"
        )

    # Without it, a graph built with create_graph=True would drop the kernel's inputs silently.
    torch.library.register_autograd(
        "collab_ops::kd_loss_backward", _kd_loss_double_backward, setup_context=lambda ctx, inputs, output: None
    )
    register("kd_loss", "cpu", _compiled_kd_loss, supports=_compiled_kd_refusal)


# Compiled CPU fused_linear_kd_loss: positions are taken chunk_size at a time; per chunk torch's
# GEMMs (fp32 accumulation) give the logits, the compiled kd_loss kernels give the per-position
# losses and ∂loss/∂logits, and two more GEMMs turn that into grad_hidden (chunk rows) and
# grad_weight. As on the Triton path, "mean"/"sum" compute the gradients in forward and backward
# only scales them by grad_output; "none" learns its per-row weights in backward, so forward keeps
# the kernel's row statistics ([N, 4]) and backward recomputes the chunks' logits.
# Peak extra memory: a chunk's logits and their gradient, grad_weight, grad_hidden.

# A chunk's logit buffers (student + teacher) take about this much memory by default: at V=32000
# in fp32 that is about 260 positions, enough for the GEMMs to run near their peak on a few cores
# (N=1024, H=256: 128 to 1024 positions per chunk all measured within noise of each other).
CPU_CHUNK_LOGITS_BUDGET_BYTES = 64 * 2**20


def _compiled_fused_linear_refusal(*, teacher_indices, **_) -> Optional[str]:
    if teacher_indices is not None:
        return "the cpu fused linear kd path takes dense teachers; a sparse teacher (teacher_indices) runs on the reference backend"
    return None


@dataclass(frozen=True)
class _CpuChunkPlan:
    chunk_size: int
    reduction: str
    logit_softcap: Optional[float]
    has_soft: bool
    # kd_loss_forward/kd_loss_backward's trailing arguments, from divergence to vocab_size
    kernel_options: tuple

    @property
    def vocab(self) -> int:
        return self.kernel_options[-1]


def _capped_logits(hidden, weight, bias, logit_softcap) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """hidden @ weightᵀ + bias, soft-capped in fp32 when asked, and tanh(z/c) (for the cap's
    derivative) or None."""
    logits = torch.mm(hidden, weight.t()) if bias is None else torch.addmm(bias, hidden, weight.t())
    if logit_softcap is None:
        return logits, None
    squashed = torch.tanh(logits.to(torch.float32) / logit_softcap)
    return squashed * logit_softcap, squashed


def _run_cpu_chunks(plan: _CpuChunkPlan, student_hidden, student_weight, student_bias, teacher_hidden,
                    teacher_weight, teacher_bias, teacher_logits, labels, *, per_position, row_stats,
                    upstream, wanted):
    """Per chunk: the kernel's losses into per_position and statistics into row_stats (when
    per_position is given; else the statistics are read from row_stats), and for the student
    inputs flagged in `wanted` the gradients of Σ upstream[row]·loss[row] (upstream: [N] or [1])."""
    vocab, cap = plan.vocab, plan.logit_softcap
    num_positions = student_hidden.shape[0]
    want_hidden, want_weight, want_bias = wanted
    weight = student_weight[:vocab]
    bias = None if student_bias is None else student_bias[:vocab]
    computes_teacher = plan.has_soft and teacher_hidden is not None
    if computes_teacher:
        teacher_weight = teacher_weight[:vocab]
        teacher_bias = None if teacher_bias is None else teacher_bias[:vocab]
    grad_hidden = torch.empty_like(student_hidden) if want_hidden else None
    grad_weight = torch.zeros_like(student_weight) if want_weight else None
    grad_bias = torch.zeros(student_weight.shape[0], dtype=torch.float32) if want_bias else None

    for start in range(0, num_positions, plan.chunk_size):
        rows = slice(start, min(start + plan.chunk_size, num_positions))
        hidden_rows = student_hidden[rows]
        student_rows, squashed = _capped_logits(hidden_rows, weight, bias, cap)
        if computes_teacher:
            teacher_rows, _ = _capped_logits(teacher_hidden[rows], teacher_weight, teacher_bias, cap)
        elif plan.has_soft:
            teacher_rows = teacher_logits[rows]
        else:
            teacher_rows = student_rows  # the kernels never read the teacher without a soft term
        label_rows = None if labels is None else labels[rows]
        if per_position is not None:
            per_position[rows], row_stats[rows] = torch.ops.collab_ops.kd_loss_forward(
                student_rows, teacher_rows, label_rows, *plan.kernel_options)
        if not any(wanted):
            continue
        row_upstream = upstream[rows] if upstream.numel() > 1 else upstream.expand(rows.stop - rows.start)
        grad_logits = torch.ops.collab_ops.kd_loss_backward(
            row_upstream, student_rows, teacher_rows, label_rows, row_stats[rows], *plan.kernel_options)
        if squashed is not None:
            grad_logits = grad_logits.mul_(1 - squashed.square_()).to(student_weight.dtype)
        if want_hidden:
            torch.mm(grad_logits, weight, out=grad_hidden[rows])
        if want_weight:
            grad_weight[:vocab].addmm_(grad_logits.t(), hidden_rows)
        if want_bias:
            grad_bias[:vocab] += grad_logits.sum(0, dtype=torch.float32)
    if grad_bias is not None:
        grad_bias = grad_bias.to(student_bias.dtype)
    return grad_hidden, grad_weight, grad_bias


class _CpuFusedLinearKDFunction(torch.autograd.Function):
    # The public op runs with autocast off; custom_bwd runs backward (which recomputes the chunks'
    # logits for "none") in forward's autocast state whatever the caller's is at backward time.
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                teacher_logits, labels, plan, denominator):
        wanted = tuple(ctx.needs_input_grad[:3])
        inputs = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                  teacher_logits, labels)
        num_positions = student_hidden.shape[0]
        per_position = torch.empty(num_positions, dtype=torch.float32)
        row_stats = torch.empty((num_positions, _KD_ROW_STATS), dtype=torch.float32)
        ctx.plan, ctx.eager = plan, plan.reduction != "none"
        if ctx.eager and any(wanted):
            scale = torch.ones(1, dtype=torch.float32)
            if plan.reduction == "mean":
                scale = scale / denominator
            grads = _run_cpu_chunks(plan, *inputs, per_position=per_position, row_stats=row_stats, upstream=scale,
                                    wanted=wanted)
            ctx.save_for_backward(*grads)
            ctx.grads_consumed = False
        else:
            _run_cpu_chunks(plan, *inputs, per_position=per_position, row_stats=row_stats, upstream=None,
                            wanted=(False, False, False))
            if any(wanted):
                ctx.save_for_backward(*inputs, row_stats)
        if plan.reduction == "none":
            return per_position
        total = per_position.sum()
        return total / denominator if plan.reduction == "mean" else total

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_output):
        if ctx.eager:
            if ctx.grads_consumed:
                raise RuntimeError(
                    "fused_linear_kd_loss (cpu) computes its gradients in forward and scales them in place in "
                    "backward, so its graph supports a single backward; call the op again for a second one"
                )
            ctx.grads_consumed = True
            scale = grad_output.to(torch.float32)
            grads = tuple(None if g is None else g.mul_(scale) for g in ctx.saved_tensors)
        else:
            *inputs, row_stats = ctx.saved_tensors
            grads = _run_cpu_chunks(ctx.plan, *inputs, per_position=None, row_stats=row_stats,
                                    upstream=grad_output.to(torch.float32).reshape(-1),
                                    wanted=tuple(ctx.needs_input_grad[:3]))
        return (*grads, None, None, None, None, None, None, None)


def _compiled_fused_linear_kd_loss(
    *, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
    teacher_indices, labels, logit_softcap, chunk_size, divergence, beta, temperature, scale_by_t2, soft_weight,
    hard_weight, ignore_index, reduction, num_items_in_batch, vocab_size,
) -> torch.Tensor:
    soft_scale = soft_weight * temperature**2 if scale_by_t2 else soft_weight
    num_positions = student_hidden.shape[0]
    computes_teacher = soft_scale != 0 and teacher_weight is not None
    if chunk_size is None:
        bytes_per_position = vocab_size * (student_weight.element_size()
                                           + (teacher_weight.element_size() if computes_teacher else 0))
        chunk_size = max(1, min(num_positions, CPU_CHUNK_LOGITS_BUDGET_BYTES // bytes_per_position))
    denominator = None
    if reduction == "mean":
        if num_items_in_batch is not None:
            denominator = torch.as_tensor(num_items_in_batch).to(device="cpu", dtype=torch.float32).reshape(())
        else:
            counted = reference.counted_positions(labels, ignore_index, num_positions, student_hidden.device)
            denominator = counted.sum().clamp(min=1).to(torch.float32)
    plan = _CpuChunkPlan(
        chunk_size=chunk_size, reduction=reduction, logit_softcap=logit_softcap, has_soft=soft_scale != 0,
        kernel_options=(divergence, beta, temperature, soft_scale, hard_weight, ignore_index, vocab_size),
    )

    def detached(t):
        return None if t is None else t.detach()

    return _CpuFusedLinearKDFunction.apply(
        student_hidden, student_weight, student_bias, detached(teacher_hidden), detached(teacher_weight),
        detached(teacher_bias), detached(teacher_logits), labels, plan, denominator,
    )


if _availability.extension() is not None:
    register("fused_linear_kd_loss", "cpu", _compiled_fused_linear_kd_loss, supports=_compiled_fused_linear_refusal)
