"""speculative_verify on every backend against the reference and against chains written here.

Greedy verification is deterministic, so backends are compared with the reference token for
token. Sampled verification draws backend-specific random numbers, so here it is checked for the
output layout, determinism under a seed and independence from memory layout and batch
neighbours; its distribution is tested in test_speculative_stats.py.
"""
import numpy as np
import pytest
import torch
from scipy.special import log_softmax

from collab_ops.ops.speculative import speculative_verify
from collab_ops.reference import speculative as reference
from backends import cpu_backends
from speculative_kernel_checks import near_tie_target

BACKENDS = cpu_backends("speculative_verify")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_case(batch, num_drafts, vocab, *, seed, inputs="logits", ragged=True, dtype=torch.float32):
    """Target, draft and drafts sampled from the draft, with −inf (or 0) entries and ragged rows."""
    generator = torch.Generator().manual_seed(seed)
    target = 2 * torch.randn(batch, num_drafts + 1, vocab, generator=generator)
    draft = 2 * torch.randn(batch, num_drafts, vocab, generator=generator)
    if vocab > 1:
        target[:, :, 0] = -float("inf")
        draft[:, :, vocab - 1] = -float("inf")
    draft_tokens = torch.multinomial(draft.softmax(-1).reshape(-1, vocab), 1, generator=generator).reshape(batch, num_drafts)
    num_draft_tokens = (
        torch.randint(0, num_drafts + 1, (batch,), generator=generator)
        if ragged
        else torch.full((batch,), num_drafts)
    )
    if inputs == "probs":
        target, draft = target.softmax(-1), draft.softmax(-1)
    return dict(
        draft_tokens=draft_tokens,
        target=target.to(dtype),
        draft=draft.to(dtype),
        inputs=inputs,
        num_draft_tokens=num_draft_tokens,
    )


def assert_well_formed(tokens, num_emitted, num_accepted, draft_tokens, num_draft_tokens, vocab):
    batch, num_drafts = draft_tokens.shape
    assert tokens.dtype == num_emitted.dtype == num_accepted.dtype == torch.int64
    assert tokens.shape == (batch, num_drafts + 1) and num_emitted.shape == num_accepted.shape == (batch,)
    assert bool((num_emitted == num_accepted + 1).all())
    assert bool((num_accepted >= 0).all()) and bool((num_accepted <= num_draft_tokens).all())
    positions = torch.arange(num_drafts + 1)[None, :]
    accepted = positions < num_accepted[:, None]
    padded_drafts = torch.cat([draft_tokens, torch.full((batch, 1), -1)], dim=1)
    assert torch.equal(tokens[accepted], padded_drafts[accepted]), "accepted positions must repeat the drafts"
    final = tokens.gather(1, num_accepted[:, None]).squeeze(1)
    assert bool(((final >= 0) & (final < vocab)).all()), "the corrected/bonus token must be a vocabulary id"
    assert bool((tokens[positions >= num_emitted[:, None]] == -1).all()), "padding must be -1"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sample", "greedy"])
@pytest.mark.parametrize("batch,num_drafts,vocab", [(257, 5, 33), (9, 1, 7), (5, 0, 11), (3, 4, 1), (0, 3, 5)])
def test_output_layout(backend, mode, batch, num_drafts, vocab):
    case = random_case(batch, num_drafts, vocab, seed=batch + num_drafts + vocab)
    tokens, num_emitted, num_accepted = speculative_verify(
        **case, mode=mode, seed=0, return_accepted=True, backend=backend
    )
    assert_well_formed(tokens, num_emitted, num_accepted, case["draft_tokens"], case["num_draft_tokens"], vocab)


