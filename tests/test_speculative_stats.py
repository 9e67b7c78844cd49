"""speculative_verify is lossless: emitted tokens follow the target distribution, on every backend.

Each test verifies 20000 rows that share per-position target and draft distributions on a small
vocabulary, with the drafts sampled from the draft distribution, and checks with chi-square tests
(threshold from scipy at a false-alarm rate of 1e-6 per check; the seeds are fixed, so a pass is
reproducible) that the first emitted token follows p_0, the token after an accepted draft follows
the next position's p, the bonus token follows the last position's p, that the acceptance count
at position 0 is Binomial(rows, sum min(p_0, q_0)), and that zero-probability tokens never appear.
"""
import numpy as np
import pytest
import torch
from scipy import stats

from collab_ops.ops.speculative import speculative_verify
from backends import cpu_backends

BACKENDS = cpu_backends("speculative_verify")

ROWS = 20000
FALSE_ALARM = 1e-6

# Per-position target (K+1 = 4 positions) and draft (K = 3) distributions over V = 6 tokens. The
# zeros differ between p and q, so drafts with p = 0 are proposed (always rejected) and tokens with
# q = 0 can only come from the residual.
TARGET = np.array(
    [
        [0.30, 0.25, 0.20, 0.15, 0.10, 0.00],
        [0.05, 0.10, 0.40, 0.00, 0.25, 0.20],
        [0.00, 0.30, 0.10, 0.30, 0.10, 0.20],
        [0.20, 0.20, 0.00, 0.20, 0.20, 0.20],
    ]
)
DRAFT = np.array(
    [
        [0.10, 0.40, 0.00, 0.20, 0.15, 0.15],
        [0.30, 0.05, 0.25, 0.20, 0.20, 0.00],
        [0.25, 0.25, 0.25, 0.05, 0.10, 0.10],
    ]
)
NUM_DRAFTS = DRAFT.shape[0]
VOCAB = TARGET.shape[1]


