"""Bad arguments of the fusion ops raise ValueError/TypeError naming the argument; dispatch
explains why a requested backend cannot run."""
import re

import numpy as np
import pytest
import torch

from collab_ops import presets
from collab_ops._dispatch import BackendUnavailableError
from collab_ops.ops.fusion import dynamic_fusion_weights, fuse_logits, fused_sample

B, V = 3, 7


def two_models():
    return [torch.randn(B, V), torch.randn(B, V)]


def raises(exception, name):
    return pytest.raises(exception, match=re.escape(name))


LOGITS_CASES = [
    ("a stacked tensor", lambda: torch.randn(2, B, V), TypeError, "logits"),
    ("no models", lambda: [], ValueError, "logits"),
    ("a non-tensor entry", lambda: [torch.randn(B, V), [[0.0] * V] * B], TypeError, "logits[1]"),
    ("3-D logits", lambda: [torch.randn(B, 1, V), torch.randn(B, 1, V)], ValueError, "logits[0]"),
    ("1-D logits", lambda: [torch.randn(B, V), torch.randn(V)], ValueError, "logits[1]"),
    ("integer logits", lambda: [torch.randn(B, V), torch.zeros(B, V, dtype=torch.int64)], TypeError, "logits[1]"),
    ("batch mismatch", lambda: [torch.randn(B, V), torch.randn(B + 1, V)], ValueError, "logits[1]"),
    ("device mix", lambda: [torch.randn(B, V), torch.randn(B, V, device="meta")], ValueError, "logits[1]"),
    ("no columns", lambda: [torch.randn(B, V), torch.randn(B, 0)], ValueError, "logits[1]"),
]


@pytest.mark.parametrize("op", [fuse_logits, fused_sample])
@pytest.mark.parametrize("case", LOGITS_CASES, ids=[c[0] for c in LOGITS_CASES])
def test_bad_logits(op, case):
    _, make, exception, name = case
    with raises(exception, name):
        op(make(), [1.0, -1.0])


WEIGHT_CASES = [
    ("too few", [1.0], ValueError, "weights"),
    ("too many", [1.0, 2.0, 3.0], ValueError, "weights"),
    ("1-D tensor", torch.tensor([1.0, -1.0]), ValueError, "weights"),
    ("wrong batch", torch.ones(B + 1, 2), ValueError, "weights"),
    ("wrong K", torch.ones(B, 3), ValueError, "weights"),
    ("integer tensor", torch.ones(B, 2, dtype=torch.int64), TypeError, "weights"),
    ("a string", "1,-1", TypeError, "weights"),
    ("a non-number entry", [1.0, "x"], TypeError, "weights[1]"),
    ("a NaN entry", [float("nan"), 1.0], ValueError, "weights[0]"),
    ("an infinite entry", [1.0, float("-inf")], ValueError, "weights[1]"),
    ("an entry beyond float32", [1e39, 1.0], ValueError, "weights[0]"),
    ("device mix", torch.ones(B, 2, device="meta"), ValueError, "weights"),
]


