"""The compiled kd_loss kernels (backend "cpu") against the reference: values and gradients on
random inputs with masked tokens, ignored positions, padded vocabularies and mixed dtypes; the
operators under torch's opcheck; what `supports` refuses."""
import itertools
import math

import pytest
import torch

import collab_ops
from collab_ops import _dispatch
from collab_ops.ops import distill as ops
from collab_ops.reference import distill as reference
from test_distill_reference import naive_soft_loss
from tolerance import assert_close_to_reference

pytestmark = pytest.mark.skipif(
    "cpu" not in collab_ops.available_backends() or "cpu" not in _dispatch.registered_backends("kd_loss"),
    reason="the compiled kd_loss kernel is not built",
)

BETA = {"jsd": 0.3, "skew_forward_kl": 0.2, "skew_reverse_kl": 0.6}


def random_case(n, vocab, *, seed, dtypes=(torch.float32, torch.float32), padding=(0, 0), masked=True, ignored=True,
                teacher_only=True):
    """Student/teacher logits with −inf tokens (shared, teacher-only and one row keeping a single
    token) and labels with ignored positions whose rows hold garbage. Teacher-only −inf makes
    reverse_kl infinite, so its cases leave them out."""
    generator = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(n, vocab + padding[0], generator=generator, dtype=torch.float64)
    teacher = 3 * torch.randn(n, vocab + padding[1], generator=generator, dtype=torch.float64)
    if masked and vocab > 2:
        both = torch.rand(n, vocab, generator=generator) < 0.1
        both[:, 0] = False  # every row keeps a token
        student[:, :vocab][both] = -math.inf
        teacher[:, :vocab][both] = -math.inf
        only = (torch.rand(n, vocab, generator=generator) < (0.1 if teacher_only else 0.0)) & ~both
        only[:, 0] = False
        teacher[:, :vocab][only] = -math.inf
        student[0, 1:vocab] = teacher[0, 1:vocab] = -math.inf
    labels = torch.randint(0, vocab, (n,), generator=generator)
    if ignored and n > 2:
        labels[1::3] = -100
        student[1] = -math.inf  # an ignored row may hold anything
        teacher[1] = math.nan
    return student.to(dtypes[0]), teacher.to(dtypes[1]), labels


def loss_and_grad(fn, student):
    student = student.detach().clone().requires_grad_(True)
    loss = fn(student)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (grad,) = torch.autograd.grad((loss * weights).sum(), student)
    return loss.detach(), grad


def check_kernel(student, teacher, labels, **options):
    """Kernel (in the inputs' dtypes) vs the float64 reference, within DESIGN's tolerance rule:
    at most 2× the error of the reference run in fp32 on the same inputs, its gradient rounded to
    the student's dtype as the kernel's is."""
    kernel = loss_and_grad(lambda s: ops.kd_loss(s, teacher, labels, backend="cpu", **options), student)
    exact = loss_and_grad(lambda s: reference.kd_loss(s, teacher.double(), labels, **options), student.double())
    working_loss, working_grad = loss_and_grad(
        lambda s: reference.kd_loss(s, teacher.float(), labels, **options), student.float()
    )
    working = (working_loss, working_grad.to(student.dtype))
    assert kernel[0].dtype == torch.float32 and kernel[1].dtype == student.dtype
    for what, ours, truth, baseline in zip(("loss", "gradient"), kernel, exact, working):
        assert_close_to_reference(ours, truth, baseline, what=what)


