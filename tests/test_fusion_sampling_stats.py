"""fused_sample draws from the exact fused distribution after temperature → top_k → top_p → min_p.

Goodness of fit is a chi-square test against the distribution computed in float64 by
tests/fusion_oracle.py, with the threshold chi2.ppf(1 − FALSE_ALARM, df); fixed seeds make every
test deterministic, and `test_chi_square_rejects_a_wrong_distribution` shows the same test
catches a sampler that skips a filter or the temperature.
"""
import numpy as np
import pytest
import torch
from scipy.stats import chi2

import fused_sample_checks as sample_checks
import fusion_oracle as oracle
from collab_ops.ops.fusion import fused_sample
from backends import cpu_backends

# 20 000 draws are 20 000 rows: too many for Triton's interpreter (tests/test_fusion_triton.py
# tests its distribution with fewer).
BACKENDS = cpu_backends("fused_sample", candidates=("reference", "cpu"))
DRAWS = 20_000
FALSE_ALARM = 1e-4
INF = float("inf")
VOCAB = 16

# The fused model pair every distribution test uses: CD-style weights with exclusions by both
# models (one of them under a negative weight) and a plausibility mask.
FUSION = dict(weights=[1.0, -0.5], temperatures=[1.0, 1.5], plausibility_alpha=0.05)

CONFIGS = [
    dict(),
    dict(temperature=0.6),
    dict(temperature=1.4, top_k=5),
    dict(top_p=0.7),
    dict(temperature=0.8, min_p=0.15),
    dict(temperature=1.2, top_k=8, top_p=0.85, min_p=0.05),
]


def model_pair():
    g = torch.Generator().manual_seed(123)
    expert = torch.randn(1, VOCAB, generator=g)
    amateur = torch.randn(1, VOCAB, generator=g)
    expert[0, 3] = -INF
    amateur[0, 9] = -INF
    return expert, amateur


def exact_distribution(models, weights=FUSION["weights"], **sampling):
    scores = oracle.fuse(
        list(models), weights, FUSION["temperatures"], alpha=FUSION["plausibility_alpha"], output="logits"
    )[0]
    return oracle.sampling_distribution(scores, **sampling)


def chi_square(counts: np.ndarray, probs: np.ndarray):
    """Statistic and degrees of freedom over the support; bins expecting < 5 draws are pooled."""
    expected = probs * counts.sum()
    support = probs > 0
    small = support & (expected < 5)
    observed_bins = list(counts[support & ~small]) + ([counts[small].sum()] if small.any() else [])
    expected_bins = list(expected[support & ~small]) + ([expected[small].sum()] if small.any() else [])
    observed_bins, expected_bins = np.array(observed_bins), np.array(expected_bins)
    return float(((observed_bins - expected_bins) ** 2 / expected_bins).sum()), len(expected_bins) - 1


def draw(backend, models, seed, draws=DRAWS, **sampling):
    expanded = [m.expand(draws, VOCAB) for m in models]
    tokens = fused_sample(expanded, **FUSION, **sampling, seed=seed, backend=backend)
    assert tokens.dtype == torch.int64 and tokens.shape == (draws,)
    assert (tokens >= 0).all() and (tokens < VOCAB).all()
    return np.bincount(tokens.numpy(), minlength=VOCAB)


