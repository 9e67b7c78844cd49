"""kd_loss and fused_linear_kd_loss on every backend the CPU runs, at the edges where the formulas,
not the tolerance rule, decide: the skew KLs at β = 0 where probabilities underflow, rows that have
no distribution, autocast, and a double backward that a kernel cannot give."""
import contextlib
import math

import pytest
import torch

from collab_ops.ops import distill as ops
from backends import cpu_backends

KD_BACKENDS = cpu_backends("kd_loss")
FUSED_BACKENDS = cpu_backends("fused_linear_kd_loss")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


def kl_float64(log_p_from, log_p_to):
    """KL(from ‖ to) per row from float64 log-probabilities, 0·log 0 = 0."""
    p = log_p_from.exp()
    return torch.where(p > 0, p * (log_p_from - log_p_to), torch.zeros_like(p)).sum(-1)


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("divergence, direction", [("skew_forward_kl", "forward"), ("skew_reverse_kl", "reverse")])
def test_skew_kls_at_beta_zero_are_the_kl_directions_where_probabilities_underflow(backend, divergence, direction):
    # At T = 0.01 most probabilities underflow in fp32 while the log-probabilities stay finite:
    # the exact losses are finite (around 100-400), the mixture form would make them 0 or inf.
    generator = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(4, 50, generator=generator), torch.randn(4, 50, generator=generator)
    temperature = 0.01
    log_p_student = torch.log_softmax(student.double() / temperature, -1)
    log_p_teacher = torch.log_softmax(teacher.double() / temperature, -1)
    expected = (kl_float64(log_p_teacher, log_p_student) if direction == "forward"
                else kl_float64(log_p_student, log_p_teacher))
    assert expected.min() > 10 and torch.isfinite(expected).all()
    loss = ops.kd_loss(student, teacher, divergence=divergence, beta=0.0, temperature=temperature,
                       reduction="none", backend=backend)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-3)
    plain = ops.kd_loss(student, teacher, divergence=f"{direction}_kl", temperature=temperature,
                        reduction="none", backend=backend)
    assert torch.equal(loss, plain)


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_a_row_whose_student_or_teacher_is_all_minus_inf_has_a_nan_loss(backend, divergence):
    generator = torch.Generator().manual_seed(6)
    student, teacher = torch.randn(3, 9, generator=generator), torch.randn(3, 9, generator=generator)
    student[0] = -math.inf
    teacher[1] = -math.inf
    loss = ops.kd_loss(student, teacher, divergence=divergence, reduction="none", backend=backend)
    assert torch.isnan(loss[:2]).all() and torch.isfinite(loss[2])


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_kd_loss_ignores_autocast(backend, reduction):
    """Under autocast the result equals the one without it: the GEMMs run in the inputs' dtypes on
    every backend, and a backward that recomputes the chunks ("none") recomputes the same logits."""
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(12, 16, generator=generator)
    weight = torch.randn(40, 16, generator=generator)
    teacher_hidden, teacher_weight = torch.randn(12, 8, generator=generator), torch.randn(40, 8, generator=generator)
    labels = torch.randint(0, 40, (12,), generator=generator)

    def loss_and_grads(context):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with context:
            loss = ops.fused_linear_kd_loss(h, w, teacher_hidden, teacher_weight, labels, divergence="jsd",
                                            hard_weight=0.5, reduction=reduction, chunk_size=5, backend=backend)
        # backward outside autocast, as torch.autocast's documentation asks
        upstream = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
        (loss * upstream).sum().backward()
        return loss.detach(), h.grad, w.grad

    plain = loss_and_grads(contextlib.nullcontext())
    autocast = loss_and_grads(torch.autocast("cpu", dtype=torch.bfloat16))
    for ours, expected in zip(autocast, plain):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_a_double_backward_through_the_cpu_kd_kernel_raises():
    """The kernel's gradient has no derivative of its own: differentiating it must raise, not leave
    the inputs without a gradient."""
    if "cpu" not in KD_BACKENDS:
        pytest.skip("the compiled kd_loss kernel is not built")
    generator = torch.Generator().manual_seed(8)
    student = torch.randn(6, 11, generator=generator, requires_grad=True)
    teacher = torch.randn(6, 11, generator=generator)
    loss = ops.kd_loss(student, teacher, backend="cpu")
    (grad,) = torch.autograd.grad(loss, student, create_graph=True)
    with pytest.raises(RuntimeError, match="kd_loss \\(cpu\\).*backend='reference'"):
        grad.pow(2).sum().backward()
    # the reference differentiates its gradient
    loss = ops.kd_loss(student, teacher, backend="reference")
    (grad,) = torch.autograd.grad(loss, student, create_graph=True)
    (second,) = torch.autograd.grad(grad.pow(2).sum(), student)
    assert second.abs().sum() > 0