def greedy_chain(draft_tokens, fused_scores, num_draft_tokens):
    """The greedy verification rule, one row and one position at a time."""
    batch, num_drafts = draft_tokens.shape
    tokens = np.full((batch, num_drafts + 1), -1)
    for row in range(batch):
        for position in range(int(num_draft_tokens[row]) + 1):
            best = int(np.argmax(fused_scores[row, position]))
            tokens[row, position] = best
            if position == num_draft_tokens[row] or draft_tokens[row, position] != best:
                break
    return tokens


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [False, True])
def test_greedy_is_the_argmax_chain(backend, fused):
    batch, num_drafts, vocab, temperature = 64, 4, 7, 0.9
    generator = torch.Generator().manual_seed(21)
    targets = [torch.randn(batch, num_drafts + 1, vocab, generator=generator) for _ in range(2 if fused else 1)]
    targets[0][:, :, 3] = -float("inf")
    weights = [1.0, -0.4] if fused else [1.0]
    fused_scores = sum(
        weight * log_softmax(target.double().numpy() / temperature, axis=-1) for weight, target in zip(weights, targets)
    )
    # Mostly the target's own choice, so that rows accept several drafts before a mismatch.
    best = torch.from_numpy(fused_scores[:, :num_drafts].argmax(-1))
    guess = torch.randint(0, vocab, (batch, num_drafts), generator=generator)
    draft_tokens = torch.where(torch.rand(batch, num_drafts, generator=generator) < 0.75, best, guess)
    num_draft_tokens = torch.randint(0, num_drafts + 1, (batch,), generator=generator)

    tokens, num_emitted = speculative_verify(
        draft_tokens,
        targets if fused else targets[0],
        inputs="logits",
        num_draft_tokens=num_draft_tokens,
        target_weights=weights if fused else None,
        temperature=temperature,
        mode="greedy",
        backend=backend,
    )
    expected = greedy_chain(draft_tokens.numpy(), fused_scores, num_draft_tokens.numpy())
    np.testing.assert_array_equal(tokens.numpy(), expected)
    np.testing.assert_array_equal(num_emitted.numpy(), (expected >= 0).sum(1))
    assert int((num_emitted > 1).sum()) > batch // 4, "the case should accept drafts"


def with_margin(case, seed):
    """Make each position's argmax a clear winner, so rounding in any dtype cannot change it."""
    target = case["target"].float()
    batch, positions, vocab = target.shape
    generator = torch.Generator().manual_seed(seed)
    # Column 0 is −inf in random_case, so winners come from the other columns.
    winners = torch.randint(min(1, vocab - 1), vocab, (batch, positions, 1), generator=generator)
    target = target.scatter(-1, winners, 8.0)
    hits = torch.rand(batch, positions - 1, generator=generator) < 0.8
    case["draft_tokens"] = torch.where(hits, winners[:, :-1, 0], case["draft_tokens"])
    case["target"] = target.to(case["target"].dtype)
    return case


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 32000])
def test_greedy_matches_reference(backend, dtype, vocab):
    case = with_margin(random_case(6, 5, vocab, seed=vocab, dtype=dtype), seed=vocab + 1)
    expected = speculative_verify(**case, mode="greedy", return_accepted=True, backend="reference")
    actual = speculative_verify(**case, mode="greedy", return_accepted=True, backend=backend)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sample", "greedy"])
