"""fuse_logits, dynamic_fusion_weights and the presets against DESIGN.md's formulas, written out
independently in NumPy float64 (tests/fusion_oracle.py)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusion_oracle as oracle
from collab_ops.ops.fusion import dynamic_fusion_weights, fuse_logits
from collab_ops.reference import fusion as reference
from collab_ops import presets
from backends import cpu_backends


BACKENDS = cpu_backends("fuse_logits")
DYNAMIC_BACKENDS = cpu_backends("dynamic_fusion_weights")
# fp32 results against the float64 formula.
TOL = dict(rtol=1e-5, atol=1e-5)
# The float64 reference against the float64 formula.
TOL64 = dict(rtol=1e-12, atol=1e-12)
INF = float("inf")


def random_logits(generator, batch, widths, dtype=torch.float32, scale=3.0):
    return [(torch.randn(batch, v, generator=generator) * scale).to(dtype) for v in widths]


def assert_matches(actual: torch.Tensor, expected: np.ndarray, tol=TOL):
    assert actual.dtype in (torch.float32, torch.float64)
    np.testing.assert_allclose(actual.detach().to(torch.float64).numpy(), expected, **tol)


def reference_call(logits, weights, *, temperatures=None, normalize=True, alpha=None, ref=0, vocab_size=None, output="logprobs"):
    """The float64 reference called directly with canonical arguments."""
    batch, num_models = logits[0].shape[0], len(logits)
    if not torch.is_tensor(weights):
        weights = torch.tensor(weights, dtype=torch.float64).expand(batch, num_models)
    return reference.fuse_logits(
        logits,
        weights,
        temperatures or [1.0] * num_models,
        normalize,
        alpha,
        ref,
        vocab_size or min(l.shape[1] for l in logits),
        output == "logprobs",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("output", ["logprobs", "logits"])
@pytest.mark.parametrize("alpha", [None, 0.05])
def test_fuse_logits_matches_formula(backend, dtype, normalize, output, alpha):
    g = torch.Generator().manual_seed(1)
    logits = random_logits(g, 5, [9, 7, 8], dtype)
    weights = [1.3, -0.7, 0.4]
    temperatures = [1.0, 0.6, 1.7]
    out = fuse_logits(
        logits, weights, temperatures=temperatures, normalize=normalize, plausibility_alpha=alpha,
        plausibility_ref=1, output=output, backend=backend,
    )
    assert out.dtype == torch.float32 and out.shape == (5, 7)
    expected = oracle.fuse(logits, weights, temperatures, normalize, alpha, 1, None, output)
    assert_matches(out, expected)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("output", ["logprobs", "logits"])
def test_float64_reference_matches_formula(normalize, output):
    g = torch.Generator().manual_seed(7)
    logits = random_logits(g, 4, [11, 11, 13], torch.float64)
    weights = torch.randn(4, 3, generator=g, dtype=torch.float64)
    out = reference_call(logits, weights, temperatures=[0.8, 1.0, 2.5], normalize=normalize, alpha=0.2, ref=2, output=output)
    assert out.dtype == torch.float64
    assert_matches(out, oracle.fuse(logits, weights, [0.8, 1.0, 2.5], normalize, 0.2, 2, None, output), TOL64)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    num_models=st.integers(1, 4),
    batch=st.integers(1, 4),
    widths_extra=st.lists(st.integers(0, 3), min_size=4, max_size=4),
    vocab=st.integers(1, 12),
    weights=st.lists(st.sampled_from([0.0, 1.0, -1.0, 0.5, -2.25, 3.0]), min_size=4, max_size=4),
    temperatures=st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=4, max_size=4),
    normalize=st.booleans(),
    alpha=st.sampled_from([None, 0.01, 0.5, 1.0]),
    ref=st.integers(0, 3),
    output=st.sampled_from(["logprobs", "logits"]),
    neg_inf_fraction=st.sampled_from([0.0, 0.2, 0.6]),
    seed=st.integers(0, 2**16),
)
def test_fuse_logits_random_configurations(
    backend, num_models, batch, widths_extra, vocab, weights, temperatures, normalize, alpha, ref, output, neg_inf_fraction, seed
):
    g = torch.Generator().manual_seed(seed)
    logits = random_logits(g, batch, [vocab + e for e in widths_extra[:num_models]], torch.float64)
    for l in logits:
        l.masked_fill_(torch.rand(l.shape, generator=g, dtype=torch.float64) < neg_inf_fraction, -INF)
    weights, temperatures, ref = weights[:num_models], temperatures[:num_models], ref % num_models
    out = reference_call(logits, weights, temperatures=temperatures, normalize=normalize, alpha=alpha, ref=ref, vocab_size=vocab, output=output)
    expected = oracle.fuse(logits, weights, temperatures, normalize, alpha, ref, vocab, output)
    assert_matches(out, expected, TOL64)
    fp32 = fuse_logits(
        [l.float() for l in logits], weights, temperatures=temperatures, normalize=normalize,
        plausibility_alpha=alpha, plausibility_ref=ref, vocab_size=vocab, output=output, backend=backend,
    )
    assert_matches(fp32, oracle.fuse([l.float() for l in logits], weights, temperatures, normalize, alpha, ref, vocab, output))


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_weights(backend):
    g = torch.Generator().manual_seed(3)
    logits = random_logits(g, 6, [10, 10])
    weights = torch.tensor([[1.0, -1.0], [0.0, 1.0], [2.0, 0.0], [-0.5, 1.5], [1.0, 1.0], [0.0, 0.0]])
    out = fuse_logits(logits, weights, output="logits", backend=backend)
    assert_matches(out, oracle.fuse(logits, weights, output="logits"))
    np.testing.assert_array_equal(out[5].numpy(), np.zeros(10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_weight_times_neg_inf_excludes(backend):
    expert = torch.tensor([[1.0, 2.0, 0.5, 0.0]])
    amateur = torch.tensor([[0.0, -INF, 1.0, 2.0]])
    for output in ("logits", "logprobs"):
        out = fuse_logits([expert, amateur], [1.0, -1.0], normalize=False, output=output, backend=backend)
        assert out[0, 1] == -INF
        assert torch.isfinite(out[0, [0, 2, 3]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_model_is_ignored_even_with_nan_and_neg_inf(backend):
    g = torch.Generator().manual_seed(4)
    kept = random_logits(g, 3, [8, 8])
    ignored = torch.randn(3, 8, generator=g)
    ignored[0, 2] = -INF
    ignored[1, :] = -INF
    ignored[2, 5] = float("nan")
    for normalize in (True, False):
        with_ignored = fuse_logits([kept[0], ignored, kept[1]], [0.7, 0.0, -0.3], normalize=normalize, backend=backend)
        assert_matches(with_ignored, oracle.fuse(kept, [0.7, -0.3], normalize=normalize))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output", ["logprobs", "logits"])
def test_all_excluded_row_is_neg_inf_and_nan_row_is_nan(backend, output):
    g = torch.Generator().manual_seed(5)
    a, b = random_logits(g, 4, [6, 6])
    a[1, :3] = -INF
    b[1, 3:] = -INF  # row 1: every token excluded by one model or the other
    b[2, 4] = float("nan")  # row 2: NaN in a model with non-zero weight
    a[3, 0] = -INF  # row 3: one token excluded
    for normalize in (True, False):
        out = fuse_logits([a, b], [1.0, 0.5], normalize=normalize, output=output, backend=backend)
        assert (out[1] == -INF).all()
        assert torch.isnan(out[2]).all()
        assert out[3, 0] == -INF and torch.isfinite(out[3, 1:]).all()
        assert torch.isfinite(out[0]).all()
        assert_matches(out, oracle.fuse([a, b], [1.0, 0.5], normalize=normalize, output=output))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plausibility_mask_known_answer(backend):
    probs = torch.tensor([[0.5, 0.3, 0.04, 0.16]])
    expert = probs.log()
    amateur = torch.zeros(1, 4)
    out = fuse_logits([expert, amateur], [1.0, -1.0], plausibility_alpha=0.1, output="logits", backend=backend)
    # Threshold 0.1 · 0.5 = 0.05: only the 0.04 token falls below it.
    expected = expert[0] - expert[0].logsumexp(-1) - math.log(0.25)
    expected[2] = -INF
    torch.testing.assert_close(out[0], expected, rtol=1e-6, atol=1e-6)
    everything_but_top = fuse_logits([expert, amateur], [1.0, -1.0], plausibility_alpha=1.0, output="logits", backend=backend)
    assert torch.isfinite(everything_but_top[0, 0]) and (everything_but_top[0, 1:] == -INF).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_plausibility_alpha_below_float32s_range_still_excludes_by_the_rule(backend):
    # α = 1e-50 is 0 in float32: p ratios e^-50 (kept), e^-200 and 0 (both excluded).
    expert = torch.tensor([[0.0, -50.0, -200.0, -INF]])
    out = fuse_logits([expert], [1.0], plausibility_alpha=1e-50, normalize=False, output="logits", backend=backend)
    assert torch.isfinite(out[0, :2]).all() and (out[0, 2:] == -INF).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_plausibility_uses_reference_temperature_and_zero_weight_reference(backend):
    g = torch.Generator().manual_seed(6)
    logits = random_logits(g, 3, [12, 12])
    for ref, temperatures, weights in [(1, [1.0, 0.5], [1.0, 0.0]), (0, [2.0, 1.0], [0.0, 1.0])]:
        out = fuse_logits(logits, weights, temperatures=temperatures, plausibility_alpha=0.3, plausibility_ref=ref, backend=backend)
        assert_matches(out, oracle.fuse(logits, weights, temperatures, True, 0.3, ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_neg_inf_plausibility_reference_leaves_no_plausible_token(backend):
    a, ref = torch.randn(2, 5), torch.randn(2, 5)
    ref[0] = -INF
    for output in ("logprobs", "logits"):
        out = fuse_logits([a, ref], [1.0, 0.0], plausibility_alpha=0.5, plausibility_ref=1, output=output, backend=backend)
        assert (out[0] == -INF).all() and torch.isfinite(out[1]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_zero_weight_plausibility_reference_poisons_row(backend):
    a, b = torch.randn(2, 5), torch.randn(2, 5)
    b[0, 1] = float("nan")
    masked = fuse_logits([a, b], [1.0, 0.0], plausibility_alpha=0.2, plausibility_ref=1, backend=backend)
    assert torch.isnan(masked[0]).all() and torch.isfinite(masked[1]).any()
    unmasked = fuse_logits([a, b], [1.0, 0.0], backend=backend)
    assert not torch.isnan(unmasked).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_alignment_small_widths(backend):
    g = torch.Generator().manual_seed(8)
    narrow, wide = random_logits(g, 3, [7, 9])
    wide[:, 7:] = float("nan")  # beyond the shared vocabulary: must not be read
    out = fuse_logits([narrow, wide], [1.0, -0.5], backend=backend)
    assert out.shape == (3, 7)
    assert_matches(out, oracle.fuse([narrow, wide[:, :7]], [1.0, -0.5]))
    explicit = fuse_logits([wide, wide], [1.0, 1.0], vocab_size=5, temperatures=[1.0, 2.0], backend=backend)
    assert explicit.shape == (3, 5)
    assert_matches(explicit, oracle.fuse([wide[:, :5], wide[:, :5]], [1.0, 1.0], [1.0, 2.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_alignment_qwen_widths(backend):
    g = torch.Generator().manual_seed(9)
    small, large = random_logits(g, 2, [151936, 152064], torch.bfloat16)
    large[:, 151936:] = 1e4  # padding columns that would dominate if they were read
    out = fuse_logits([large, small], [1.0, 0.5], plausibility_alpha=0.01, backend=backend)
    assert out.shape == (2, 151936)
    assert_matches(out, oracle.fuse([large, small], [1.0, 0.5], alpha=0.01, vocab_size=151936))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    g = torch.Generator().manual_seed(10)
    storage = torch.randn(9, 4, generator=g)
    transposed = storage.t()  # [4, 9], column stride 4
    strided = torch.randn(4, 18, generator=g)[:, ::2]  # [4, 9], column stride 2
    broadcast = torch.randn(1, 9, generator=g).expand(4, 9)  # row stride 0
    logits = [transposed, strided, broadcast]
    out = fuse_logits(logits, [1.0, -0.5, 0.25], temperatures=[1.0, 1.5, 0.7], backend=backend)
    assert_matches(out, oracle.fuse([l.contiguous() for l in logits], [1.0, -0.5, 0.25], [1.0, 1.5, 0.7]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_modified(backend):
    g = torch.Generator().manual_seed(11)
    logits = random_logits(g, 3, [5, 6], torch.bfloat16)
    weights = torch.randn(3, 2, generator=g)
    copies = [l.clone() for l in logits] + [weights.clone()]
    fuse_logits(logits, weights, plausibility_alpha=0.5, backend=backend)
    for before, after in zip(copies, logits + [weights]):
        assert torch.equal(before, after)


def test_empty_batch():
    out = fuse_logits([torch.empty(0, 4), torch.empty(0, 4)], [1.0, -1.0])
    assert out.shape == (0, 4)


def test_many_models_in_reference():
    g = torch.Generator().manual_seed(12)
    logits = random_logits(g, 2, [5] * 10)
    weights = [0.1 * k - 0.3 for k in range(10)]
    out = fuse_logits(logits, weights, backend="reference")
    assert_matches(out, oracle.fuse(logits, weights))


# Presets: each compared with its paper's formula written in the paper's own terms.

def _two_models(seed, batch=4, vocab=16):
    g = torch.Generator().manual_seed(seed)
    return random_logits(g, batch, [vocab, vocab])


def _np_log_softmax(x):
    return np.stack([oracle.log_softmax(row) for row in x])


def test_preset_contrastive_decoding():
    expert, amateur = _two_models(20)
    alpha, tau = 0.1, 0.5
    out = fuse_logits([expert, amateur], **presets.contrastive_decoding(alpha=alpha, amateur_temperature=tau), output="logits")
    e, a = oracle.as_float64(expert), oracle.as_float64(amateur)
    p_exp = np.exp(_np_log_softmax(e))
    v_head = p_exp >= alpha * p_exp.max(axis=1, keepdims=True)
    expected = np.where(v_head, _np_log_softmax(e) - _np_log_softmax(a / tau), -np.inf)
    assert (~v_head).any()
    assert_matches(out, expected)


def test_preset_cd_reasoning():
    expert, amateur = _two_models(21)
    beta, alpha = 0.5, 0.1
    out = fuse_logits([expert, amateur], **presets.cd_reasoning(beta=beta, alpha=alpha), output="logits")
    e, a = oracle.as_float64(expert), oracle.as_float64(amateur)
    # O'Brien & Lewis's code form of the mask: expert logit below log α + max expert logit.
    cutoff = np.log(alpha) + e.max(axis=1, keepdims=True)
    expected = np.where(e < cutoff, -np.inf, (1 + beta) * e - beta * a)
    assert_matches(out, expected)


def test_preset_proxy_tuning():
    g = torch.Generator().manual_seed(22)
    large, tuned, base = random_logits(g, 3, [12, 12, 12])
    alpha = 0.8
    options = presets.proxy_tuning(alpha=alpha)
    scores = fuse_logits([large, tuned, base], **options, output="logits")
    l, t, b = (oracle.as_float64(x) for x in (large, tuned, base))
    assert_matches(scores, _np_log_softmax(l) + alpha * (_np_log_softmax(t) - _np_log_softmax(b)))
    # Liu et al. write softmax(s_L + α(s_tuned − s_base)) on logit scores: the same distribution.
    assert_matches(fuse_logits([large, tuned, base], **options), _np_log_softmax(l + alpha * (t - b)))


@pytest.mark.parametrize("direction", ["up", "down"])
def test_preset_eft(direction):
    g = torch.Generator().manual_seed(23)
    base_m, ft_n, ref_n = random_logits(g, 3, [10, 10, 10])
    beta = 1.5
    out = fuse_logits([base_m, ft_n, ref_n], **presets.eft(beta=beta, direction=direction), output="logits")
    m, f, r = (_np_log_softmax(oracle.as_float64(x)) for x in (base_m, ft_n, ref_n))
    assert_matches(out, m + beta * (f - r))


def test_preset_dexperts():
    g = torch.Generator().manual_seed(24)
    base, expert, anti = random_logits(g, 3, [10, 10, 10])
    out = fuse_logits([base, expert, anti], **presets.dexperts(alpha=2.0), output="logits")
    z, zp, zm = (oracle.as_float64(x) for x in (base, expert, anti))
    assert_matches(out, z + 2.0 * (zp - zm))


@pytest.mark.parametrize("scale", [1.0, 1.5, 3.0])
def test_preset_cfg(scale):
    cond, uncond = _two_models(25)
    uncond[0, 3] = -INF
    out = fuse_logits([cond, uncond], **presets.cfg(guidance_scale=scale), output="logits")
    c, u = _np_log_softmax(oracle.as_float64(cond)), _np_log_softmax(oracle.as_float64(uncond))
    # Hugging Face: guidance_scale · (scores − unconditional) + unconditional, on log-probs;
    # at scale 1 it returns the conditional scores untouched, whatever the unconditional model says.
    # Where the unconditional model has −inf, HF's arithmetic gives ∞ − ∞ = NaN; the fusion rule
    # excludes the token instead.
    with np.errstate(invalid="ignore"):
        guided = np.where(u == -np.inf, -np.inf, scale * (c - u) + u)
    expected = c if scale == 1.0 else guided
    assert_matches(out, expected)


# Dynamic logits fusion.

DEFAULT_GRID = [i / 10 for i in range(21)]


def test_dynamic_weights_float64_matches_brute_force():
    g = torch.Generator().manual_seed(30)
    large, e0, e1, base = random_logits(g, 5, [13, 13, 15, 14], torch.float64, scale=1.5)
    grid = torch.tensor(DEFAULT_GRID, dtype=torch.float32)
    out = reference.dynamic_fusion_weights(large, [e0, e1], base, grid, 13)
    assert out.dtype == torch.float64 and out.shape == (5, 2)
    expected = oracle.dynamic_weights(large, [e0, e1], base, grid.double().numpy())
    np.testing.assert_array_equal(out.numpy(), expected)
    assert len(np.unique(expected)) > 2  # the rows really choose different weights


@pytest.mark.parametrize("backend", DYNAMIC_BACKENDS)
def test_dynamic_weights_fp32_choose_a_minimiser(backend):
    g = torch.Generator().manual_seed(31)
    large, e0, e1, base = random_logits(g, 6, [20, 20, 20, 20], scale=1.5)
    out = dynamic_fusion_weights(large, [e0, e1], base, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (6, 2)
    rows = [oracle.as_float64(x) for x in (large, e0, e1, base)]
    for b in range(6):
        for t, expert in enumerate(rows[1:3]):
            objectives = [oracle.dynamic_objective(rows[0][b], expert[b], rows[3][b], a) for a in DEFAULT_GRID]
            chosen = oracle.dynamic_objective(rows[0][b], expert[b], rows[3][b], float(out[b, t]))
            assert float(out[b, t]) in [np.float32(a) for a in DEFAULT_GRID]
            assert chosen <= min(objectives) + 1e-5 * (1 + max(objectives))


@pytest.mark.parametrize("backend", DYNAMIC_BACKENDS)
def test_dynamic_weights_known_answers(backend):
    g = torch.Generator().manual_seed(32)
    shared, expert = random_logits(g, 4, [30, 30], scale=2.0)
    # large == base: at α = 1 the fused distribution is the expert's and both KL gaps vanish.
    assert torch.equal(dynamic_fusion_weights(shared, [expert], shared, backend=backend), torch.ones(4, 1))
    # expert == base: every α gives P̃ = P and both targets are 0; ties go to the first grid entry.
    other = torch.randn(4, 30, generator=g)
    assert torch.equal(dynamic_fusion_weights(other, [shared], shared, grid=[0.5, 0.0, 1.0], backend=backend), torch.full((4, 1), 0.5))


@pytest.mark.parametrize("backend", DYNAMIC_BACKENDS)
def test_dynamic_weights_per_expert_independence_and_grid(backend):
    g = torch.Generator().manual_seed(33)
    large, e0, e1, e2, base = random_logits(g, 3, [16] * 5, scale=1.5)
    both = dynamic_fusion_weights(large, [e0, e1], base, grid=torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0]), backend=backend)
    swapped = dynamic_fusion_weights(large, [e0, e2], base, grid=[0.0, 0.25, 0.5, 1.0, 2.0], backend=backend)
    torch.testing.assert_close(both[:, 0], swapped[:, 0], rtol=0, atol=0)
    expected = oracle.dynamic_weights(large, [e0, e1], base, np.array([0.0, 0.25, 0.5, 1.0, 2.0]))
    np.testing.assert_array_equal(both.double().numpy(), expected)


@pytest.mark.parametrize("backend", DYNAMIC_BACKENDS)
def test_dynamic_weights_nan_and_neg_inf_rows(backend):
    g = torch.Generator().manual_seed(34)
    large, expert, base = random_logits(g, 3, [10, 11, 10])
    expert[0, 3] = float("nan")
    base[1, 2] = -INF  # excluded from P̃ for every α ≠ 0 while P keeps mass there
    expert[2, 10] = float("nan")  # beyond the shared vocabulary
    out = dynamic_fusion_weights(large, [expert], base, backend=backend)
    assert torch.isnan(out[0, 0])
    assert out[1, 0] == 0.0
    assert torch.isfinite(out[2, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_weights_fuse_as_documented(backend):
    g = torch.Generator().manual_seed(35)
    large, e0, e1, base = random_logits(g, 4, [12] * 4, scale=1.5)
    alpha = dynamic_fusion_weights(large, [e0, e1], base)
    weights = torch.cat([torch.ones(4, 1), -alpha.sum(1, keepdim=True), alpha], dim=1)
    out = fuse_logits([large, base, e0, e1], weights, normalize=False, backend=backend)
    l, b, x0, x1 = (oracle.as_float64(t) for t in (large, base, e0, e1))
    a = alpha.double().numpy()
    fused = l + a[:, :1] * (x0 - b) + a[:, 1:] * (x1 - b)
    assert_matches(out, _np_log_softmax(fused))
