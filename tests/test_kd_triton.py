"""The triton backend of kd_loss and fused_linear_kd_loss against the reference backend.

Runs on CUDA tensors when a GPU is present, else on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1 must be set before triton is imported, so it cannot be set here). The row
kernel's block is shrunk to 16 columns so that every row spans several blocks, a partial one
included: the online log-sum-exp merge and the reversed passes are exercised at small sizes.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import collab_ops
from collab_ops import _dispatch
from collab_ops.ops import distill as ops

if "triton" not in collab_ops.available_backends():
    pytest.skip("triton is not available here (needs CUDA, or TRITON_INTERPRET=1 for CPU tensors)",
                allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

from collab_ops.triton import distill as triton_distill  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
TOL = dict(rtol=2e-5, atol=2e-6)
STUDENT_PARAMS = ("student_hidden", "student_weight", "student_bias")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(triton_distill, "MAX_BLOCK_V_INTERPRETER", 16)
    monkeypatch.setattr(triton_distill, "MAX_BLOCK_V_CUDA", 16)


def randn(*shape, seed, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def make_case(*, n=13, student_hidden=8, teacher_hidden=12, vocab=37, teacher_vocab=None, ignored=(0, 6), seed=0):
    teacher_vocab = teacher_vocab or vocab
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed + 6))
    labels[list(ignored)] = -100
    return dict(
        student_hidden=randn(n, student_hidden, seed=seed),
        student_weight=randn(vocab, student_hidden, seed=seed + 1, scale=2 * student_hidden**-0.5),
        student_bias=randn(vocab, seed=seed + 2),
        teacher_hidden=randn(n, teacher_hidden, seed=seed + 3),
        teacher_weight=randn(teacher_vocab, teacher_hidden, seed=seed + 4, scale=2 * teacher_hidden**-0.5),
        teacher_bias=randn(teacher_vocab, seed=seed + 5),
        labels=labels.to(DEVICE),
    )


def fused(case, backend, **options):
    return ops.fused_linear_kd_loss(
        case["student_hidden"], case["student_weight"], case.get("teacher_hidden"), case.get("teacher_weight"),
        case.get("labels"), teacher_logits=case.get("teacher_logits"), student_bias=case.get("student_bias"),
        teacher_bias=case.get("teacher_bias"), backend=backend, **options)


def loss_and_grads(case, backend, **options):
    """The loss and the gradients of Σ w·loss for fixed random weights w (so "none" is checked too)."""
    case = {k: (v.detach().clone().requires_grad_(k in STUDENT_PARAMS) if v.is_floating_point() else v)
            for k, v in case.items()}
    loss = fused(case, backend, **options)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    params = [case[k] for k in STUDENT_PARAMS if case.get(k) is not None]
    return loss, torch.autograd.grad((loss * weights).sum(), params)


def assert_matches_reference(case, **options):
    loss, grads = loss_and_grads(case, "triton", **options)
    expected, expected_grads = loss_and_grads(case, "reference", **options)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, **TOL)
    for name, got, want in zip(STUDENT_PARAMS, grads, expected_grads):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{name}: {m}")


DIVERGENCE_CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0),
                    ("skew_forward_kl", 0.1), ("skew_reverse_kl", 0.25), ("tvd", 0.5)]


@pytest.mark.parametrize("divergence, beta", DIVERGENCE_CASES)
def test_fused_every_divergence_hidden_weight_bias_gradients(divergence, beta):
    """Chunks of 5 over 13 positions, different hidden sizes, biases, ignored positions, T ≠ 1
    with the hard term (its own normaliser), T² scaling."""
    assert_matches_reference(make_case(seed=10), chunk_size=5, divergence=divergence, beta=beta, temperature=1.6,
                             scale_by_t2=True, soft_weight=0.8, hard_weight=0.3)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_reductions_and_custom_ignore_index(reduction):
    case = make_case(seed=20, ignored=())
    case["labels"][[2, 3, 11]] = 5
    assert_matches_reference(case, chunk_size=4, divergence="jsd", temperature=1.0, hard_weight=0.5,
                             ignore_index=5, reduction=reduction)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_fused_logit_softcap_on_both_sides(divergence):
    case = make_case(seed=30)
    case["student_weight"] = case["student_weight"] * 4  # logits around ±10 so that a cap of 3 bites
    case["teacher_weight"] = case["teacher_weight"] * 4
    assert_matches_reference(case, chunk_size=6, logit_softcap=3.0, divergence=divergence, hard_weight=0.2)


def test_fused_given_teacher_logits_vocab_size_and_no_bias():
    case = make_case(seed=40, teacher_vocab=41)
    case["teacher_logits"] = F.linear(case.pop("teacher_hidden"), case.pop("teacher_weight"), case.pop("teacher_bias"))
    del case["student_bias"]
    case["labels"] = case["labels"].clamp(max=33)
    assert_matches_reference(case, chunk_size=3, vocab_size=34, logit_softcap=4.0, divergence="skew_reverse_kl",
                             beta=0.4, hard_weight=0.4)


def test_fused_no_positions_counted_and_hard_term_only():
    case = make_case(n=6, seed=50, ignored=range(6))
    assert_matches_reference(case, chunk_size=4, soft_weight=0.0, hard_weight=1.0)
    assert_matches_reference(make_case(n=7, seed=51), chunk_size=4, soft_weight=0.0, hard_weight=1.0)


def test_fused_gradient_accumulation_with_num_items_in_batch():
    """Two micro-batches divided by the whole batch's counted positions add up to the whole batch."""
    case = make_case(n=17, seed=60, ignored=(1, 2, 12))
    options = dict(divergence="jsd", temperature=2.0, hard_weight=0.5, chunk_size=4)
    whole = {k: (v.clone().requires_grad_(True) if k in STUDENT_PARAMS else v) for k, v in case.items()}
    whole_loss = fused(whole, "triton", **options)
    whole_loss.backward()
    num_items = torch.tensor(int((case["labels"] != -100).sum()))
    params = {k: case[k].clone().requires_grad_(True) for k in STUDENT_PARAMS}
    total = 0.0
    for rows in (slice(0, 7), slice(7, 17)):
        micro = dict(case, **params)
        for k in ("student_hidden", "teacher_hidden", "labels"):
            micro[k] = micro[k][rows]
        loss = fused(micro, "triton", num_items_in_batch=num_items, **options)
        loss.backward()
        total += loss.item()
    assert math.isclose(total, whole_loss.item(), rel_tol=1e-6)
    for k in STUDENT_PARAMS:
        torch.testing.assert_close(params[k].grad, whole[k].grad, **TOL)


