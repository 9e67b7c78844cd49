"""weak_to_strong_loss, attention_transfer_loss and hidden_cosine_loss against independent float64
implementations of the published code (openai/weak-to-strong, szagoruyko/attention-transfer,
DistilBERT's CosineEmbeddingLoss)."""
import numpy as np
import pytest
import scipy.special as sp
import torch
import torch.nn.functional as F

from collab_ops.ops import distill as ops
from collab_ops.reference import distill as reference
from backends import cpu_backends


W2S_BACKENDS = cpu_backends("weak_to_strong_loss")
AT_BACKENDS = cpu_backends("attention_transfer_loss")
COSINE_BACKENDS = cpu_backends("hidden_cosine_loss")
TOL = dict(rtol=1e-5, atol=1e-6)


def randn(*shape, seed, scale=1.0, dtype=torch.float32):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(dtype)


def logconf_oracle(logits, weak, aux_coef, warmup_frac, step_frac):
    """openai/weak-to-strong logconf_loss_fn in numpy: loss and its gradient w.r.t. the logits."""
    z, labels = logits.double().numpy(), weak.double().numpy()
    coef = aux_coef * (1.0 if step_frac > warmup_frac else step_frac)
    preds = sp.softmax(z, axis=-1)
    if z.shape[1] == 2:
        threshold = np.quantile(preds[:, 0], labels.mean(0)[1])  # linear interpolation, as torch.quantile
        strong = np.stack([preds[:, 0] >= threshold, preds[:, 0] < threshold], axis=1).astype(np.float64)
    else:
        strong = np.eye(z.shape[1])[preds.argmax(-1)]
    target = labels * (1 - coef) + strong * coef
    loss = -(target * sp.log_softmax(z, axis=-1)).sum(-1).mean()
    grad = (preds * target.sum(-1, keepdims=True) - target) / z.shape[0]
    return loss, grad, strong


def soft_labels(n, classes, *, seed):
    return torch.softmax(randn(n, classes, seed=seed, scale=2.0), -1)


@pytest.mark.parametrize("backend", W2S_BACKENDS)
@pytest.mark.parametrize("classes", [2, 5])
@pytest.mark.parametrize("step_frac, warmup_frac", [(0.05, 0.1), (0.1, 0.1), (0.6, 0.1), (0.0, 0.0), (1.0, 1.0)])
def test_weak_to_strong_matches_openai_formula(backend, classes, step_frac, warmup_frac):
    logits, weak = randn(57, classes, seed=1, scale=2.0), soft_labels(57, classes, seed=2)
    logits.requires_grad_(True)
    loss = ops.weak_to_strong_loss(logits, weak, aux_coef=0.4, warmup_frac=warmup_frac, step_frac=step_frac, backend=backend)
    (grad,) = torch.autograd.grad(loss, logits)
    expected, expected_grad, _ = logconf_oracle(logits.detach(), weak, 0.4, warmup_frac, step_frac)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), **TOL)
    torch.testing.assert_close(grad.double(), torch.from_numpy(expected_grad), **TOL)


@pytest.mark.parametrize("backend", W2S_BACKENDS)
def test_weak_to_strong_warmup_ramps_the_coefficient(backend):
    logits, weak = randn(40, 2, seed=3, scale=2.0), soft_labels(40, 2, seed=4)

    def loss_at(step_frac):
        return ops.weak_to_strong_loss(logits, weak, aux_coef=0.5, warmup_frac=0.2, step_frac=step_frac, backend=backend).item()

    weak_only = ops.weak_to_strong_loss(logits, weak, aux_coef=0.0, backend=backend).item()
    assert loss_at(0.0) == pytest.approx(weak_only, rel=1e-6)
    # during warmup the coefficient is aux_coef·step_frac, after it aux_coef: the loss is affine in coef
    slope = (loss_at(0.2) - weak_only) / (0.5 * 0.2)
    assert loss_at(0.1) == pytest.approx(weak_only + slope * 0.5 * 0.1, rel=1e-5)
    assert loss_at(0.21) == pytest.approx(weak_only + slope * 0.5, rel=1e-5)
    assert loss_at(0.9) == pytest.approx(loss_at(0.21), rel=1e-6)


@pytest.mark.parametrize("backend", W2S_BACKENDS)
def test_weak_to_strong_two_class_hardening_follows_the_weak_class_balance(backend):
    logits = randn(200, 2, seed=5, scale=2.0)
    weak = torch.stack([torch.full((200,), 0.7), torch.full((200,), 0.3)], 1)  # weak labels say 30% class 1
    _, _, strong = logconf_oracle(logits, weak, 1.0, 0.0, 1.0)
    assert strong[:, 1].mean() == pytest.approx(0.3, abs=0.01)
    # with coef = 1 the target is the hardened prediction alone
    loss = ops.weak_to_strong_loss(logits, weak, aux_coef=1.0, warmup_frac=0.0, backend=backend)
    expected = F.cross_entropy(logits.double(), torch.from_numpy(strong.argmax(1)))
    torch.testing.assert_close(loss.double(), expected, **TOL)


@pytest.mark.parametrize("backend", W2S_BACKENDS)
def test_weak_to_strong_low_precision_logits(backend):
    logits, weak = randn(33, 6, seed=6, scale=2.0, dtype=torch.bfloat16), soft_labels(33, 6, seed=7).half()
    loss = ops.weak_to_strong_loss(logits, weak, backend=backend)
    expected, _, _ = logconf_oracle(logits.float(), weak.float(), 0.5, 0.1, 1.0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), **TOL)