@pytest.mark.parametrize("op", [fuse_logits, fused_sample])
@pytest.mark.parametrize("case", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_bad_weights(op, case):
    _, weights, exception, name = case
    with raises(exception, name):
        op(two_models(), weights)


OPTION_CASES = [
    (dict(temperatures=[1.0]), ValueError, "temperatures"),
    (dict(temperatures=[1.0, 1.0, 1.0]), ValueError, "temperatures"),
    (dict(temperatures=2.0), TypeError, "temperatures"),
    (dict(temperatures=[1.0, 0.0]), ValueError, "temperatures[1]"),
    (dict(temperatures=[-1.0, 1.0]), ValueError, "temperatures[0]"),
    (dict(temperatures=[float("inf"), 1.0]), ValueError, "temperatures[0]"),
    (dict(normalize="yes"), TypeError, "normalize"),
    (dict(plausibility_alpha=0.0), ValueError, "plausibility_alpha"),
    (dict(plausibility_alpha=1.5), ValueError, "plausibility_alpha"),
    (dict(plausibility_alpha=-0.1), ValueError, "plausibility_alpha"),
    (dict(plausibility_alpha=float("nan")), ValueError, "plausibility_alpha"),
    (dict(plausibility_alpha=0.1, plausibility_ref=2), ValueError, "plausibility_ref"),
    (dict(plausibility_ref=-1), ValueError, "plausibility_ref"),
    (dict(plausibility_ref=0.5), TypeError, "plausibility_ref"),
    (dict(vocab_size=0), ValueError, "vocab_size"),
    (dict(vocab_size=-3), ValueError, "vocab_size"),
    (dict(vocab_size=5.0), TypeError, "vocab_size"),
]


@pytest.mark.parametrize("op", [fuse_logits, fused_sample])
@pytest.mark.parametrize("case", OPTION_CASES, ids=[str(c[0]) for c in OPTION_CASES])
def test_bad_fusion_options(op, case):
    options, exception, name = case
    with raises(exception, name):
        op(two_models(), [1.0, -1.0], **options)


def test_vocab_size_wider_than_a_model_names_the_model_and_both_sizes():
    logits = [torch.randn(B, 9), torch.randn(B, 7)]
    with pytest.raises(ValueError) as error:
        fuse_logits(logits, [1.0, 1.0], vocab_size=8)
    message = str(error.value)
    assert "vocab_size=8" in message and "logits[1]" in message and "7 columns" in message


def test_bad_output():
    with raises(ValueError, "output"):
        fuse_logits(two_models(), [1.0, -1.0], output="probs")


SAMPLING_CASES = [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.1), ValueError, "top_p"),
    (dict(min_p=-0.1), ValueError, "min_p"),
    (dict(min_p=1.5), ValueError, "min_p"),
    (dict(greedy=1), TypeError, "greedy"),
    (dict(strict="no"), TypeError, "strict"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=2**63), ValueError, "seed"),
    (dict(seed=torch.tensor([1.0])), TypeError, "seed"),
    (dict(seed=torch.arange(B + 1)), ValueError, "seed"),
    (dict(seed=torch.zeros(B, 1, dtype=torch.int64)), ValueError, "seed"),
    (dict(seed=torch.tensor(1, device="meta")), ValueError, "seed"),
]


@pytest.mark.parametrize("case", SAMPLING_CASES, ids=[str(c[0]) for c in SAMPLING_CASES])
def test_bad_sampling_options(case):
    options, exception, name = case
    with raises(exception, name):
        fused_sample(two_models(), [1.0, -1.0], **options)


BAD_SEED_CASES = [case for case in SAMPLING_CASES if set(case[0]) == {"seed"}]


@pytest.mark.parametrize("case", BAD_SEED_CASES, ids=[str(c[0]) for c in BAD_SEED_CASES])
def test_bad_seed_is_refused_in_greedy_mode_too(case):
    # DESIGN.md: checks of scalar options always run; greedy ignores the seed but a bad one is
    # still bad input (speculative_verify(mode="greedy") refuses it likewise).
    options, exception, name = case
    with raises(exception, name):
        fused_sample(two_models(), [1.0, -1.0], greedy=True, **options)


def test_greedy_with_a_good_seed_or_none_leaves_torchs_generator_alone():
    logits = two_models()
    expected = fuse_logits(logits, [1.0, -1.0]).argmax(-1)
    state = torch.random.get_rng_state()
    for seed in (None, 3, torch.arange(B)):
        assert torch.equal(fused_sample(logits, [1.0, -1.0], greedy=True, seed=seed), expected)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_good_seed_forms_are_accepted():
    for seed in (0, -5, 2**63 - 1, torch.tensor(3), torch.arange(B), torch.arange(B, dtype=torch.int32)):
        assert fused_sample(two_models(), [1.0, -1.0], seed=seed).shape == (B,)