def test_fused_eager_gradients_allow_one_backward():
    case = {k: (v.clone().requires_grad_(True) if k in STUDENT_PARAMS else v) for k, v in make_case(seed=70).items()}
    loss = fused(case, "triton", chunk_size=5)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()


def test_fused_without_grad_computes_the_loss_only():
    case = make_case(seed=80)
    with torch.no_grad():
        loss = fused(case, "triton", chunk_size=5, divergence="reverse_kl")
    expected = fused(case, "reference", chunk_size=5, divergence="reverse_kl")
    torch.testing.assert_close(loss, expected.detach(), **TOL)


def kd_loss_and_grad(backend, student, teacher, labels, **options):
    student = student.detach().clone().requires_grad_(True)
    loss = ops.kd_loss(student, teacher, labels, backend=backend, **options)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    (grad,) = torch.autograd.grad((loss * weights).sum(), student)
    return loss, grad


@pytest.mark.parametrize("divergence, beta", DIVERGENCE_CASES)
def test_kd_loss_every_divergence_with_masked_tokens_across_blocks(divergence, beta):
    """Tokens −inf on both sides in some blocks and a whole masked block; T ≠ 1 with the hard term."""
    student, teacher = randn(9, 53, seed=90, scale=3.0), randn(9, 53, seed=91, scale=3.0)
    masked = torch.zeros(9, 53, dtype=torch.bool, device=DEVICE)
    masked[:, 16:32] = True
    masked[2, ::3] = True
    student[masked] = -math.inf
    teacher[masked] = -math.inf
    labels = torch.tensor([1, 40, 4, -100, 7, 9, 50, 0, 13], device=DEVICE)
    options = dict(divergence=divergence, beta=beta, temperature=1.7, hard_weight=0.3, reduction="none")
    loss, grad = kd_loss_and_grad("triton", student, teacher, labels, **options)
    expected, expected_grad = kd_loss_and_grad("reference", student, teacher, labels, **options)
    torch.testing.assert_close(loss, expected, **TOL)
    torch.testing.assert_close(grad, expected_grad, **TOL)
    assert torch.equal(grad[masked], torch.zeros_like(grad[masked]))


@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("jsd", 0.5)])
@pytest.mark.parametrize("programs", [1, 4])
def test_persistent_row_programs_give_the_same_loss_and_gradient(monkeypatch, divergence, beta, programs):
    """ROW_PROGRAMS caps the programs: each then takes every P-th row (ignored rows included)."""
    student, teacher = randn(11, 37, seed=95, scale=3.0), randn(11, 37, seed=96, scale=3.0)
    labels = torch.tensor([1, -100, 4, 30, 7, -100, 20, 0, 13, 2, 36], device=DEVICE)
    options = dict(divergence=divergence, beta=beta, temperature=1.3, hard_weight=0.4, reduction="sum")
    expected = kd_loss_and_grad("triton", student, teacher, labels, **options)
    monkeypatch.setattr(triton_distill, "ROW_PROGRAMS", programs)
    actual = kd_loss_and_grad("triton", student, teacher, labels, **options)
    for got, want in zip(actual, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("divergence, beta", DIVERGENCE_CASES)
def test_kd_loss_large_logits_keep_their_log_probabilities_accurate(divergence, beta):
    """Logits around 40 (an LM head's): the log-normalisers kept as (max, log Σ), within the
    tolerance rule against the float64 reference (a single fp32 log-sum-exp was 2-6x over it)."""
    from collab_ops.reference import distill as reference
    from tolerance import assert_close_to_reference

    def reference_loss_and_grad(student, teacher):  # the oracle itself, which takes float64
        student = student.detach().clone().requires_grad_(True)
        loss = reference.kd_loss(student, teacher, labels, **options)
        weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE, loss.dtype)
        return loss, torch.autograd.grad((loss * weights).sum(), student)[0]

    student, teacher = randn(6, 300, seed=95, scale=10.0) + 40, randn(6, 300, seed=96, scale=10.0) + 40
    labels = torch.randint(0, 300, (6,), generator=torch.Generator().manual_seed(97)).to(DEVICE)
    options = dict(divergence=divergence, beta=beta, hard_weight=0.5, reduction="none")
    ours = kd_loss_and_grad("triton", student, teacher, labels, **options)
    exact = reference_loss_and_grad(student.double(), teacher.double())
    working = reference_loss_and_grad(student, teacher)
    for what, got, truth, baseline in zip(("loss", "gradient"), ours, exact, working):
        assert_close_to_reference(got.detach().cpu(), truth.detach().cpu(), baseline.detach().cpu(),
                                  what=f"{divergence} {what}")


