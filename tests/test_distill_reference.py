"""kd_loss of every backend against float64 formulas written out here with numpy/scipy.

The oracle computes each divergence on probabilities (scipy's rel_entr gives 0·log 0 = 0) and its
gradient by hand: dL/dq for the student's probabilities q, then the softmax Jacobian.
"""
import math

import numpy as np
import pytest
import scipy.special as sp
import torch

from collab_ops.ops import distill as ops
from collab_ops.reference import distill as reference
from tolerance import assert_close_to_reference
from backends import cpu_backends, skip_if_sparse_teacher_refused

OP = "kd_loss"
BACKENDS = cpu_backends(OP)
DIVERGENCES = ops.DIVERGENCES
# beta per divergence for the generic tests (it only matters for the mixtures)
BETA = {"jsd": 0.3, "skew_forward_kl": 0.1, "skew_reverse_kl": 0.25}

# fp32 computation against float64 formulas on O(1) values
FP32_TOL = dict(rtol=2e-5, atol=2e-6)


def _np(x):
    return x.detach().double().cpu().numpy()


def soft_value_and_dq(p, q, divergence, beta):
    """The soft loss per row and its derivative with respect to the student's probabilities q."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
            return sp.rel_entr(p, q).sum(-1), np.where(q > 0, -p / q, 0.0)
        if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
            return sp.rel_entr(q, p).sum(-1), np.where(q > 0, np.log(q / p) + 1, 0.0)
        if divergence == "jsd":
            m = beta * p + (1 - beta) * q
            value = beta * sp.rel_entr(p, m).sum(-1) + (1 - beta) * sp.rel_entr(q, m).sum(-1)
            return value, np.where(q > 0, (1 - beta) * np.log(q / m), 0.0)
        if divergence == "skew_forward_kl":
            m = beta * p + (1 - beta) * q
            return sp.rel_entr(p, m).sum(-1), np.where(m > 0, -(1 - beta) * p / m, 0.0)
        if divergence == "skew_reverse_kl":
            m = beta * q + (1 - beta) * p
            return sp.rel_entr(q, m).sum(-1), np.where(q > 0, np.log(q / m) + 1 - beta * q / m, 0.0)
        if divergence == "tvd":
            return 0.5 * np.abs(p - q).sum(-1), -0.5 * np.sign(p - q)
    raise AssertionError(divergence)


def softmax_backward(q, dq, temperature):
    """dL/dz from dL/dq for q = softmax(z / T)."""
    return q * (dq - (q * dq).sum(-1, keepdims=True)) / temperature


def oracle_kd(student, teacher, labels=None, teacher_indices=None, *, divergence="forward_kl", beta=0.5,
              temperature=1.0, scale_by_t2=False, soft_weight=1.0, hard_weight=0.0, ignore_index=-100,
              vocab_size=None):
    """Loss of every position [N] and d(loss_i)/d(student_i) [N, V_s], in float64."""
    s = _np(student)
    n, student_vocab = s.shape
    vocab = student_vocab if vocab_size is None else vocab_size
    s = s[:, :vocab]
    counted = np.ones(n, bool) if labels is None else _np(labels) != ignore_index
    q = sp.softmax(s / temperature, axis=-1)
    if teacher_indices is None:
        p = sp.softmax(_np(teacher)[:, :vocab] / temperature, axis=-1)
        value, dq = soft_value_and_dq(p, q, divergence, beta)
    else:
        ids = teacher_indices.cpu().numpy()
        p_at_ids = np.exp(_np(teacher))
        p = np.concatenate([p_at_ids, np.clip(1 - p_at_ids.sum(-1, keepdims=True), 0, None)], -1)
        at_ids = np.zeros_like(q, dtype=bool)
        np.put_along_axis(at_ids, ids, True, axis=-1)
        q_collapsed = np.concatenate([np.take_along_axis(q, ids, -1), (q * ~at_ids).sum(-1, keepdims=True)], -1)
        value, dq_collapsed = soft_value_and_dq(p, q_collapsed, divergence, beta)
        dq = np.repeat(dq_collapsed[:, -1:], vocab, axis=-1)
        np.put_along_axis(dq, ids, dq_collapsed[:, :-1], axis=-1)
    scale = soft_weight * (temperature**2 if scale_by_t2 else 1.0)
    value = scale * value
    grad = scale * softmax_backward(q, dq, temperature)
    if hard_weight:
        lab = np.where(counted, _np(labels), 0).astype(np.int64)
        q1 = sp.softmax(s, axis=-1)
        value = value - hard_weight * np.log(q1[np.arange(n), lab])
        grad = grad + hard_weight * (q1 - np.eye(vocab)[lab])
    values = np.where(counted, value, 0.0)
    grads = np.zeros((n, student_vocab))
    grads[:, :vocab] = np.where(counted[:, None], grad, 0.0)
    return values, grads


def run_per_position(backend, student, teacher, labels=None, **options):
    """The op's per-position losses and d(Σ w_i·loss_i)/d(student) for random weights w."""
    student = student.detach().clone().requires_grad_(True)
    losses = ops.kd_loss(student, teacher, labels, reduction="none", backend=backend, **options)
    weights = torch.rand(losses.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (grad,) = torch.autograd.grad((losses.double() * weights).sum(), student)
    return losses, grad, weights


def check_against_oracle(backend, student, teacher, labels=None, **options):
    losses, grad, weights = run_per_position(backend, student, teacher, labels, **options)
    values, grads = oracle_kd(student, teacher, labels, **options)
    assert losses.dtype == torch.float32
    torch.testing.assert_close(losses.double(), torch.from_numpy(values), **FP32_TOL)
    torch.testing.assert_close(grad.double(), weights[:, None] * torch.from_numpy(grads), **FP32_TOL)


def logits(*shape, seed, scale=3.0, dtype=torch.float32):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(dtype)


def label_ids(n, vocab, *, seed, ignored=(), ignore_index=-100):
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))
    labels[list(ignored)] = ignore_index
    return labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_soft_divergence_matches_formula(backend, divergence, temperature):
    student, teacher = logits(37, 53, seed=1), logits(37, 53, seed=2)
    check_against_oracle(backend, student, teacher, divergence=divergence, beta=BETA.get(divergence, 0.5),
                         temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("divergence", ["jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_mixture_divergences_across_beta(backend, divergence, beta):
    student, teacher = logits(19, 31, seed=3), logits(19, 31, seed=4)
    check_against_oracle(backend, student, teacher, divergence=divergence, beta=beta, temperature=1.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta, same_as", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_endpoints_are_exactly_the_kl_directions(backend, beta, same_as):
    student, teacher = logits(23, 41, seed=5), logits(23, 41, seed=6)
    jsd_loss, jsd_grad, _ = run_per_position(backend, student, teacher, divergence="jsd", beta=beta, temperature=1.7)
    kl_loss, kl_grad, _ = run_per_position(backend, student, teacher, divergence=same_as, temperature=1.7)
    assert torch.equal(jsd_loss, kl_loss)
    assert torch.equal(jsd_grad, kl_grad)
    assert kl_loss.min() > 0.01  # the JSD formula itself would give ~0 here


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_temperature_weights_labels_and_t2(backend, divergence):
    student, teacher = logits(29, 37, seed=7), logits(29, 37, seed=8)
    labels = label_ids(29, 37, seed=9, ignored=(0, 5, 6, 28))
    check_against_oracle(backend, student, teacher, labels, divergence=divergence, beta=0.4, temperature=3.0,
                         scale_by_t2=True, soft_weight=0.7, hard_weight=0.45)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_hard_term_only(backend):
    student, teacher = logits(17, 13, seed=10), logits(17, 13, seed=11)
    labels = label_ids(17, 13, seed=12, ignored=(3, 4), ignore_index=7)
    assert (labels == 7).sum() >= 2  # 7 is also a token id: every position labelled 7 is ignored
    check_against_oracle(backend, student, teacher, labels, soft_weight=0.0, hard_weight=1.0, ignore_index=7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_and_num_items_in_batch(backend):
    student, teacher = logits(2, 11, 19, seed=13), logits(2, 11, 19, seed=14)
    labels = label_ids(22, 19, seed=15, ignored=(1, 2, 17)).reshape(2, 11)
    options = dict(divergence="reverse_kl", temperature=2.0, hard_weight=0.3)
    values, grads = oracle_kd(student.reshape(22, 19), teacher.reshape(22, 19), labels.reshape(-1), **options)
    expected = {
        ("none", None): (values.reshape(2, 11), grads),
        ("sum", None): (values.sum(), grads),
        ("mean", None): (values.sum() / 19, grads / 19),
        ("mean", 40): (values.sum() / 40, grads / 40),
        ("mean", torch.tensor(40)): (values.sum() / 40, grads / 40),
        ("mean", torch.tensor([40.0])): (values.sum() / 40, grads / 40),
    }
    for (reduction, num_items), (value, grad) in expected.items():
        s = student.clone().requires_grad_(True)
        loss = ops.kd_loss(s, teacher, labels, reduction=reduction, num_items_in_batch=num_items, backend=backend, **options)
        loss.sum().backward()
        assert loss.shape == ((2, 11) if reduction == "none" else ())
        torch.testing.assert_close(loss.double(), torch.as_tensor(value), **FP32_TOL)
        torch.testing.assert_close(s.grad.double().reshape(22, 19), torch.from_numpy(grad), **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_nothing_counted_gives_zero_loss_and_gradient(backend, reduction):
    student = logits(5, 9, seed=16).requires_grad_(True)
    labels = torch.full((5,), -100)
    loss = ops.kd_loss(student, logits(5, 9, seed=17), labels, hard_weight=1.0, reduction=reduction, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_tokens_masked_on_both_sides_are_left_out(backend, divergence):
    """−inf at the same columns on both sides equals the loss over the other columns, gradient 0 there."""
    student, teacher = logits(13, 24, seed=18), logits(13, 24, seed=19)
    masked = torch.zeros(13, 24, dtype=torch.bool)
    masked[:, 20:] = True
    masked[3, :19] = True  # one row keeps a single token
    student[masked] = -math.inf
    teacher[masked] = -math.inf
    options = dict(divergence=divergence, beta=BETA.get(divergence, 0.5), temperature=1.5)
    losses, grad, weights = run_per_position(backend, student, teacher, **options)
    assert torch.isfinite(losses).all() and torch.isfinite(grad).all()
    assert torch.equal(grad[masked], torch.zeros_like(grad[masked]))
    values, grads = oracle_kd(student[:, :20], teacher[:, :20], **options)
    keep = torch.arange(13) != 3
    torch.testing.assert_close(losses[keep].double(), torch.from_numpy(values)[keep], **FP32_TOL)
    torch.testing.assert_close(grad[keep, :20].double(), (weights[:, None] * torch.from_numpy(grads))[keep], **FP32_TOL)
    assert losses[3].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"])
def test_teacher_only_masked_tokens_stay_finite(backend, divergence):
    """Tokens the teacher rules out cost nothing but the student's mass on them (no NaN)."""
    student, teacher = logits(11, 17, seed=20), logits(11, 17, seed=21)
    teacher[:, ::3] = -math.inf
    options = dict(divergence=divergence, beta=BETA.get(divergence, 0.5))
    losses, grad, _ = run_per_position(backend, student, teacher, **options)
    assert torch.isfinite(losses).all() and torch.isfinite(grad).all()
    check_against_oracle(backend, student, teacher, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mass_the_student_rules_out_is_infinite_forward_kl(backend):
    student, teacher = logits(3, 8, seed=22), logits(3, 8, seed=23)
    student[1, 2] = -math.inf
    losses = ops.kd_loss(student, teacher, reduction="none", backend=backend)
    assert losses[1].item() == math.inf and torch.isfinite(losses[[0, 2]]).all()
    reverse = ops.kd_loss(teacher, student, reduction="none", divergence="reverse_kl", backend=backend)
    assert reverse[1].item() == math.inf


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_may_hold_anything(backend):
    student, teacher = logits(6, 10, seed=24), logits(6, 10, seed=25)
    student[2] = -math.inf
    teacher[2] = math.nan
    student[4, 3] = math.nan
    labels = label_ids(6, 10, seed=26, ignored=(2, 4))
    for divergence in DIVERGENCES:
        options = dict(divergence=divergence, beta=BETA.get(divergence, 0.5), hard_weight=0.5)
        losses, grad, _ = run_per_position(backend, student, teacher, labels, **options)
        assert losses[[2, 4]].tolist() == [0.0, 0.0]
        assert torch.equal(grad[[2, 4]], torch.zeros(2, 10, dtype=grad.dtype))
        clean = torch.tensor([0, 1, 3, 5])
        values, _ = oracle_kd(student[clean], teacher[clean], labels[clean], **options)
        torch.testing.assert_close(losses[clean].double(), torch.from_numpy(values), **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sparse_teacher_matches_collapsed_formula(backend, divergence):
    skip_if_sparse_teacher_refused(OP, backend)
    n, vocab, k = 21, 40, 6
    student, teacher = logits(n, vocab, seed=27), logits(n, vocab, seed=28)
    top_log_probs, top_ids = torch.log_softmax(teacher / 2.0, -1).topk(k, dim=-1)
    order = torch.randperm(k, generator=torch.Generator().manual_seed(0))  # any id order
    top_log_probs, top_ids = top_log_probs[:, order], top_ids[:, order]
    labels = label_ids(n, vocab, seed=29, ignored=(4,))
    check_against_oracle(backend, student, top_log_probs, labels, teacher_indices=top_ids, divergence=divergence,
                         beta=BETA.get(divergence, 0.5), temperature=2.0, hard_weight=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sparse_teacher_over_the_whole_vocabulary_equals_dense(backend, divergence):
    skip_if_sparse_teacher_refused(OP, backend)
    student, teacher = logits(9, 12, seed=30), logits(9, 12, seed=31)
    temperature = 1.8
    log_probs, ids = torch.log_softmax(teacher / temperature, -1).sort(dim=-1, descending=True)
    options = dict(divergence=divergence, beta=BETA.get(divergence, 0.5), temperature=temperature)
    sparse, sparse_grad, _ = run_per_position(backend, student, log_probs, teacher_indices=ids, **options)
    dense, dense_grad, _ = run_per_position(backend, student, teacher, **options)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_teacher_bad_ids_give_nan_at_their_position_only(backend):
    skip_if_sparse_teacher_refused(OP, backend)
    student = logits(5, 10, seed=32)
    log_probs, ids = torch.log_softmax(logits(5, 10, seed=33), -1).topk(3, dim=-1)
    ids[1, 2] = 10  # out of range
    ids[2, 1] = ids[2, 0]  # repeated
    ids[3, 0] = -1
    labels = torch.tensor([1, 1, 1, 1, -100])
    ids[4, 0] = 99  # an ignored position may hold anything
    losses = ops.kd_loss(student, log_probs, labels, teacher_indices=ids, reduction="none", backend=backend)
    assert torch.isnan(losses[1:4]).all()
    assert torch.isfinite(losses[0]) and losses[4].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "skew_reverse_kl"])
def test_vocab_size_aligns_padded_vocabularies(backend, divergence):
    student, teacher = logits(15, 27, seed=34), logits(15, 32, seed=35)  # both padded beyond 25
    labels = label_ids(15, 25, seed=36, ignored=(2,))
    options = dict(divergence=divergence, beta=0.2, temperature=1.2, hard_weight=0.5, vocab_size=25)
    check_against_oracle(backend, student, teacher, labels, **options)
    losses, grad, _ = run_per_position(backend, student, teacher, labels, **options)
    assert torch.equal(grad[:, 25:], torch.zeros(15, 2))
    sliced, _, _ = run_per_position(backend, student[:, :25], teacher[:, :25], labels, **{**options, "vocab_size": None})
    torch.testing.assert_close(losses, sliced, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_outside_the_vocabulary_give_nan(backend):
    student, teacher = logits(4, 6, seed=37), logits(4, 8, seed=38)
    labels = torch.tensor([0, 6, 5, -1])
    losses = ops.kd_loss(student, teacher, labels, hard_weight=1.0, vocab_size=6, reduction="none", backend=backend)
    assert torch.isfinite(losses[[0, 2]]).all() and torch.isnan(losses[[1, 3]]).all()
    # labels only mark ignored positions when there is no hard term
    soft_only = ops.kd_loss(student, teacher, labels, vocab_size=6, reduction="none", backend=backend)
    assert torch.isfinite(soft_only).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_vocabulary_has_zero_loss(backend):
    student = logits(7, 1, seed=39).requires_grad_(True)
    for divergence in DIVERGENCES:
        loss = ops.kd_loss(student, logits(7, 1, seed=40), torch.zeros(7, dtype=torch.int64), divergence=divergence,
                           hard_weight=1.0, backend=backend)
        (grad,) = torch.autograd.grad(loss, student)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_non_contiguous_inputs(backend):
    student = logits(53, 3, 10, seed=41).permute(1, 2, 0)[:, ::2]  # [3, 5, 53], vocab stride 30
    teacher = logits(3, 5, 106, seed=42)[..., ::2]
    labels = label_ids(30, 53, seed=43, ignored=(4,)).reshape(3, 10)[:, ::2]
    assert not student.is_contiguous() and not teacher.is_contiguous() and not labels.is_contiguous()
    options = dict(divergence="jsd", temperature=1.4, hard_weight=0.3, reduction="none")
    strided = ops.kd_loss(student, teacher, labels, backend=backend, **options)
    flat = ops.kd_loss(student.reshape(15, 53).contiguous(), teacher.reshape(15, 53).contiguous(),
                       labels.reshape(15).contiguous(), backend=backend, **options)
    assert strided.shape == (3, 5)
    torch.testing.assert_close(strided.reshape(15), flat, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_modified_and_teacher_gets_no_gradient(backend):
    student = logits(6, 9, seed=44).requires_grad_(True)
    teacher = logits(6, 9, seed=45).requires_grad_(True)
    labels = label_ids(6, 9, seed=46, ignored=(1,))
    before = [t.detach().clone() for t in (student, teacher, labels)]
    ops.kd_loss(student, teacher, labels, divergence="jsd", hard_weight=0.5, backend=backend).backward()
    for tensor, saved in zip((student, teacher, labels), before):
        assert torch.equal(tensor.detach(), saved)
    assert teacher.grad is None and student.grad is not None


def naive_soft_loss(student, teacher, divergence, beta, temperature):
    """The textbook computation in the inputs' own dtype: the baseline of DESIGN's tolerance rule."""
    log_q = torch.log_softmax(student / temperature, -1)
    log_p = torch.log_softmax(teacher / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        return (p * (log_p - log_q)).sum(-1)
    if divergence == "reverse_kl":
        return (q * (log_q - log_p)).sum(-1)
    if divergence == "jsd":
        log_m = (beta * p + (1 - beta) * q).log()
        return beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    if divergence == "skew_forward_kl":
        return (p * (log_p - (beta * p + (1 - beta) * q).log())).sum(-1)
    if divergence == "skew_reverse_kl":
        return (q * (log_q - (beta * q + (1 - beta) * p).log())).sum(-1)
    return 0.5 * (p - q).abs().sum(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_low_precision_inputs_within_design_tolerance(backend, dtype, divergence):
    """Error against float64 at most 2× that of the naive computation in the input dtype."""
    student, teacher = logits(64, 301, seed=46, dtype=dtype), logits(64, 301, seed=47, dtype=dtype)
    beta, temperature = BETA.get(divergence, 0.5), 1.5

    def value_and_grad(fn, s):
        s = s.detach().clone().requires_grad_(True)
        loss = fn(s)
        (grad,) = torch.autograd.grad(loss.sum(), s)
        return loss.double(), grad.double()

    exact = value_and_grad(lambda s: reference.kd_loss(s, teacher.double(), divergence=divergence, beta=beta,
                                                       temperature=temperature, reduction="none"), student.double())
    ours = value_and_grad(lambda s: ops.kd_loss(s, teacher, divergence=divergence, beta=beta, temperature=temperature,
                                                reduction="none", backend=backend), student)
    naive = value_and_grad(lambda s: naive_soft_loss(s, teacher, divergence, beta, temperature), student)
    assert ours[1].shape == student.shape
    for what, our, base, truth in zip(("loss", "gradient"), ours, naive, exact):
        assert_close_to_reference(our, truth, base, what=what)


@pytest.mark.parametrize(
    "options",
    [
        dict(divergence="forward_kl"),
        dict(divergence="reverse_kl", temperature=1.7),
        dict(divergence="jsd", beta=0.35, temperature=0.8, hard_weight=0.4, scale_by_t2=True),
        dict(divergence="jsd", beta=0.0),
        dict(divergence="jsd", beta=1.0),
        dict(divergence="skew_forward_kl", beta=0.1, soft_weight=0.6),
        dict(divergence="skew_reverse_kl", beta=0.3, reduction="sum"),
        dict(divergence="tvd", temperature=2.0, num_items_in_batch=7.0),
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_reference_gradcheck_float64(options):
    student = logits(4, 5, seed=48, dtype=torch.float64).requires_grad_(True)
    teacher = logits(4, 5, seed=49, dtype=torch.float64)
    labels = torch.tensor([0, -100, 4, 2])
    assert torch.autograd.gradcheck(lambda s: reference.kd_loss(s, teacher, labels, **options), (student,))
    log_probs, ids = torch.log_softmax(teacher, -1).topk(2, dim=-1)
    assert torch.autograd.gradcheck(
        lambda s: reference.kd_loss(s, log_probs, labels, ids, **options), (student,)
    )


def test_reference_computes_float64_in_float64():
    student, teacher = logits(3, 7, seed=50, dtype=torch.float64), logits(3, 7, seed=51, dtype=torch.float64)
    loss = reference.kd_loss(student, teacher, divergence="jsd", reduction="none")
    values, _ = oracle_kd(student, teacher, divergence="jsd")
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, torch.from_numpy(values), rtol=1e-12, atol=1e-14)