def per_row(distributions: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    """[positions, V] shared by every row -> a contiguous [ROWS, positions, V] tensor."""
    return torch.tensor(distributions, dtype=dtype).expand(ROWS, -1, -1).contiguous()


def sample_drafts(draft: np.ndarray, seed: int) -> torch.Tensor:
    """[ROWS, K] ids, position i drawn from draft[i]: what a draft model would propose."""
    generator = torch.Generator().manual_seed(seed)
    columns = [torch.multinomial(torch.tensor(row), ROWS, replacement=True, generator=generator) for row in draft]
    return torch.stack(columns, dim=1)


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def log_or_minus_inf(probabilities: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(probabilities)


def assert_follows(tokens: torch.Tensor, expected: np.ndarray, what: str) -> None:
    """Chi-square goodness of fit of `tokens` to `expected`, and no token of zero probability."""
    counts = np.bincount(tokens.numpy(), minlength=len(expected))
    assert len(counts) == len(expected), f"{what}: a token id outside the vocabulary"
    support = expected > 0
    assert counts[~support].sum() == 0, f"{what}: zero-probability tokens emitted, counts {counts}"
    expected_counts = len(tokens) * expected[support]
    assert expected_counts.min() >= 20, f"{what}: too few draws for a chi-square test"
    statistic = ((counts[support] - expected_counts) ** 2 / expected_counts).sum()
    threshold = stats.chi2.ppf(1 - FALSE_ALARM, support.sum() - 1)
    assert statistic < threshold, f"{what}: chi2 {statistic:.1f} >= {threshold:.1f}, counts {counts}, expected {expected_counts.round()}"


def assert_binomial(successes: int, trials: int, probability: float, what: str) -> None:
    low, high = stats.binom.interval(1 - FALSE_ALARM, trials, probability)
    assert low <= successes <= high, f"{what}: {successes} of {trials}, expected [{low}, {high}] (p={probability:.4f})"


def assert_never_emits_zero_probability(tokens: torch.Tensor, num_emitted: torch.Tensor, target: np.ndarray) -> None:
    emitted = torch.arange(tokens.shape[1])[None, :] < num_emitted[:, None]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    probabilities = torch.tensor(target)[positions[emitted], tokens[emitted]]
    assert bool((probabilities > 0).all()), "a token of zero target probability was emitted"


def assert_lossless(tokens, num_emitted, num_accepted, target: np.ndarray, first_acceptance: float, what: str) -> None:
    """Every emitted position follows its target row given the drafts before it were accepted."""
    assert bool((num_emitted == num_accepted + 1).all())
    assert_never_emits_zero_probability(tokens, num_emitted, target)
    assert_follows(tokens[:, 0], target[0], f"{what}: first token")
    for position in range(1, tokens.shape[1]):
        reached = num_accepted >= position
        assert_follows(tokens[reached, position], target[position], f"{what}: token {position} after {position} accepted")
    assert_binomial(int((num_accepted >= 1).sum()), ROWS, first_acceptance, f"{what}: acceptances at position 0")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_drafts_with_probabilities_are_lossless(backend):
    draft_tokens = sample_drafts(DRAFT, seed=1)
    tokens, num_emitted, num_accepted = speculative_verify(
        draft_tokens, per_row(TARGET), per_row(DRAFT), seed=11, return_accepted=True, backend=backend
    )
    first_acceptance = np.minimum(TARGET[0], DRAFT[0]).sum()
    assert_lossless(tokens, num_emitted, num_accepted, TARGET, first_acceptance, "probs")


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_with_temperature_are_lossless(backend):
    # softmax((T log p + c) / T) = p for any per-position shift c, so the expected distributions
    # are TARGET and DRAFT exactly; forgetting the temperature would give p^T renormalised.
    temperature = 0.7
    target_logits = temperature * log_or_minus_inf(TARGET) + np.arange(NUM_DRAFTS + 1)[:, None]
    draft_logits = temperature * log_or_minus_inf(DRAFT) - 2.0 * np.arange(NUM_DRAFTS)[:, None]

    draft_tokens = sample_drafts(DRAFT, seed=3)
    tokens, num_emitted, num_accepted = speculative_verify(
        draft_tokens,
        per_row(target_logits),
        per_row(draft_logits),
        inputs="logits",
        temperature=temperature,
        seed=12,
        return_accepted=True,
        backend=backend,
    )
    first_acceptance = np.minimum(TARGET[0], DRAFT[0]).sum()
    assert_lossless(tokens, num_emitted, num_accepted, TARGET, first_acceptance, "logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_drafts_without_probabilities_are_lossless(backend):
    # The proposal may come from anywhere (n-gram lookup); verification treats q as one-hot, so a
    # draft x is accepted with probability p(x). This proposal mostly guesses the mode of p, so
    # enough rows accept all drafts to test the bonus token.
    proposal = 0.7 * np.eye(VOCAB)[TARGET[:NUM_DRAFTS].argmax(-1)] + 0.3 / VOCAB
    draft_tokens = sample_drafts(proposal, seed=4)
    tokens, num_emitted, num_accepted = speculative_verify(
        draft_tokens, per_row(TARGET), None, seed=13, return_accepted=True, backend=backend
    )
    first_acceptance = (TARGET[0] * proposal[0]).sum()
    assert_lossless(tokens, num_emitted, num_accepted, TARGET, first_acceptance, "one-hot drafts")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_drafts_are_lossless(backend):
    num_draft_tokens = torch.arange(ROWS) % (NUM_DRAFTS + 1)
    draft_tokens = sample_drafts(DRAFT, seed=5)
    draft_tokens[torch.arange(NUM_DRAFTS)[None, :] >= num_draft_tokens[:, None]] = -1  # unused slots
    tokens, num_emitted, num_accepted = speculative_verify(
        draft_tokens,
        per_row(TARGET),
        per_row(DRAFT),
        num_draft_tokens=num_draft_tokens,
        seed=14,
        return_accepted=True,
        backend=backend,
    )
    assert bool((num_accepted <= num_draft_tokens).all())
    assert_never_emits_zero_probability(tokens, num_emitted, TARGET)
    assert_follows(tokens[:, 0], TARGET[0], "ragged: first token")
    for drafts in range(NUM_DRAFTS + 1):
        # A row that accepted all its n drafts takes the bonus from target row n.
        bonus_rows = (num_draft_tokens == drafts) & (num_accepted == drafts)
        assert_follows(tokens[bonus_rows, drafts], TARGET[drafts], f"ragged: bonus of rows with {drafts} drafts")
    reached_second = num_accepted >= 1
    assert_follows(tokens[reached_second, 1], TARGET[1], "ragged: token 1 after 1 accepted")
    rows_with_drafts = int((num_draft_tokens >= 1).sum())
    assert_binomial(
        int(reached_second.sum()), rows_with_drafts, np.minimum(TARGET[0], DRAFT[0]).sum(), "ragged: acceptances at position 0"
    )


FUSIONS = {
    # EFT-style up-scaling in logit space: p ∝ pa^1.5 · pb^-0.5 at temperature 0.8.
    "logits": dict(inputs="logits", weights=[1.5, -0.5], temperature=0.8),
    # Geometric mean of two probability vectors: p ∝ sqrt(pa · pb).
    "probs": dict(inputs="probs", weights=[0.5, 0.5], temperature=1.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_fused_targets_are_lossless(backend, fusion):
    inputs, weights, temperature = FUSIONS[fusion]["inputs"], FUSIONS[fusion]["weights"], FUSIONS[fusion]["temperature"]
    generator = torch.Generator().manual_seed(6)
    first_scores = torch.randn(NUM_DRAFTS + 1, VOCAB, generator=generator)
    second_scores = torch.randn(NUM_DRAFTS + 1, VOCAB, generator=generator)
    first_scores[0, 2] = first_scores[1, 5] = -float("inf")  # excluded by the positively weighted model
    if inputs == "logits":
        first, second = first_scores, second_scores
        first_probs = softmax(first.double().numpy() / temperature)
        second_probs = softmax(second.double().numpy() / temperature)
    else:
        first, second = first_scores.softmax(-1), second_scores.softmax(-1)
        first_probs, second_probs = first.double().numpy(), second.double().numpy()
    unnormalised = first_probs ** weights[0] * second_probs ** weights[1]
    target = unnormalised / unnormalised.sum(axis=-1, keepdims=True)

    # A draft close to the target, so that enough rows reach the bonus token; it is given in the
    # same kind of input as the targets.
    draft = 0.6 * target[:NUM_DRAFTS] + 0.4 * DRAFT
    draft_input = temperature * log_or_minus_inf(draft) if inputs == "logits" else draft
    draft_tokens = sample_drafts(draft, seed=7)
    tokens, num_emitted, num_accepted = speculative_verify(
        draft_tokens,
        [first.expand(ROWS, -1, -1).contiguous(), second.expand(ROWS, -1, -1).contiguous()],
        per_row(draft_input),
        inputs=inputs,
        target_weights=weights,
        temperature=temperature,
        seed=15,
        return_accepted=True,
        backend=backend,
    )
    first_acceptance = np.minimum(target[0], draft[0]).sum()
    assert_lossless(tokens, num_emitted, num_accepted, target, first_acceptance, f"fused {fusion}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_residual_falls_back_to_the_target(backend):
    # p == q and the draft has zero probability under both: the draft is rejected and
    # max(0, p - q) is zero everywhere, so the emitted token is a sample of p itself.
    distribution = TARGET[:1].repeat(2, axis=0)
    draft_tokens = torch.full((ROWS, 1), int(np.argmin(TARGET[0])))
    tokens, num_emitted = speculative_verify(
        draft_tokens, per_row(distribution), per_row(distribution[:1]), seed=16, backend=backend
    )
    assert bool((num_emitted == 1).all())
    assert_follows(tokens[:, 0], TARGET[0], "empty residual")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unnormalised_probabilities_are_used_as_given(backend):
    # p = TARGET / 2 with q = TARGET: each draft (drawn from q) is accepted with probability
    # min(1, p/q) = 1/2 exactly. Renormalising p would accept every draft.
    draft_tokens = sample_drafts(TARGET[:NUM_DRAFTS], seed=17)
    _, num_emitted, num_accepted = speculative_verify(
        draft_tokens, per_row(TARGET / 2), per_row(TARGET[:NUM_DRAFTS]), seed=18, return_accepted=True, backend=backend
    )
    assert bool((num_emitted == num_accepted + 1).all())
    assert_binomial(int((num_accepted >= 1).sum()), ROWS, 0.5, "halved target: acceptances at position 0")