def test_kd_loss_label_outside_the_vocabulary_sends_no_gradient():
    """Its loss is NaN; its row's hard term sends nothing (as on the cpu backend and the reference)."""
    student, teacher = randn(2, 6, seed=98), randn(2, 6, seed=99)
    labels = torch.tensor([7, 2], device=DEVICE)
    options = dict(divergence="forward_kl", soft_weight=0.0, hard_weight=1.0, reduction="none")
    loss, grad = kd_loss_and_grad("triton", student, teacher, labels, **options)
    expected, expected_grad = kd_loss_and_grad("reference", student, teacher, labels, **options)
    assert torch.isnan(loss[0]) and torch.equal(grad[0], torch.zeros_like(grad[0]))
    torch.testing.assert_close(grad, expected_grad, **TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kd_loss_vocab_size_and_low_precision(reduction):
    student, teacher = randn(11, 40, seed=92, scale=3.0).half(), randn(11, 45, seed=93, scale=3.0).bfloat16()
    labels = torch.randint(0, 35, (11,), generator=torch.Generator().manual_seed(94)).to(DEVICE)
    options = dict(divergence="jsd", beta=0.6, hard_weight=0.2, vocab_size=35, reduction=reduction,
                   num_items_in_batch=20.0 if reduction == "mean" else None)
    loss, grad = kd_loss_and_grad("triton", student, teacher, labels, **options)
    expected, expected_grad = kd_loss_and_grad("reference", student, teacher, labels, **options)
    assert grad.dtype == torch.float16 and torch.equal(grad[:, 35:], torch.zeros_like(grad[:, 35:]))
    torch.testing.assert_close(loss, expected, **TOL)
    torch.testing.assert_close(grad, expected_grad, rtol=2e-3, atol=1e-5)  # fp16 gradient storage


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kd_loss_backward_with_grad_output_one_keeps_the_forward_gradient(reduction):
    """loss.backward(): the gradient written in forward is returned as it is (its rows are not
    rescaled); a second backward through the same graph is refused."""
    student, teacher = randn(7, 300, seed=110, scale=3.0), randn(7, 300, seed=111, scale=3.0)
    labels = torch.tensor([3, -100, 5, 299, 0, 17, 42], device=DEVICE)
    options = dict(divergence="forward_kl", hard_weight=0.5, reduction=reduction)
    grads = {}
    for backend in ("triton", "reference"):
        leaf = student.detach().clone().requires_grad_(True)
        loss = ops.kd_loss(leaf, teacher, labels, backend=backend, **options)
        loss.backward(retain_graph=True)
        grads[backend] = leaf.grad
        if backend == "triton":
            with pytest.raises(RuntimeError, match="single backward"):
                loss.backward()
    torch.testing.assert_close(grads["triton"], grads["reference"], **TOL)


def test_sparse_teacher_is_refused_with_a_reason():
    student = randn(3, 10, seed=95)
    log_probs, ids = torch.log_softmax(randn(3, 10, seed=96), -1).topk(2, dim=-1)
    with pytest.raises(_dispatch.BackendUnavailableError, match="sparse teacher"):
        ops.kd_loss(student, log_probs, teacher_indices=ids, backend="triton")
    with pytest.raises(_dispatch.BackendUnavailableError, match="sparse teacher"):
        ops.fused_linear_kd_loss(randn(3, 4, seed=97), randn(10, 4, seed=98), teacher_logits=log_probs,
                                 teacher_indices=ids, backend="triton")


def test_default_chunk_size_follows_the_logit_budget():
    # bf16 student and teacher at V=128256: 512 positions fill the 256 MiB budget
    assert triton_distill.default_chunk_size(4096, 128256 * 2 * 2) == 512
    assert triton_distill.default_chunk_size(100, 128256 * 2 * 2) == 100
    assert triton_distill.default_chunk_size(4096, 10**12) == 1