@pytest.mark.parametrize("vocab", [1, 7, 1500])
@pytest.mark.parametrize("divergence", ops.DIVERGENCES)
@pytest.mark.parametrize("reduction", ops.REDUCTIONS)
def test_kernel_matches_reference(divergence, reduction, vocab):
    student, teacher, labels = random_case(9, vocab, seed=vocab, padding=(3, 5), teacher_only=divergence != "reverse_kl")
    check_kernel(student, teacher, labels, divergence=divergence, beta=BETA.get(divergence, 0.5), temperature=1.7,
                 hard_weight=0.4, soft_weight=0.8, scale_by_t2=True, reduction=reduction, vocab_size=vocab)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                    (torch.float32, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("divergence", ops.DIVERGENCES)
def test_mixed_and_low_precision_inputs(divergence, dtypes):
    student, teacher, labels = random_case(6, 301, seed=11, dtypes=dtypes, teacher_only=divergence != "reverse_kl")
    check_kernel(student, teacher, labels, divergence=divergence, beta=BETA.get(divergence, 0.5), temperature=0.9,
                 hard_weight=0.3)


@pytest.mark.parametrize("divergence", ops.DIVERGENCES)
def test_full_vocabulary_rows(divergence):
    """32000 tokens (more than 31 tiles) with fp32 and bf16 inputs: the long sums stay within the rule."""
    for dtype in (torch.float32, torch.bfloat16):
        student, teacher, labels = random_case(3, 32000, seed=12, dtypes=(dtype, dtype), ignored=False,
                                               teacher_only=divergence != "reverse_kl")
        check_kernel(student, teacher, labels, divergence=divergence, beta=BETA.get(divergence, 0.5),
                     temperature=2.0, hard_weight=0.5, reduction="none")


def test_low_precision_error_is_at_most_twice_the_naive_computation():
    """DESIGN's rule against the textbook computation in bf16, as test_distill_reference does, at V = 32000."""
    student, teacher, _ = random_case(4, 32000, seed=13, dtypes=(torch.bfloat16, torch.bfloat16), masked=False,
                                      ignored=False)
    for divergence in ops.DIVERGENCES:
        options = dict(divergence=divergence, beta=BETA.get(divergence, 0.5), temperature=1.5, reduction="none")
        ours = loss_and_grad(lambda s: ops.kd_loss(s, teacher, backend="cpu", **options), student)
        exact = loss_and_grad(lambda s: reference.kd_loss(s, teacher.double(), **options), student.double())
        naive = loss_and_grad(lambda s: naive_soft_loss(s, teacher, divergence, options["beta"], 1.5), student)
        for what, our, truth, base in zip(("loss", "gradient"), ours, exact, naive):
            assert_close_to_reference(our, truth, base, what=f"{divergence} {what}")


@pytest.mark.parametrize("num_items", [None, 5.0, torch.tensor(12)])
def test_mean_reduction_and_num_items_in_batch(num_items):
    student, teacher, labels = random_case(10, 33, seed=14)
    check_kernel(student, teacher, labels, divergence="jsd", hard_weight=0.7, reduction="mean",
                 num_items_in_batch=num_items)


def test_nan_logits_and_labels_outside_the_vocabulary_give_nan_where_the_reference_does():
    student, teacher, labels = random_case(5, 9, seed=15, masked=False, ignored=False)
    student[2, 4] = math.nan
    labels[3] = 9
    options = dict(divergence="forward_kl", hard_weight=1.0, reduction="none")
    ours = ops.kd_loss(student, teacher, labels, backend="cpu", **options)
    expected = reference.kd_loss(student, teacher, labels, **options)
    assert torch.equal(torch.isnan(ours), torch.isnan(expected)) and torch.isnan(ours[[2, 3]]).all()
    torch.testing.assert_close(ours[[0, 1, 4]], expected[[0, 1, 4]])


def test_jsd_endpoints_are_bitwise_the_kl_directions_at_full_width():
    student, teacher, labels = random_case(4, 4000, seed=16, teacher_only=False)
    for beta, same_as in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = loss_and_grad(lambda s: ops.kd_loss(s, teacher, labels, divergence="jsd", beta=beta, backend="cpu"), student)
        kl = loss_and_grad(lambda s: ops.kd_loss(s, teacher, labels, divergence=same_as, backend="cpu"), student)
        assert torch.equal(jsd[0], kl[0]) and torch.equal(jsd[1], kl[1])


def test_beta_within_float_rounding_of_one_is_still_a_jsd():
    """β = 0.99999999 rounds to 1.0f: the endpoint must be resolved from the double, or the kernel
    runs reverse KL (an O(1) loss where the JSD is ~1e-8)."""
    student, teacher, labels = random_case(4, 50, seed=18, masked=False, ignored=False)
    options = dict(divergence="jsd", beta=0.99999999)
    ours = ops.kd_loss(student, teacher, labels, backend="cpu", **options)
    exact = reference.kd_loss(student.double(), teacher.double(), labels, **options)
    assert abs(float(ours) - float(exact)) < 1e-6 < float(ops.kd_loss(student, teacher, labels, divergence="reverse_kl"))


def test_gradient_past_vocab_size_is_zero_when_the_row_loss_is_infinite():
    """reverse KL is +inf where the teacher rules out a token the student keeps: the columns past
    vocab_size still get 0, not the padding lanes' 0 · inf."""
    student, teacher = torch.randn(2, 8), torch.randn(2, 8)
    teacher[0, 2] = -math.inf
    grad = loss_and_grad(lambda s: ops.kd_loss(s, teacher, None, divergence="reverse_kl", vocab_size=5,
                                               reduction="none", backend="cpu"), student)[1]
    assert torch.equal(grad[:, 5:], torch.zeros(2, 3))


@pytest.mark.parametrize("divergence", ops.DIVERGENCES)
def test_large_logits_keep_their_log_probabilities_accurate(divergence):
    """Logits around 40, as an LM head gives: the row's log-normaliser kept as (max, log Σ), as
    torch's log_softmax does; one fp32 log-sum-exp would put its ~2e-6 rounding into every term
    (3-13x over the tolerance rule before)."""
    generator = torch.Generator().manual_seed(19)
    student = 10 * torch.randn(6, 300, generator=generator) + 40
    teacher = 10 * torch.randn(6, 300, generator=generator) + 40
    labels = torch.randint(0, 300, (6,), generator=generator)
    check_kernel(student, teacher, labels, divergence=divergence, beta=BETA.get(divergence, 0.5), hard_weight=0.5,
                 reduction="none")


def test_float64_num_items_in_batch_keeps_a_float32_loss():
    student, teacher, labels = random_case(6, 20, seed=20, masked=False)
    for backend in ("cpu", "reference"):
        loss = ops.kd_loss(student, teacher, labels, num_items_in_batch=torch.tensor(7.0, dtype=torch.float64),
                           backend=backend)
        assert loss.dtype == torch.float32, backend


def test_results_do_not_depend_on_the_thread_count():
    student, teacher, labels = random_case(16, 2100, seed=17)
    run = lambda: loss_and_grad(  # noqa: E731
        lambda s: ops.kd_loss(s, teacher, labels, divergence="skew_reverse_kl", hard_weight=0.2, reduction="none",
                              backend="cpu"), student)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    parallel = run()
    assert torch.equal(single[0], parallel[0]) and torch.equal(single[1], parallel[1])


def test_teacher_gets_no_gradient_and_inputs_are_untouched():
    student, teacher, labels = random_case(4, 20, seed=18, dtypes=(torch.bfloat16, torch.float16))
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    saved = [student.detach().clone(), teacher.detach().clone()]
    ops.kd_loss(student, teacher, labels, divergence="tvd", hard_weight=0.5, backend="cpu").backward()
    assert teacher.grad is None and student.grad.dtype == torch.bfloat16
    for tensor, before in zip((student, teacher), saved):
        torch.testing.assert_close(tensor.detach(), before, rtol=0, atol=0, equal_nan=True)


def test_sparse_teachers_are_refused_and_left_to_the_reference():
    student, log_probs = torch.randn(2, 5), torch.full((2, 1), -0.5)
    sparse = dict(teacher_indices=torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(collab_ops.BackendUnavailableError, match="dense teachers"):
        ops.kd_loss(student, log_probs, backend="cpu", **sparse)
    torch.testing.assert_close(ops.kd_loss(student, log_probs, **sparse),
                               ops.kd_loss(student, log_probs, backend="reference", **sparse))


def _opcheck_samples():
    student, teacher, labels = random_case(5, 12, seed=19, dtypes=(torch.bfloat16, torch.float32), padding=(2, 0))
    yield (student, teacher, labels, "jsd", 0.4, 1.3, 0.7, 0.5, -100, 12)
    clean_student, clean_teacher, _ = random_case(5, 12, seed=20, masked=False, ignored=False)
    yield (clean_student[:, ::2], clean_teacher[:, 1::2], None, "tvd", 0.5, 1.0, 1.0, 0.0, -100, 6)
    yield (torch.randn(0, 4), torch.randn(0, 4), torch.zeros(0, dtype=torch.int64), "forward_kl", 0.5, 1.0, 1.0, 1.0,
           -100, 4)


@pytest.mark.parametrize("case", range(3))
def test_kd_loss_forward_opcheck(case):
    args = list(_opcheck_samples())[case]
    student = args[0].detach().clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.collab_ops.kd_loss_forward.default, (student,) + args[1:])


@pytest.mark.parametrize("case", range(3))
def test_kd_loss_backward_opcheck(case):
    args = list(_opcheck_samples())[case]
    _, row_stats = torch.ops.collab_ops.kd_loss_forward(*args)
    grad = torch.rand(args[0].shape[0])
    torch.library.opcheck(torch.ops.collab_ops.kd_loss_backward.default, (grad,) + args[:3] + (row_stats,) + args[3:])


def test_compiled_ops_reject_bad_arguments_with_clear_errors():
    s, t = torch.randn(2, 8), torch.randn(2, 8)
    forward = torch.ops.collab_ops.kd_loss_forward
    with pytest.raises(ValueError, match="vocab_size"):
        forward(s, t, None, "forward_kl", 0.5, 1.0, 1.0, 0.0, -100, 9)
    with pytest.raises(ValueError, match="unknown divergence"):
        forward(s, t, None, "kl", 0.5, 1.0, 1.0, 0.0, -100, 8)
    with pytest.raises(TypeError, match="student_logits"):
        forward(s.double(), t, None, "forward_kl", 0.5, 1.0, 1.0, 0.0, -100, 8)
    with pytest.raises(TypeError, match="labels"):
        forward(s, t, torch.zeros(2, dtype=torch.int32), "forward_kl", 0.5, 1.0, 1.0, 1.0, -100, 8)
    with pytest.raises(ValueError, match="temperature"):
        forward(s, t, None, "forward_kl", 0.5, 0.0, 1.0, 0.0, -100, 8)
