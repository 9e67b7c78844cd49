"""Bad arguments to the distillation ops raise ValueError/TypeError naming the argument."""
import math

import pytest
import torch

from collab_ops import _dispatch
from collab_ops.ops import distill as ops

N, V, H = 6, 11, 4
GENERATOR = torch.Generator().manual_seed(0)


def f32(*shape):
    return torch.randn(*shape, generator=GENERATOR)


def ids(*shape, high=V):
    return torch.randint(0, high, shape, generator=GENERATOR)


def distinct_ids(n, k):
    return torch.stack([torch.randperm(V, generator=GENERATOR)[:k] for _ in range(n)])


def kd(**overrides):
    args = dict(student_logits=f32(N, V), teacher_logits=f32(N, V), labels=ids(N))
    args.update(overrides)
    return lambda: ops.kd_loss(args.pop("student_logits"), args.pop("teacher_logits"), args.pop("labels"), **args)


def fused(**overrides):
    args = dict(student_hidden=f32(N, H), student_weight=f32(V, H), teacher_hidden=f32(N, H + 3),
                teacher_weight=f32(V, H + 3), labels=ids(N))
    args.update(overrides)
    positional = [args.pop(k) for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "labels")]
    return lambda: ops.fused_linear_kd_loss(*positional, **args)


def w2s(**overrides):
    args = dict(logits=f32(N, 3), weak_labels=torch.softmax(f32(N, 3), -1))
    args.update(overrides)
    return lambda: ops.weak_to_strong_loss(args.pop("logits"), args.pop("weak_labels"), **args)


def at(**overrides):
    args = dict(student_feats=[f32(2, 3, 4, 4)], teacher_feats=[f32(2, 5, 4, 4)])
    args.update(overrides)
    return lambda: ops.attention_transfer_loss(args.pop("student_feats"), args.pop("teacher_feats"), **args)


def cosine(**overrides):
    args = dict(student_hidden=f32(2, 3, H), teacher_hidden=f32(2, 3, H), mask=torch.ones(2, 3, dtype=torch.bool))
    args.update(overrides)
    return lambda: ops.hidden_cosine_loss(args.pop("student_hidden"), args.pop("teacher_hidden"), args.pop("mask"), **args)


META = torch.device("meta")