def test_single_token_vocabulary_accepts_everything(backend, mode):
    draft_tokens = torch.zeros(4, 3, dtype=torch.int64)
    tokens, num_emitted = speculative_verify(draft_tokens, torch.ones(4, 4, 1), torch.ones(4, 3, 1), mode=mode, seed=1, backend=backend)
    assert torch.equal(tokens, torch.zeros(4, 4, dtype=torch.int64))
    assert torch.equal(num_emitted, torch.full((4,), 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inputs", ["probs", "logits"])
def test_same_seed_same_tokens(backend, inputs):
    case = random_case(128, 4, 50, seed=31, inputs=inputs)
    first = speculative_verify(**case, seed=7, backend=backend)
    again = speculative_verify(**case, seed=7, backend=backend)
    other = speculative_verify(**case, seed=8, backend=backend)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0]), "a different seed should change some rows"
    as_tensor = speculative_verify(**case, seed=torch.tensor(7), backend=backend)
    assert torch.equal(first[0], as_tensor[0]), "seed=7 and seed=torch.tensor(7) are the same seed"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_seed_follows_torch_manual_seed(backend):
    case = random_case(64, 3, 20, seed=32)
    torch.manual_seed(123)
    first = speculative_verify(**case, backend=backend)
    torch.manual_seed(123)
    again = speculative_verify(**case, backend=backend)
    assert torch.equal(first[0], again[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_tokens_depend_only_on_row_seed(backend):
    case = random_case(96, 4, 40, seed=33)
    row_seeds = torch.randint(-(2**62), 2**62, (96,), generator=torch.Generator().manual_seed(34))
    tokens, num_emitted = speculative_verify(**case, seed=row_seeds, backend=backend)

    order = torch.randperm(96, generator=torch.Generator().manual_seed(35))
    shuffled = {name: value[order] if isinstance(value, torch.Tensor) else value for name, value in case.items()}
    shuffled_tokens, shuffled_emitted = speculative_verify(**shuffled, seed=row_seeds[order], backend=backend)
    assert torch.equal(shuffled_tokens, tokens[order]) and torch.equal(shuffled_emitted, num_emitted[order])

    alone = {name: value[5:6] if isinstance(value, torch.Tensor) else value for name, value in case.items()}
    alone_tokens, _ = speculative_verify(**alone, seed=row_seeds[5:6], backend=backend)
    assert torch.equal(alone_tokens[0], tokens[5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_layout_does_not_change_tokens(backend):
    case = random_case(32, 4, 24, seed=36)
    expected = speculative_verify(**case, seed=9, backend=backend)
    # Vocabulary not innermost, rows strided inside a larger buffer, int32 ids and counts.
    transposed_target = case["target"].transpose(1, 2).contiguous().transpose(1, 2)
    wide_draft = torch.zeros(32, 4, 50)
    wide_draft[:, :, :24] = case["draft"]
    strided = dict(
        case,
        target=transposed_target,
        draft=wide_draft[:, :, :24],
        draft_tokens=case["draft_tokens"].to(torch.int32).t().contiguous().t(),
        num_draft_tokens=case["num_draft_tokens"].to(torch.int32),
    )
    assert not strided["target"].is_contiguous() and not strided["draft"].is_contiguous()
    actual = speculative_verify(**strided, seed=9, backend=backend)
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_half_precision_inputs(backend, dtype):
    case = random_case(40, 3, 17, seed=37, inputs="probs", dtype=dtype)
    tokens, num_emitted, num_accepted = speculative_verify(**case, seed=3, return_accepted=True, backend=backend)
    assert_well_formed(tokens, num_emitted, num_accepted, case["draft_tokens"], case["num_draft_tokens"], 17)
    mixed = dict(case, draft=case["draft"].float())
    tokens, num_emitted, num_accepted = speculative_verify(**mixed, seed=3, return_accepted=True, backend=backend)
    assert_well_formed(tokens, num_emitted, num_accepted, case["draft_tokens"], case["num_draft_tokens"], 17)


def test_reference_follows_its_documented_random_stream():
    case = random_case(50, 4, 9, seed=38, inputs="probs", ragged=False)
    row_seeds = torch.arange(50) * (2**40) + 3  # differ only above bit 32 for some rows
    _, _, num_accepted = speculative_verify(**case, seed=row_seeds, return_accepted=True, backend="reference")
    for row, row_seed in enumerate(row_seeds.tolist()):
        generator = torch.Generator().manual_seed((row_seed ^ (row_seed >> 32)) & 0xFFFF_FFFF)
        uniforms = torch.rand(5, generator=generator, dtype=torch.float64)
        p, q = case["target"][row].double(), case["draft"][row].double()  # used as given
        accepted = 0
        for position, token in enumerate(case["draft_tokens"][row].tolist()):
            if not uniforms[position] * q[position, token] < p[position, token]:
                break
            accepted += 1
        assert int(num_accepted[row]) == accepted, f"row {row}"


def test_reference_fuses_like_fuse_logits():
    generator = torch.Generator().manual_seed(39)
    logits = [torch.randn(3, 2, 8, generator=generator, dtype=torch.float64) for _ in range(3)]
    logits[1][0, 0, 5] = float("nan")  # in a model of weight 0: no effect
    logits[2][1, 1, 2] = -float("inf")  # excludes the token although the model's weight is negative
    weights = torch.tensor([[1.0, 0.0, -0.5]]).expand(3, 3)
    scores = torch.log_softmax(logits[0] / 1.3, -1) - 0.5 * torch.log_softmax(logits[2] / 1.3, -1)
    expected = torch.softmax(scores.masked_fill(logits[2] == -float("inf"), -float("inf")), dim=-1)
    actual = reference.fused_target_probs(logits, weights, True, 1.3)
    torch.testing.assert_close(actual, expected)
    assert actual[1, 1, 2] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_seed_spreads_over_rows_as_documented(backend):
    # An int seed, a 0-dim tensor and the per-row seeds base + b * ROW_SEED_STRIDE are one seed.
    case = random_case(24, 3, 30, seed=40)
    expected = speculative_verify(**case, seed=-12345, backend=backend)
    per_row = torch.tensor(reference.row_seeds(torch.tensor(-12345), 24))
    assert torch.equal(speculative_verify(**case, seed=per_row, backend=backend)[0], expected[0])
    assert torch.equal(speculative_verify(**case, seed=torch.tensor(-12345), backend=backend)[0], expected[0])
    assert len(set(per_row.tolist())) == 24


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sample", "greedy"])
def test_default_num_draft_tokens_is_all_drafts(backend, mode):
    case = random_case(16, 4, 30, seed=41)
    del case["num_draft_tokens"]
    default = speculative_verify(**case, mode=mode, seed=3, return_accepted=True, backend=backend)
    explicit = speculative_verify(**case, mode=mode, seed=3, num_draft_tokens=torch.full((16,), 4), return_accepted=True, backend=backend)
    for got, want in zip(default, explicit):
        assert torch.equal(got, want)


def test_reference_uses_plain_probabilities_as_given():
    # A plain probability target is not renormalised; a fused one is (by its softmax).
    target = torch.tensor([[[0.2, 0.2, 0.1], [0.5, 0.25, 0.25]]])
    weights = torch.tensor([1.0])
    torch.testing.assert_close(reference.target_probs([target], weights, False, 1.0), target.double())
    fused = reference.target_probs([target, target], torch.tensor([0.5, 0.5]), False, 1.0)
    torch.testing.assert_close(fused, (target / target.sum(-1, keepdim=True)).double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inputs", ["probs", "logits"])
def test_unused_draft_rows_are_never_read(backend, inputs):
    # Ragged rows' draft rows past n may hold anything (NaN from uninitialised padding, −inf
    # "masked" logits): the same seed must give the same tokens as with ordinary padding.
    case = random_case(64, 4, 30, seed=36, inputs=inputs)
    unused = torch.arange(4)[None, :] >= case["num_draft_tokens"][:, None]
    assert bool(unused.any()) and bool((~unused).any())
    expected = speculative_verify(**case, seed=9, return_accepted=True, backend=backend)
    for padding in (float("nan"), float("inf"), -float("inf")):
        padded = dict(case, draft=torch.where(unused[..., None], padding, case["draft"]))
        actual = speculative_verify(**padded, seed=9, return_accepted=True, backend=backend)
        for got, want in zip(actual, expected):
            assert torch.equal(got, want), f"padding {padding} changed the output"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", [[1.0], [1.0, 0.5]])
def test_greedy_argmax_ignores_the_temperature(backend, weights):
    # T > 0 never moves the argmax (of one model, or of a fused target: a per-row constant apart,
    # it is the argmax of sum w_k l_k), so a near-tie that l * (1/T) rounds to a tie in float32
    # must still go to the larger logit.
    temperature = 0.7
    target = near_tie_target(temperature)
    targets = [target, torch.zeros_like(target)][: len(weights)]
    tokens, _ = speculative_verify(torch.zeros(1, 0, dtype=torch.int64), targets, inputs="logits", target_weights=weights,
                                   temperature=temperature, mode="greedy", backend=backend)
    assert tokens.tolist() == [[1]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", [[1.0], [1.0, 0.5]])
def test_greedy_ignores_even_an_extreme_temperature(backend, weights):
    # Greedy mode ignores T, the oracle too: dividing by T = 1e20 in float64 would squeeze the
    # logits 0, 1, 0.5 into a tie that softmax rounds to uniform, and argmax would pick id 0.
    target = torch.tensor([[[0.0, 1.0, 0.5], [2.0, 0.0, 1.0]]])
    targets = [target, target][: len(weights)]
    drafts = torch.tensor([[1]])
    for temperature in (1.0, 1e20):
        tokens, emitted = speculative_verify(drafts, targets, inputs="logits", target_weights=weights,
                                             temperature=temperature, mode="greedy", backend=backend)
        assert tokens.tolist() == [[1, 0]] and emitted.tolist() == [2], temperature