def three_models():
    return torch.randn(B, V), [torch.randn(B, V)], torch.randn(B, V)


DYNAMIC_CASES = [
    ("1-D large", lambda l, e, b: (l[0], e, b), {}, ValueError, "large"),
    ("integer base", lambda l, e, b: (l, e, b.long()), {}, TypeError, "base"),
    ("no experts", lambda l, e, b: (l, [], b), {}, ValueError, "experts"),
    ("experts as a tensor", lambda l, e, b: (l, e[0], b), {}, TypeError, "experts"),
    ("expert batch mismatch", lambda l, e, b: (l, [e[0][:1]], b), {}, ValueError, "experts[0]"),
    ("base on another device", lambda l, e, b: (l, e, b.to("meta")), {}, ValueError, "base"),
    ("empty grid", lambda l, e, b: (l, e, b), dict(grid=[]), ValueError, "grid"),
    ("NaN in grid", lambda l, e, b: (l, e, b), dict(grid=[0.0, float("nan")]), ValueError, "grid[1]"),
    ("infinite grid entry", lambda l, e, b: (l, e, b), dict(grid=[float("inf")]), ValueError, "grid[0]"),
    ("grid entry beyond float32", lambda l, e, b: (l, e, b), dict(grid=[0.5, -1e39]), ValueError, "grid[1]"),
    ("2-D grid", lambda l, e, b: (l, e, b), dict(grid=torch.zeros(2, 2)), ValueError, "grid"),
    ("grid of strings", lambda l, e, b: (l, e, b), dict(grid="0.1"), TypeError, "grid"),
]


@pytest.mark.parametrize("case", DYNAMIC_CASES, ids=[c[0] for c in DYNAMIC_CASES])
def test_bad_dynamic_fusion_arguments(case):
    _, rearrange, options, exception, name = case
    with raises(exception, name):
        dynamic_fusion_weights(*rearrange(*three_models()), **options)


@pytest.mark.parametrize(
    "call",
    [
        lambda backend: fuse_logits(two_models(), [1.0, -1.0], backend=backend),
        lambda backend: fused_sample(two_models(), [1.0, -1.0], backend=backend),
        lambda backend: dynamic_fusion_weights(*three_models(), backend=backend),
    ],
    ids=["fuse_logits", "fused_sample", "dynamic_fusion_weights"],
)
def test_cuda_backend_on_cpu_tensors_names_the_reason(call):
    with pytest.raises(BackendUnavailableError, match="cuda: the cuda backend takes CUDA tensors"):
        call("cuda")
    with raises(ValueError, "backend"):
        call("gpu")