CASES = {
    # kd_loss
    "kd student not a tensor": (kd(student_logits=[[0.0] * V] * N), TypeError, "student_logits"),
    "kd student int": (kd(student_logits=ids(N, V)), TypeError, "student_logits"),
    "kd student float64": (kd(student_logits=f32(N, V).double()), TypeError, "student_logits"),
    "kd student 1-D": (kd(student_logits=f32(V), teacher_logits=f32(V), labels=None), ValueError, "student_logits"),
    "kd empty vocabulary": (kd(student_logits=f32(N, 0)), ValueError, "student_logits"),
    "kd teacher int": (kd(teacher_logits=ids(N, V)), TypeError, "teacher_logits"),
    "kd N mismatch": (kd(teacher_logits=f32(N + 1, V)), ValueError, "teacher_logits"),
    "kd leading shape mismatch": (kd(student_logits=f32(2, 3, V), teacher_logits=f32(3, 2, V), labels=None), ValueError, "teacher_logits"),
    "kd vocab mismatch": (kd(teacher_logits=f32(N, V + 2)), ValueError, "vocab_size"),
    "kd vocab_size too large": (kd(vocab_size=V + 1), ValueError, "vocab_size"),
    "kd vocab_size beyond teacher": (kd(teacher_logits=f32(N, V - 2), vocab_size=V), ValueError, "vocab_size"),
    "kd vocab_size zero": (kd(vocab_size=0), ValueError, "vocab_size"),
    "kd vocab_size float": (kd(vocab_size=5.0), TypeError, "vocab_size"),
    "kd unknown divergence": (kd(divergence="kl"), ValueError, "divergence"),
    "kd temperature zero": (kd(temperature=0.0), ValueError, "temperature"),
    "kd temperature negative": (kd(temperature=-1.0), ValueError, "temperature"),
    "kd temperature nan": (kd(temperature=math.nan), ValueError, "temperature"),
    "kd temperature inf": (kd(temperature=math.inf), ValueError, "temperature"),
    "kd temperature string": (kd(temperature="2"), TypeError, "temperature"),
    "kd beta below 0": (kd(divergence="jsd", beta=-0.1), ValueError, "beta"),
    "kd beta above 1": (kd(divergence="skew_forward_kl", beta=1.5), ValueError, "beta"),
    "kd scale_by_t2 not bool": (kd(scale_by_t2=1), TypeError, "scale_by_t2"),
    "kd soft_weight negative": (kd(soft_weight=-1.0), ValueError, "soft_weight"),
    "kd hard_weight nan": (kd(hard_weight=math.nan), ValueError, "hard_weight"),
    "kd hard_weight without labels": (kd(labels=None, hard_weight=0.5), ValueError, "labels"),
    "kd ignore_index float": (kd(ignore_index=-100.0), TypeError, "ignore_index"),
    "kd labels wrong shape": (kd(labels=ids(N + 1)), ValueError, "labels"),
    "kd labels float": (kd(labels=ids(N).float()), TypeError, "labels"),
    "kd bad reduction": (kd(reduction="avg"), ValueError, "reduction"),
    "kd num_items zero": (kd(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    "kd num_items negative": (kd(num_items_in_batch=-4.0), ValueError, "num_items_in_batch"),
    "kd num_items tensor of two": (kd(num_items_in_batch=torch.tensor([3, 4])), ValueError, "num_items_in_batch"),
    "kd num_items bool tensor": (kd(num_items_in_batch=torch.tensor(True)), ValueError, "num_items_in_batch"),
    "kd num_items string": (kd(num_items_in_batch="8"), TypeError, "num_items_in_batch"),
    "kd teacher_indices shape": (kd(teacher_logits=f32(N, 3), teacher_indices=ids(N, 4)), ValueError, "teacher_indices"),
    "kd teacher_indices float": (kd(teacher_logits=f32(N, 3), teacher_indices=ids(N, 3).float()), TypeError, "teacher_indices"),
    "kd teacher_indices empty": (kd(teacher_logits=f32(N, 0), teacher_indices=ids(N, 0)), ValueError, "teacher_indices"),
    "kd device mix teacher": (kd(teacher_logits=torch.empty(N, V, device=META)), ValueError, "teacher_logits"),
    "kd device mix labels": (kd(labels=torch.empty(N, dtype=torch.int64, device=META)), ValueError, "labels"),
    "kd unknown backend": (kd(backend="gpu"), ValueError, "backend"),
    # fused_linear_kd_loss
    "fused hidden int": (fused(student_hidden=ids(N, H)), TypeError, "student_hidden"),
    "fused hidden 1-D": (fused(student_hidden=f32(H), teacher_hidden=f32(H + 3), labels=None), ValueError, "student_hidden"),
    "fused weight 3-D": (fused(student_weight=f32(1, V, H)), ValueError, "student_weight"),
    "fused student hidden size": (fused(student_weight=f32(V, H + 1)), ValueError, "student_weight"),
    "fused teacher hidden size": (fused(teacher_weight=f32(V, H)), ValueError, "teacher_weight"),
    "fused weight dtype mix": (fused(student_weight=f32(V, H).bfloat16()), TypeError, "student_weight"),
    "fused bias size": (fused(student_bias=f32(V + 1)), ValueError, "student_bias"),
    "fused bias dtype": (fused(teacher_bias=f32(V).half()), TypeError, "teacher_bias"),
    "fused N mismatch": (fused(teacher_hidden=f32(N + 1, H + 3)), ValueError, "teacher_hidden"),
    "fused vocab mismatch": (fused(teacher_weight=f32(V + 5, H + 3)), ValueError, "vocab_size"),
    "fused vocab_size too large": (fused(vocab_size=V + 1), ValueError, "vocab_size"),
    "fused both teachers": (fused(teacher_logits=f32(N, V)), ValueError, "teacher_hidden.*teacher_logits"),
    "fused no teacher": (fused(teacher_hidden=None, teacher_weight=None), ValueError, "teacher_hidden.*teacher_logits"),
    "fused hidden without weight": (fused(teacher_weight=None), ValueError, "teacher_weight"),
    "fused weight with logits": (fused(teacher_hidden=None, teacher_logits=f32(N, V)), ValueError, "teacher_weight"),
    "fused bias with logits": (fused(teacher_hidden=None, teacher_weight=None, teacher_logits=f32(N, V), teacher_bias=f32(V)),
                               ValueError, "teacher_bias"),
    "fused indices with hidden": (fused(teacher_indices=ids(N, 3)), ValueError, "teacher_indices"),
    "fused logits N mismatch": (fused(teacher_hidden=None, teacher_weight=None, teacher_logits=f32(N - 1, V)), ValueError, "teacher_logits"),
    "fused chunk_size zero": (fused(chunk_size=0), ValueError, "chunk_size"),
    "fused chunk_size float": (fused(chunk_size=4.0), TypeError, "chunk_size"),
    "fused softcap zero": (fused(logit_softcap=0.0), ValueError, "logit_softcap"),
    "fused softcap negative": (fused(logit_softcap=-30.0), ValueError, "logit_softcap"),
    "fused labels wrong shape": (fused(labels=ids(N, 1)), ValueError, "labels"),
    "fused hard_weight without labels": (fused(labels=None, hard_weight=1.0), ValueError, "labels"),
    "fused temperature": (fused(temperature=-2.0), ValueError, "temperature"),
    "fused divergence": (fused(divergence="js"), ValueError, "divergence"),
    "fused beta": (fused(beta=2.0), ValueError, "beta"),
    "fused reduction": (fused(reduction="batchmean"), ValueError, "reduction"),
    "fused num_items": (fused(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    "fused device mix": (fused(student_weight=torch.empty(V, H, device=META)), ValueError, "student_weight"),
    # weak_to_strong_loss
    "w2s logits 1-D": (w2s(logits=f32(N)), ValueError, "logits"),
    "w2s logits int": (w2s(logits=ids(N, 3)), TypeError, "logits"),
    "w2s one class": (w2s(logits=f32(N, 1), weak_labels=f32(N, 1)), ValueError, "logits"),
    "w2s no rows": (w2s(logits=f32(0, 2), weak_labels=f32(0, 2)), ValueError, "logits"),
    "w2s labels shape": (w2s(weak_labels=f32(N, 2)), ValueError, "weak_labels"),
    "w2s labels int": (w2s(weak_labels=ids(N, 3, high=1)), TypeError, "weak_labels"),
    "w2s aux_coef": (w2s(aux_coef=1.5), ValueError, "aux_coef"),
    "w2s warmup_frac": (w2s(warmup_frac=-0.1), ValueError, "warmup_frac"),
    "w2s step_frac": (w2s(step_frac=2.0), ValueError, "step_frac"),
    "w2s device mix": (w2s(weak_labels=torch.empty(N, 3, device=META)), ValueError, "weak_labels"),
    # attention_transfer_loss
    "at not a list": (at(student_feats={"a": f32(2, 3, 4, 4)}), TypeError, "student_feats"),
    "at empty list": (at(student_feats=[], teacher_feats=[]), ValueError, "student_feats"),
    "at length mismatch": (at(teacher_feats=[f32(2, 5, 4, 4), f32(2, 5, 4, 4)]), ValueError, "teacher_feats"),
    "at no spatial dims": (at(student_feats=[f32(2, 3)], teacher_feats=[f32(2, 5)]), ValueError, r"student_feats\[0\]"),
    "at spatial mismatch": (at(teacher_feats=[f32(2, 5, 4, 3)]), ValueError, r"teacher_feats\[0\]"),
    "at batch mismatch": (at(teacher_feats=f32(3, 5, 4, 4), student_feats=f32(2, 3, 4, 4)), ValueError, "teacher_feats"),
    "at int features": (at(student_feats=[ids(2, 3, 4, 4)]), TypeError, r"student_feats\[0\]"),
    "at p zero": (at(p=0), ValueError, "p must"),
    "at device mix": (at(teacher_feats=[torch.empty(2, 5, 4, 4, device=META)]), ValueError, r"teacher_feats\[0\]"),
    # hidden_cosine_loss
    "cosine shape mismatch": (cosine(teacher_hidden=f32(2, 3, H + 1)), ValueError, "teacher_hidden"),
    "cosine 1-D": (cosine(student_hidden=f32(H), teacher_hidden=f32(H), mask=None), ValueError, "student_hidden"),
    "cosine int hidden": (cosine(teacher_hidden=ids(2, 3, H)), TypeError, "teacher_hidden"),
    "cosine mask shape": (cosine(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask"),
    "cosine mask float": (cosine(mask=torch.ones(2, 3)), TypeError, "mask"),
    "cosine device mix": (cosine(mask=torch.ones(2, 3, dtype=torch.bool, device=META)), ValueError, "mask"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_argument_is_named(name):
    call, exception, argument = CASES[name]
    with pytest.raises(exception, match=argument):
        call()


def test_valid_calls_of_the_same_builders_pass():
    """The builders above are valid before their one override, so each case tests exactly one thing."""
    for call in (kd(), kd(teacher_logits=f32(N, 3).log_softmax(-1), teacher_indices=distinct_ids(N, 3)), fused(),
                 fused(teacher_hidden=None, teacher_weight=None, teacher_logits=f32(N, V)), w2s(), at(), cosine(),
                 kd(num_items_in_batch=torch.tensor([5.0])), fused(vocab_size=V - 1, chunk_size=2, logit_softcap=30.0)):
        assert torch.isfinite(call())


class RecordingReference:
    """Stands in for the registered reference of `op` and records the canonical arguments it gets."""

    def __init__(self, op):
        self.op = op
        self.original = _dispatch._REGISTRY[op]["reference"]
        self.calls = []

    def __enter__(self):
        def record(**case):
            self.calls.append(case)
            return self.original.fn(**case)

        _dispatch.register(self.op, "reference", record, self.original.supports)
        return self

    def __exit__(self, *exc):
        _dispatch._REGISTRY[self.op]["reference"] = self.original


def assert_rows(tensor, shape, dtype=None):
    assert tensor.shape == shape and tensor.stride(-1) == 1
    if dtype is not None:
        assert tensor.dtype == dtype


def test_kd_loss_passes_canonical_arguments():
    student = f32(V, 4, 5).permute(1, 2, 0)  # [4, 5, V]: flattens to a view with vocabulary stride 20
    teacher = f32(4, 5, 3).log_softmax(-1)
    indices = distinct_ids(20, 3).reshape(4, 5, 3).int()
    labels = ids(4, 5).int()
    with RecordingReference("kd_loss") as spy:
        ops.kd_loss(student, teacher, labels, teacher_indices=indices, num_items_in_batch=torch.tensor([7]),
                    hard_weight=1, temperature=2, backend="reference")
    (case,) = spy.calls
    assert_rows(case["student_logits"], (20, V))
    assert_rows(case["teacher_logits"], (20, 3))
    assert_rows(case["teacher_indices"], (20, 3), torch.int64)
    assert case["labels"].shape == (20,) and case["labels"].dtype == torch.int64
    assert case["num_items_in_batch"].shape == ()
    assert case["vocab_size"] == V and type(case["vocab_size"]) is int
    assert type(case["hard_weight"]) is float and type(case["temperature"]) is float
    assert set(case) == {"student_logits", "teacher_logits", "labels", "teacher_indices", "divergence", "beta",
                         "temperature", "scale_by_t2", "soft_weight", "hard_weight", "ignore_index", "reduction",
                         "num_items_in_batch", "vocab_size"}


def test_fused_linear_kd_loss_passes_canonical_arguments():
    hidden = f32(H, 2, 3).permute(1, 2, 0)  # [2, 3, H], not contiguous
    with RecordingReference("fused_linear_kd_loss") as spy:
        ops.fused_linear_kd_loss(hidden, f32(V, H), f32(2, 3, H + 1), f32(V + 2, H + 1), ids(2, 3),
                                 vocab_size=V, backend="reference")
    (case,) = spy.calls
    assert_rows(case["student_hidden"], (6, H))
    assert_rows(case["teacher_hidden"], (6, H + 1))
    assert case["labels"].shape == (6,) and case["labels"].dtype == torch.int64
    assert case["teacher_logits"] is None and case["teacher_indices"] is None and case["student_bias"] is None
    assert case["chunk_size"] is None and case["logit_softcap"] is None and case["vocab_size"] == V