def at_loss_oracle(student_feats, teacher_feats, p):
    """szagoruyko/attention-transfer: Σ over pairs of (at(x) − at(y))².mean(), at = normalize(|x|^p.mean(1))."""
    def at(x):
        return F.normalize(x.abs().pow(p).mean(1).view(x.size(0), -1))

    return sum((at(x) - at(y)).pow(2).mean() for x, y in zip(student_feats, teacher_feats))


@pytest.mark.parametrize("backend", AT_BACKENDS)
@pytest.mark.parametrize("p", [1.0, 2, 3.5])
def test_attention_transfer_matches_original(backend, p):
    """Three feature pairs, different channel counts per side, 1-D and 2-D spatial maps."""
    shapes = [((4, 3, 8, 8), (4, 5, 8, 8)), ((4, 6, 4, 4), (4, 2, 4, 4)), ((4, 7, 9), (4, 3, 9))]
    students = [randn(*s, seed=10 + i) for i, (s, _) in enumerate(shapes)]
    teachers = [randn(*t, seed=20 + i) for i, (_, t) in enumerate(shapes)]
    leaves = [s.clone().requires_grad_(True) for s in students]
    loss = ops.attention_transfer_loss(leaves, teachers, p=p, backend=backend)
    grads = torch.autograd.grad(loss, leaves)
    exact_leaves = [s.double().requires_grad_(True) for s in students]
    expected = at_loss_oracle(exact_leaves, [t.double() for t in teachers], p)
    expected_grads = torch.autograd.grad(expected, exact_leaves)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, **TOL)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", AT_BACKENDS)
def test_attention_transfer_single_pair_and_teacher_gets_no_gradient(backend):
    student = randn(2, 4, 5, 5, seed=30).requires_grad_(True)
    teacher = randn(2, 8, 5, 5, seed=31).requires_grad_(True)
    single = ops.attention_transfer_loss(student, teacher, backend=backend)
    as_list = ops.attention_transfer_loss([student], (teacher,), backend=backend)
    assert torch.equal(single, as_list)
    single.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    same = ops.attention_transfer_loss(student, student * 3, backend=backend)  # scale-free maps
    assert same.item() == pytest.approx(0.0, abs=1e-12)


def test_attention_transfer_reference_gradcheck():
    students = [randn(2, 3, 4, seed=40, dtype=torch.float64).requires_grad_(True),
                randn(2, 2, 3, 3, seed=41, dtype=torch.float64).requires_grad_(True)]
    teachers = [randn(2, 5, 4, seed=42, dtype=torch.float64), randn(2, 4, 3, 3, seed=43, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda a, b: reference.attention_transfer_loss([a, b], teachers, p=2.5), students)


def cosine_oracle(student, teacher, mask):
    """DistilBERT: masked_select the rows, CosineEmbeddingLoss with target 1."""
    selected = mask.bool().unsqueeze(-1).expand_as(student)
    hidden = student.shape[-1]
    s, t = student.masked_select(selected).view(-1, hidden), teacher.masked_select(selected).view(-1, hidden)
    return torch.nn.CosineEmbeddingLoss(reduction="mean")(s, t, torch.ones(s.shape[0], dtype=s.dtype))


@pytest.mark.parametrize("backend", COSINE_BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, None])
def test_hidden_cosine_matches_distilbert(backend, mask_dtype):
    student, teacher = randn(3, 7, 16, seed=50), randn(3, 7, 16, seed=51)
    teacher[0, :2] = student[0, :2] * 2 + 0.01  # nearly aligned rows
    mask = None
    if mask_dtype is not None:
        mask = (torch.rand(3, 7, generator=torch.Generator().manual_seed(52)) > 0.4).to(mask_dtype)
        mask[0, 0] = 1
    leaf = student.clone().requires_grad_(True)
    loss = ops.hidden_cosine_loss(leaf, teacher, mask, backend=backend)
    (grad,) = torch.autograd.grad(loss, leaf)
    exact_leaf = student.double().requires_grad_(True)
    expected = cosine_oracle(exact_leaf, teacher.double(), torch.ones(3, 7) if mask is None else mask)
    (expected_grad,) = torch.autograd.grad(expected, exact_leaf)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, **TOL)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", COSINE_BACKENDS)
def test_hidden_cosine_masked_out_rows_are_ignored(backend):
    student, teacher = randn(4, 8, seed=53).requires_grad_(True), randn(4, 8, seed=54).requires_grad_(True)
    mask = torch.tensor([True, False, True, False])
    polluted = student.detach().clone()
    polluted[1] = float("nan")
    polluted[3] = 0.0
    loss = ops.hidden_cosine_loss(student, teacher, mask, backend=backend)
    assert ops.hidden_cosine_loss(polluted, teacher, mask, backend=backend).item() == pytest.approx(loss.item(), rel=1e-7)
    loss.backward()
    assert torch.equal(student.grad[[1, 3]], torch.zeros(2, 8)) and teacher.grad is None
    empty = ops.hidden_cosine_loss(student, teacher, torch.zeros(4, dtype=torch.bool), backend=backend)
    assert empty.item() == 0.0