def test_environment_backend_override_is_used(monkeypatch):
    monkeypatch.setenv("COLLAB_OPS_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        fuse_logits(two_models(), [1.0, -1.0])
    monkeypatch.setenv("COLLAB_OPS_BACKEND", "reference")
    assert fuse_logits(two_models(), [1.0, -1.0]).shape == (B, V)


PRESET_CASES = [
    (lambda: presets.contrastive_decoding(alpha=0.0), ValueError, "alpha"),
    (lambda: presets.contrastive_decoding(alpha=1.1), ValueError, "alpha"),
    (lambda: presets.contrastive_decoding(amateur_temperature=0.0), ValueError, "amateur_temperature"),
    (lambda: presets.cd_reasoning(alpha=2.0), ValueError, "alpha"),
    (lambda: presets.cd_reasoning(beta="0.5"), TypeError, "beta"),
    (lambda: presets.proxy_tuning(alpha=None), TypeError, "alpha"),
    (lambda: presets.eft(direction="sideways"), ValueError, "direction"),
    (lambda: presets.eft(beta=float("nan")), ValueError, "beta"),
    (lambda: presets.dexperts(alpha="2"), TypeError, "alpha"),
    (lambda: presets.cfg(guidance_scale=None), TypeError, "guidance_scale"),
    (lambda: presets.proxy_tuning(alpha=float("inf")), ValueError, "alpha"),
    (lambda: presets.cfg(guidance_scale=1e40), ValueError, "guidance_scale"),
]


@pytest.mark.parametrize("case", range(len(PRESET_CASES)))
def test_bad_preset_arguments(case):
    make, exception, name = PRESET_CASES[case]
    with raises(exception, name):
        make()


@pytest.mark.parametrize(
    "preset, models",
    [
        (presets.contrastive_decoding(), 2),
        (presets.cd_reasoning(), 2),
        (presets.proxy_tuning(), 3),
        (presets.eft(direction="down"), 3),
        (presets.dexperts(), 3),
        (presets.cfg(), 2),
    ],
)
def test_presets_are_valid_fusion_options(preset, models):
    logits = [torch.randn(B, V) for _ in range(models)]
    assert set(preset) == {"weights", "temperatures", "normalize", "plausibility_alpha", "plausibility_ref"}
    assert fuse_logits(logits, **preset).shape == (B, V)
    assert fused_sample(logits, **preset, seed=0).shape == (B,)


def test_constant_weight_lists_are_built_once_and_still_checked():
    from collab_ops._validation import constant_float32_vector

    built = constant_float32_vector("weights", [1.0, -1])
    assert built is constant_float32_vector("weights", (1.0, -1)), "a decoding loop's list is reused"
    assert built.dtype == torch.float32 and built.tolist() == [1.0, -1.0]
    other = constant_float32_vector("weights", [np.float64(0.5)])  # not a Python float: built each time
    assert other.tolist() == [0.5] and other is not constant_float32_vector("weights", [np.float64(0.5)])
    for _ in range(2):  # a refusal is not cached away
        with raises(ValueError, "target_weights[1]"):
            constant_float32_vector("target_weights", [1.0, 1e39])


def test_constant_weight_lists_are_plain_cpu_tensors_wherever_first_built():
    # A cached tensor outlives the call that built it: a default-device context must not place it,
    # a fake mode (non-strict torch.export) must not make it fake, inference mode must not make it an
    # inference tensor that a later autograd pass cannot save. The values are used nowhere else.
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from collab_ops._validation import constant_float32_vector

    with torch.device("meta"):
        assert constant_float32_vector("weights", [0.8125, -0.1875]).device == torch.device("cpu")
    with FakeTensorMode():
        constant_float32_vector("weights", [0.8125, 0.1875])
    assert not isinstance(constant_float32_vector("weights", [0.8125, 0.1875]), FakeTensor)
    logits = two_models()
    with torch.inference_mode():
        fuse_logits(logits, [0.6875, 0.3125], backend="reference")
    student = logits[0].clone().requires_grad_()
    fuse_logits([student, logits[1]], [0.6875, 0.3125], backend="reference").sum().backward()
    assert student.grad is not None


def test_the_default_grid_is_real_wherever_first_built():
    # dynamic_fusion_weights(grid=None) caches its default grid per device: a fake mode or a
    # default-device context around the first call must not leak into the next ones.
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from collab_ops.ops.fusion import _default_grid

    _default_grid.cache_clear()
    with FakeTensorMode():
        assert isinstance(_default_grid(torch.device("cpu")), FakeTensor)
    with torch.device("meta"):
        built = _default_grid(torch.device("cpu"))
    assert not isinstance(built, FakeTensor) and built.device == torch.device("cpu")
    assert built is _default_grid(torch.device("cpu"))
    torch.testing.assert_close(built, torch.arange(21, dtype=torch.float64).mul(0.1).float())
    large, expert, base = (torch.randn(2, 9, generator=torch.Generator().manual_seed(s)) for s in range(3))
    assert torch.equal(dynamic_fusion_weights(large, [expert], base),
                       dynamic_fusion_weights(large, [expert], base, grid=built.tolist()))
