"""fused_linear_kd_loss of every backend against kd_loss on logits materialised with F.linear."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from collab_ops import _dispatch
from collab_ops.ops import distill as ops
from collab_ops.reference import distill as reference
from tolerance import assert_close_to_reference
from backends import cpu_backends, skip_if_sparse_teacher_refused

OP = "fused_linear_kd_loss"
BACKENDS = cpu_backends(OP)
DIVERGENCES = ops.DIVERGENCES
TOL = dict(rtol=1e-5, atol=1e-6)


def randn(*shape, seed, scale=1.0, dtype=torch.float32):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


def make_case(*, n=23, student_hidden=12, teacher_hidden=20, student_vocab=29, teacher_vocab=29, bias=True,
              ignored=(0, 7, 8), seed=0, dtype=torch.float32):
    """Hidden states and heads sized so that logits have a spread of a few units."""
    case = dict(
        student_hidden=randn(n, student_hidden, seed=seed, dtype=dtype),
        student_weight=randn(student_vocab, student_hidden, seed=seed + 1, scale=student_hidden**-0.5 * 2, dtype=dtype),
        teacher_hidden=randn(n, teacher_hidden, seed=seed + 2, dtype=dtype),
        teacher_weight=randn(teacher_vocab, teacher_hidden, seed=seed + 3, scale=teacher_hidden**-0.5 * 2, dtype=dtype),
    )
    if bias:
        case["student_bias"] = randn(student_vocab, seed=seed + 4, dtype=dtype)
        case["teacher_bias"] = randn(teacher_vocab, seed=seed + 5, dtype=dtype)
    labels = torch.randint(0, min(student_vocab, teacher_vocab), (n,), generator=torch.Generator().manual_seed(seed + 6))
    labels[list(ignored)] = -100
    case["labels"] = labels
    return case


STUDENT_PARAMS = ("student_hidden", "student_weight", "student_bias")


def softcapped(z, cap):
    return z if cap is None else cap * torch.tanh(z / cap)


def materialised_loss(case, *, logit_softcap=None, **options):
    """kd_loss on the full [N, V] logits, by the reference backend (called directly for float64)."""
    student = softcapped(F.linear(case["student_hidden"], case["student_weight"], case.get("student_bias")), logit_softcap)
    if "teacher_logits" in case:
        teacher = case["teacher_logits"]
    else:
        teacher = softcapped(F.linear(case["teacher_hidden"], case["teacher_weight"], case.get("teacher_bias")), logit_softcap)
    if student.dtype == torch.float64:
        return reference.kd_loss(student, teacher, case.get("labels"), case.get("teacher_indices"), **options)
    return ops.kd_loss(student, teacher, case.get("labels"), teacher_indices=case.get("teacher_indices"),
                       backend="reference", **options)


def fused_loss(case, backend, **options):
    return ops.fused_linear_kd_loss(
        case["student_hidden"], case["student_weight"], case.get("teacher_hidden"), case.get("teacher_weight"),
        case.get("labels"), teacher_logits=case.get("teacher_logits"), student_bias=case.get("student_bias"),
        teacher_bias=case.get("teacher_bias"), teacher_indices=case.get("teacher_indices"), backend=backend, **options,
    )


def value_and_student_grads(loss_fn, case, **options):
    case = {k: (v.detach().clone().requires_grad_(k in STUDENT_PARAMS) if v.is_floating_point() else v)
            for k, v in case.items()}
    loss = loss_fn(case, **options)
    params = [case[k] for k in STUDENT_PARAMS if k in case]
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((loss * weights).sum(), params)
    return loss, grads


def assert_fused_matches_materialised(backend, case, *, chunk_size=None, tol=TOL, **options):
    fused, fused_grads = value_and_student_grads(lambda c, **o: fused_loss(c, backend, chunk_size=chunk_size, **o), case, **options)
    expected, expected_grads = value_and_student_grads(materialised_loss, case, **options)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, expected, **tol)
    assert len(fused_grads) == len(expected_grads)
    for got, want in zip(fused_grads, expected_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 100])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_materialised_logits(backend, divergence, chunk_size):
    """Different teacher/student hidden sizes, biases, ignored positions, chunks not dividing N."""
    assert_fused_matches_materialised(
        backend, make_case(seed=10), chunk_size=chunk_size, divergence=divergence, beta=0.3, temperature=1.7,
        scale_by_t2=True, hard_weight=0.3,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_without_bias_and_leading_dims(backend, reduction):
    case = make_case(n=18, bias=False, seed=20)
    case = {k: v.reshape(3, 6, *v.shape[1:]) if k in ("student_hidden", "teacher_hidden", "labels") else v
            for k, v in case.items()}
    assert_fused_matches_materialised(backend, case, chunk_size=4, divergence="reverse_kl", reduction=reduction,
                                      hard_weight=0.1)
    if reduction == "none":
        assert fused_loss(case, backend, reduction="none").shape == (3, 6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_logit_softcap_applies_to_both_sides(backend, divergence):
    case = make_case(seed=30)
    case["student_weight"] = case["student_weight"] * 4  # logits of ±10 so that the cap bites
    case["teacher_weight"] = case["teacher_weight"] * 4
    assert_fused_matches_materialised(backend, case, chunk_size=6, logit_softcap=3.0, divergence=divergence)
    uncapped = fused_loss(case, backend, divergence=divergence)
    assert abs(fused_loss(case, backend, logit_softcap=3.0, divergence=divergence).item() - uncapped.item()) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_given_dense_teacher_logits(backend, softcap):
    case = make_case(seed=40)
    teacher = F.linear(case.pop("teacher_hidden"), case.pop("teacher_weight"), case.pop("teacher_bias"))
    case["teacher_logits"] = teacher
    # the given teacher logits are used as they are; the cap applies to the student's computed logits
    fused, fused_grads = value_and_student_grads(
        lambda c, **o: fused_loss(c, backend, chunk_size=7, **o), case, logit_softcap=softcap, divergence="jsd")
    expected, expected_grads = value_and_student_grads(
        lambda c, **o: ops.kd_loss(softcapped(F.linear(c["student_hidden"], c["student_weight"], c["student_bias"]), softcap),
                                   c["teacher_logits"], c["labels"], backend="reference", **o),
        case, divergence="jsd")
    torch.testing.assert_close(fused, expected, **TOL)
    for got, want in zip(fused_grads, expected_grads):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "skew_reverse_kl"])
def test_given_sparse_teacher(backend, divergence):
    skip_if_sparse_teacher_refused(OP, backend)
    case = make_case(seed=50)
    teacher = F.linear(case.pop("teacher_hidden"), case.pop("teacher_weight"), case.pop("teacher_bias"))
    case["teacher_logits"], case["teacher_indices"] = torch.log_softmax(teacher / 2.0, -1).topk(5, dim=-1)
    assert_fused_matches_materialised(backend, case, chunk_size=4, divergence=divergence, beta=0.2, temperature=2.0,
                                      hard_weight=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_size_aligns_padded_heads(backend):
    case = make_case(student_vocab=29, teacher_vocab=33, seed=60)
    case["labels"] = case["labels"].clamp(max=26)
    assert_fused_matches_materialised(backend, case, chunk_size=9, vocab_size=27, divergence="jsd", hard_weight=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_with_num_items_in_batch(backend):
    """Two micro-batches with num_items_in_batch = all counted tokens give the gradients of one batch."""
    case = make_case(n=30, ignored=(1, 2, 3, 20, 21), seed=70)
    options = dict(divergence="jsd", temperature=2.0, hard_weight=0.5, chunk_size=4)
    whole = {k: (v.clone().requires_grad_(True) if k in STUDENT_PARAMS else v) for k, v in case.items()}
    fused_loss(whole, backend, **options).backward()

    params = {k: case[k].clone().requires_grad_(True) for k in STUDENT_PARAMS}
    num_items = int((case["labels"] != -100).sum())
    total = 0.0
    for rows in (slice(0, 11), slice(11, 30)):
        micro = dict(case, **params)
        for k in ("student_hidden", "teacher_hidden", "labels"):
            micro[k] = micro[k][rows]
        loss = fused_loss(micro, backend, num_items_in_batch=num_items, **options)
        loss.backward()
        total += loss.item()
    assert math.isclose(total, fused_loss(case, backend, **options).item(), rel_tol=1e-6)
    for k in STUDENT_PARAMS:
        torch.testing.assert_close(params[k].grad, whole[k].grad, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient_and_inputs_are_unchanged(backend):
    case = make_case(seed=80)
    case = {k: (v.clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in case.items()}
    before = {k: v.detach().clone() for k, v in case.items()}
    fused_loss(case, backend, divergence="reverse_kl", hard_weight=0.5, chunk_size=5).backward()
    for k in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        assert case[k].grad is None
    for k in STUDENT_PARAMS:
        assert case[k].grad is not None and case[k].grad.abs().sum() > 0
    for k, v in case.items():
        assert torch.equal(v.detach(), before[k])


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any op produces while active (forward and backward). Outputs that
    alias an argument (in-place ops, views; e.g. the Triton interpreter staging a storage as bytes)
    allocate nothing and are not counted."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(ret.alias_info is not None for ret in func._schema.returns):
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_holds_positions_times_vocabulary(backend):
    n, hidden, vocab, chunk = 96, 8, 50, 8
    case = make_case(n=n, student_hidden=hidden, teacher_hidden=hidden, student_vocab=vocab, teacher_vocab=vocab, seed=90)
    case = {k: (v.clone().requires_grad_(True) if k in STUDENT_PARAMS else v) for k, v in case.items()}
    with LargestOutput() as probe:
        fused_loss(case, backend, divergence="jsd", hard_weight=0.5, chunk_size=chunk).backward()
    assert case["student_weight"].grad is not None
    # inputs are n × hidden and vocab × hidden; a chunk's logits are chunk × vocab
    assert probe.largest <= max(n * hidden, chunk * vocab * 2) < n * vocab


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_positions_gives_zero_and_a_gradient(backend):
    case = make_case(n=0, ignored=(), seed=100)
    case = {k: (v.clone().requires_grad_(True) if k in STUDENT_PARAMS else v) for k, v in case.items()}
    loss = fused_loss(case, backend, hard_weight=1.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(case["student_weight"].grad, torch.zeros_like(case["student_weight"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_within_design_tolerance(backend):
    """Error against float64 at most 2× that of the naive bf16 computation (logits materialised in bf16)."""
    case = make_case(n=48, student_hidden=64, teacher_hidden=96, student_vocab=257, teacher_vocab=257, seed=110,
                     dtype=torch.bfloat16)
    options = dict(divergence="jsd", temperature=1.5, hard_weight=0.3)
    fused, fused_grads = value_and_student_grads(lambda c, **o: fused_loss(c, backend, chunk_size=16, **o), case, **options)
    exact, exact_grads = value_and_student_grads(
        materialised_loss, {k: (v.double() if v.is_floating_point() else v) for k, v in case.items()}, **options)

    def naive(c, **o):  # bf16 logits, bf16 log-softmax/KL/CE
        s = F.linear(c["student_hidden"], c["student_weight"], c["student_bias"])
        t = F.linear(c["teacher_hidden"], c["teacher_weight"], c["teacher_bias"])
        counted = c["labels"] != -100
        log_q, log_p = torch.log_softmax(s / 1.5, -1), torch.log_softmax(t / 1.5, -1)
        log_m = (0.5 * log_p.exp() + 0.5 * log_q.exp()).log()
        soft = 0.5 * (log_p.exp() * (log_p - log_m)).sum(-1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1)
        hard = F.cross_entropy(s, c["labels"].clamp(min=0), reduction="none")
        return ((soft + 0.3 * hard) * counted).sum() / counted.sum()

    base, base_grads = value_and_student_grads(naive, case)
    for what, ours, baseline, truth in zip(("loss", *STUDENT_PARAMS), (fused, *fused_grads), (base, *base_grads),
                                           (exact, *exact_grads)):
        assert_close_to_reference(ours, truth, baseline, what=what)


needs_cpu_backend = pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend (C++ extension) is not built")


@needs_cpu_backend
def test_cpu_is_picked_for_dense_teachers_and_sparse_ones_go_to_the_reference():
    dense = make_case(seed=120)
    sparse = dict(dense)
    teacher = F.linear(sparse.pop("teacher_hidden"), sparse.pop("teacher_weight"), sparse.pop("teacher_bias"))
    sparse["teacher_logits"], sparse["teacher_indices"] = torch.log_softmax(teacher, -1).topk(3, dim=-1)
    for case, expected in ((dense, "cpu"), (sparse, "reference")):
        with _dispatch.recording() as chosen:
            fused_loss(case, None)
        assert [impl.backend for impl in chosen] == [expected]


@needs_cpu_backend
def test_cpu_mean_graph_allows_one_backward_and_none_allows_several():
    case = make_case(seed=130)
    hidden = case["student_hidden"].clone().requires_grad_(True)
    per_position = fused_loss(dict(case, student_hidden=hidden), "cpu", reduction="none", chunk_size=5)
    per_position.sum().backward(retain_graph=True)
    first = hidden.grad.clone()
    per_position.sum().backward()
    torch.testing.assert_close(hidden.grad, 2 * first)

    mean = fused_loss(dict(case, student_hidden=hidden), "cpu", chunk_size=5)
    mean.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        mean.backward()


@needs_cpu_backend
@pytest.mark.parametrize("student_dtype, teacher_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_cpu_low_precision_and_mixed_teacher_dtype(student_dtype, teacher_dtype):
    case = make_case(n=40, student_hidden=32, teacher_hidden=48, student_vocab=101, teacher_vocab=101, seed=140)
    case = {k: v.to(student_dtype if k.startswith("student") else teacher_dtype) if v.is_floating_point() else v
            for k, v in case.items()}
    options = dict(divergence="skew_reverse_kl", beta=0.3, hard_weight=0.4, logit_softcap=4.0, chunk_size=16)
    fused, fused_grads = value_and_student_grads(lambda c, **o: fused_loss(c, "cpu", **o), case, **options)
    expected, expected_grads = value_and_student_grads(lambda c, **o: fused_loss(c, "reference", **o), case, **options)
    torch.testing.assert_close(fused, expected, rtol=2e-2, atol=2e-3)
    for got, want in zip(fused_grads, expected_grads):
        assert got.dtype == want.dtype == student_dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-3)