def assert_fits(counts, probs):
    assert counts[probs == 0].sum() == 0, f"drew zero-probability tokens {np.nonzero((probs == 0) & (counts > 0))[0]}"
    statistic, df = chi_square(counts, probs)
    assert df >= 1
    assert statistic < chi2.ppf(1 - FALSE_ALARM, df), f"chi-square {statistic:.1f} with {df} degrees of freedom"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_sampler_matches_exact_distribution(backend, config):
    options = CONFIGS[config]
    models = model_pair()
    probs = exact_distribution(models, **options)
    # The filters' thresholds must not sit on a knife edge, or fp32 and float64 could disagree.
    for nudge in (-1e-6, 1e-6):
        nudged = dict(options)
        nudged.update({k: options[k] + nudge for k in ("top_p", "min_p") if k in options})
        assert ((exact_distribution(models, **nudged) > 0) == (probs > 0)).all()
    assert (probs > 0).sum() >= 3
    assert_fits(draw(backend, models, seed=1000 + config, **options), probs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chi_square_rejects_a_wrong_distribution(backend):
    models = model_pair()
    options = dict(temperature=0.8, top_p=0.7)
    counts = draw(backend, models, seed=7, **options)
    threshold_of = lambda probs: chi2.ppf(1 - FALSE_ALARM, chi_square(counts, probs)[1])
    for wrong in (dict(temperature=0.8), dict(top_p=0.7), dict(temperature=1.0, top_p=0.7)):
        wrong_probs = exact_distribution(models, **wrong)
        assert chi_square(counts, wrong_probs)[0] > threshold_of(wrong_probs) or counts[wrong_probs == 0].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_weights_and_seeds_follow_each_rows_distribution(backend):
    models = model_pair()
    draws = 6000
    row_weights = torch.tensor([[1.0, -0.5], [0.5, 1.0]]).repeat(draws // 2, 1)
    expanded = [m.expand(draws, VOCAB) for m in models]
    options = dict(temperature=0.9, top_k=10)
    seeds = torch.arange(draws, dtype=torch.int64) * 7919 + 11
    tokens = fused_sample(
        expanded, row_weights, temperatures=FUSION["temperatures"], plausibility_alpha=FUSION["plausibility_alpha"],
        seed=seeds, backend=backend, **options,
    ).numpy()
    for parity, weights in enumerate(([1.0, -0.5], [0.5, 1.0])):
        counts = np.bincount(tokens[parity::2], minlength=VOCAB)
        assert_fits(counts, exact_distribution(models, weights=weights, **options))


@pytest.mark.parametrize("backend", BACKENDS)
def test_filtered_tokens_are_never_drawn_at_qwen_width(backend):
    g = torch.Generator().manual_seed(5)
    large = torch.randn(1, 152064, generator=g).to(torch.bfloat16).expand(32, -1)
    small = torch.randn(1, 151936, generator=g).to(torch.bfloat16).expand(32, -1)
    tokens = fused_sample([large, small], [1.0, 0.3], top_k=3, seed=3, backend=backend)
    scores = oracle.fuse([large[:1], small[:1]], [1.0, 0.3], output="logits")[0]
    top3 = set(np.argsort(scores)[-3:].tolist())
    assert set(tokens.tolist()) <= top3 and len(set(tokens.tolist())) > 1
    greedy = fused_sample([large, small], [1.0, 0.3], greedy=True, backend=backend)
    assert (greedy == int(np.argmax(scores))).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_modified(backend):
    g = torch.Generator().manual_seed(6)
    logits = [torch.randn(3, 5, generator=g).to(torch.bfloat16), torch.randn(3, 6, generator=g)]
    weights = torch.randn(3, 2, generator=g)
    seed = torch.arange(3)
    copies = [t.clone() for t in (*logits, weights, seed)]
    fused_sample(logits, weights, plausibility_alpha=0.5, top_k=2, top_p=0.5, min_p=0.1, seed=seed, backend=backend)
    for before, after in zip(copies, (*logits, weights, seed)):
        assert torch.equal(before, after)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_vocabulary_and_single_survivor(backend):
    one = fused_sample([torch.randn(4, 1)], [1.0], seed=0, backend=backend)
    assert one.tolist() == [0, 0, 0, 0]
    logits = torch.full((4, 6), -INF)
    logits[:, 4] = 0.0
    survivor = fused_sample([logits, torch.randn(4, 6)], [1.0, 2.0], seed=0, backend=backend)
    assert survivor.tolist() == [4, 4, 4, 4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_scores_that_overflow_after_the_temperature_still_sample(backend):
    """s / T overflows float32 here, softmax(s / T) does not: all mass on token 0."""
    scores = torch.tensor([[2e38, 1e38, 0.0]])
    tokens = fused_sample([scores], [1.0], normalize=False, temperature=0.5, seed=3, backend=backend)
    assert tokens.tolist() == [0]


def test_equally_likely_tokens_are_decided_by_the_smallest_random_word():
    """In a flat row the Gumbel-max draw is won by the column with the smallest uniform. With all 32
    bits of each Philox word in the uniform that is the smallest word of the row; with 23 bits about
    a fifth of these 2^22-token rows would tie at the top and give the lower id instead (9 of these
    48 rows). The CPU kernel draws the CUDA kernel's stream, so this covers both."""
    if "cpu" not in BACKENDS:
        pytest.skip("the compiled fused_sample kernel is not built")
    vocab, rows = 1 << 22, 48
    seeds = torch.arange(rows) * 7919 + 11
    tokens = fused_sample([torch.zeros(rows, vocab)], [1.0], seed=seeds, backend="cpu")
    for row in range(rows):
        words = sample_checks.random_words(row, vocab, int(seeds[row]), row_seeded=True)
        assert int(tokens[row]) == int(np.argmin(words)), row


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_tokens_and_different_seeds_differ(backend):
    g = torch.Generator().manual_seed(9)
    logits = [torch.randn(512, 40, generator=g), torch.randn(512, 40, generator=g)]
    options = dict(temperature=1.3, top_p=0.95, backend=backend)
    first = fused_sample(logits, [1.0, 0.5], seed=42, **options)
    assert torch.equal(first, fused_sample(logits, [1.0, 0.5], seed=42, **options))
    assert torch.equal(first, fused_sample(logits, [1.0, 0.5], seed=torch.tensor(42), **options))
    assert not torch.equal(first, fused_sample(logits, [1.0, 0.5], seed=43, **options))
    per_row = torch.arange(512) * 3 + 1
    assert torch.equal(
        fused_sample(logits, [1.0, 0.5], seed=per_row, **options),
        fused_sample(logits, [1.0, 0.5], seed=per_row.clone(), **options),
    )
    assert not torch.equal(
        fused_sample(logits, [1.0, 0.5], seed=per_row, **options),
        fused_sample(logits, [1.0, 0.5], seed=per_row + 1, **options),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_unseeded_calls_follow_torch_manual_seed(backend):
    g = torch.Generator().manual_seed(10)
    logits = [torch.randn(256, 30, generator=g)]
    torch.manual_seed(1)
    first = fused_sample(logits, [1.0], backend=backend)
    second = fused_sample(logits, [1.0], backend=backend)
    torch.manual_seed(1)
    assert torch.equal(first, fused_sample(logits, [1.0], backend=backend))
    assert not torch.equal(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_greedy_is_argmax_of_fused_scores(backend, normalize):
    g = torch.Generator().manual_seed(11)
    logits = [torch.randn(16, 50, generator=g) * 2, torch.randn(16, 57, generator=g).to(torch.float16)]
    weights = torch.randn(16, 2, generator=g)
    options = dict(temperatures=[0.7, 1.2], normalize=normalize, plausibility_alpha=0.05, plausibility_ref=1)
    tokens = fused_sample(logits, weights, **options, greedy=True, temperature=0.3, top_k=2, top_p=0.1, seed=5, backend=backend)
    scores = oracle.fuse(logits, weights, [0.7, 1.2], normalize, 0.05, 1, output="logits")
    np.testing.assert_array_equal(tokens.numpy(), scores.argmax(axis=1))


def rows_without_a_token():
    """Five rows; rows 1, 2 and 4 have no token to sample."""
    g = torch.Generator().manual_seed(12)
    a, b, ignored = (torch.randn(5, 8, generator=g) for _ in range(3))
    a[1, :4] = -INF
    b[1, 4:] = -INF  # row 1: every token excluded by one model or the other
    b[2, 6] = float("nan")  # row 2: NaN in a model with non-zero weight
    ignored[3, 2] = float("nan")  # row 3: NaN only in the zero-weight model
    a[4] = torch.arange(8.0)
    b[4, 7] = -INF  # row 4: alpha = 1 keeps only a's argmax (7), which b excludes
    return [a, b, ignored], [1.0, 1.0, 0.0], dict(plausibility_alpha=1.0, plausibility_ref=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("greedy", [False, True])
def test_rows_without_a_token_get_minus_one(backend, greedy):
    logits, weights, options = rows_without_a_token()
    tokens = fused_sample(logits, weights, **options, greedy=greedy, seed=0, backend=backend)
    assert tokens[[1, 2, 4]].tolist() == [-1, -1, -1]
    scores = oracle.fuse(logits, weights, alpha=1.0, output="logits")
    for row in (0, 3):
        assert tokens[row] >= 0 and np.isfinite(scores[row, tokens[row]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_strict_raises_naming_the_rows(backend):
    logits, weights, options = rows_without_a_token()
    with pytest.raises(ValueError, match=r"row\(s\) \[1, 2, 4\]"):
        fused_sample(logits, weights, **options, seed=0, strict=True, backend=backend)
    good = [l[[0, 3]] for l in logits]
    tokens = fused_sample(good, weights, **options, seed=0, strict=True, backend=backend)
    assert (tokens >= 0).all()
