"""The compiled CPU speculative_verify kernel against the reference: greedy and invalid rows exactly,
sampling through seeds (determinism, row independence), the op itself through opcheck."""
import pytest
import torch

import collab_ops
from collab_ops import _dispatch
from collab_ops.ops.speculative import speculative_verify
from speculative_kernel_checks import (
    GREEDY_CASES,
    assert_same_as_reference,
    check_invalid_rows_match_reference,
    greedy_case,
    near_tie_target,
)

needs_cpu_kernel = pytest.mark.skipif(
    "cpu" not in collab_ops.available_backends(), reason=str(collab_ops.backend_status()["cpu"])
)
pytestmark = needs_cpu_kernel


def test_cpu_kernel_is_registered_and_picked():
    assert "cpu" in _dispatch.registered_backends("speculative_verify")
    case = greedy_case(2, 2, 9, seed=0)
    implementation = _dispatch.dispatch("speculative_verify", torch.device("cpu"), None, targets=(case["target"],), draft=None)
    assert implementation.backend == "cpu"


@pytest.mark.parametrize("index", range(len(GREEDY_CASES)))
def test_greedy_matches_reference_exactly(index):
    batch, num_drafts, vocab, inputs, dtype, layout, num_targets = GREEDY_CASES[index]
    case = greedy_case(batch, num_drafts, vocab, seed=index, inputs=inputs, dtype=dtype, layout=layout, num_targets=num_targets)
    assert_same_as_reference("cpu", "cpu", case, mode="greedy")


@pytest.mark.parametrize("inputs", ["probs", "logits"])
@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_invalid_rows_match_reference(inputs, mode):
    check_invalid_rows_match_reference("cpu", "cpu", inputs, mode)


def test_fused_target_with_every_token_excluded_is_invalid():
    # Each model keeps half of the vocabulary; fused, nothing is left in row 1 at position 1.
    first, second = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    first[1, 1, :4] = -float("inf")
    second[1, 1, 4:] = -float("inf")
    draft_tokens = torch.zeros(2, 2, dtype=torch.int64)
    for mode in ("greedy", "sample"):
        expected = speculative_verify(draft_tokens, [first, second], inputs="logits", target_weights=[1.0, -0.5], mode=mode, seed=1, backend="reference")
        actual = speculative_verify(draft_tokens, [first, second], inputs="logits", target_weights=[1.0, -0.5], mode=mode, seed=1, backend="cpu")
        assert actual[1][1] == 0 and expected[1][1] == 0
        assert actual[1][0] >= 1


def test_weight_zero_single_target_is_uniform_and_weight_two_sharpens():
    # target_weights=[0] leaves p uniform; [2] squares the target: the greedy argmax is unchanged.
    target = torch.randn(4, 2, 5)
    draft_tokens = torch.zeros(4, 1, dtype=torch.int64)
    for weights in ([0.0], [2.0]):
        case = dict(draft_tokens=draft_tokens, target=target, inputs="logits", target_weights=weights, mode="greedy")
        expected = speculative_verify(**case, return_accepted=True, backend="reference")
        actual = speculative_verify(**case, return_accepted=True, backend="cpu")
        for got, want in zip(actual, expected):
            assert torch.equal(got, want)


def test_same_row_seed_gives_the_same_row_anywhere_in_the_batch():
    generator = torch.Generator().manual_seed(5)
    target = torch.randn(1, 4, 300, generator=generator).expand(16, -1, -1).contiguous()
    draft = torch.randn(1, 3, 300, generator=generator).expand(16, -1, -1).contiguous()
    draft_tokens = torch.randint(0, 300, (1, 3), generator=generator).expand(16, -1).contiguous()
    seeds = torch.full((16,), 1234)
    tokens, _ = speculative_verify(draft_tokens, target, draft, inputs="logits", seed=seeds, backend="cpu")
    assert bool((tokens == tokens[0]).all())
    other, _ = speculative_verify(draft_tokens, target, draft, inputs="logits", seed=torch.arange(16) * 977, backend="cpu")
    assert len({tuple(row) for row in other.tolist()}) > 1, "different row seeds should give different rows"


def test_sampled_acceptance_counts_follow_the_acceptance_rate():
    # One draft per row with known acceptance probability sum(min(p, q)) over a large vocabulary.
    rows, vocab = 4000, 20011
    generator = torch.Generator().manual_seed(6)
    p = torch.rand(vocab, generator=generator) ** 3
    q = torch.rand(vocab, generator=generator) ** 3
    p, q = p / p.sum(), q / q.sum()
    draft_tokens = torch.multinomial(q, rows, replacement=True, generator=generator)[:, None]
    target = torch.stack([p, p])[None].expand(rows, -1, -1)
    _, _, accepted = speculative_verify(draft_tokens, target, q[None, None].expand(rows, -1, -1), seed=3, return_accepted=True, backend="cpu")
    rate = float(torch.minimum(p, q).sum())
    mean = float(accepted.double().mean())
    assert abs(mean - rate) < 5 * (rate * (1 - rate) / rows) ** 0.5, (mean, rate)


def _opcheck_samples():
    generator = torch.Generator().manual_seed(7)
    target = torch.randn(3, 4, 11, generator=generator)
    draft = torch.randn(3, 3, 11, generator=generator)
    draft_tokens = torch.randint(0, 11, (3, 3), generator=generator)
    counts = torch.tensor([3, 1, 0])
    seeds = torch.tensor([1, 2, 3])
    weights = torch.ones(3, 1)
    yield (draft_tokens, [target], weights, draft, counts, True, 0.8, False, seeds)
    yield (draft_tokens, [target.softmax(-1).bfloat16()], weights, None, counts, False, 1.0, True, torch.zeros(3, dtype=torch.int64))
    two = [target, torch.randn(3, 4, 11, generator=generator)]
    yield (draft_tokens, two, torch.tensor([[1.0, -0.5]]).expand(3, 2), draft, counts, True, 1.0, False, seeds)
    # The wrapper's defaults: every row uses all K drafts, one base seed (both CPU scalars).
    yield (draft_tokens, [target.softmax(-1)], torch.ones(1), draft.softmax(-1), torch.tensor(3), False, 1.0, False, torch.tensor(-5))


@pytest.mark.parametrize("index", range(4))
def test_speculative_verify_opcheck(index):
    args = list(_opcheck_samples())[index]
    torch.library.opcheck(torch.ops.collab_ops.speculative_verify.default, args)


def test_compiled_op_ignores_the_temperature_in_greedy_mode():
    # The wrapper passes T = 1 in greedy mode; a direct call of the op with another T must not
    # scale either (l * (1/T) would round this near-tie into a tie that id 0 wins).
    target = near_tie_target(0.7)
    tokens = torch.zeros(1, 0, dtype=torch.int64)
    op = torch.ops.collab_ops.speculative_verify
    result = op(tokens, [target], torch.ones(1, 1), None, torch.tensor(0), True, 0.7, True, torch.tensor(0))
    assert result[0].tolist() == [[1]]


def test_compiled_op_rejects_bad_arguments_with_clear_errors():
    target = torch.rand(2, 3, 5)
    tokens = torch.zeros(2, 2, dtype=torch.int64)
    counts = torch.full((2,), 2)
    seeds = torch.zeros(2, dtype=torch.int64)
    op = torch.ops.collab_ops.speculative_verify
    with pytest.raises(ValueError, match="targets\\[1\\]"):
        op(tokens, [target, torch.rand(2, 3, 6)], torch.ones(2, 2), None, counts, False, 1.0, False, seeds)
    with pytest.raises(TypeError, match="targets\\[0\\]"):
        op(tokens, [target.double()], torch.ones(2, 1), None, counts, False, 1.0, False, seeds)
    with pytest.raises(ValueError, match="seed"):
        op(tokens, [target], torch.ones(2, 1), None, counts, False, 1.0, False, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="temperature"):
        op(tokens, [target], torch.ones(2, 1), None, counts, False, 0.5, False, seeds)


def test_supports_refuses_what_the_kernel_cannot_take():
    from collab_ops.ops.speculative import MAX_KERNEL_TARGETS, _compiled_refusal

    many = tuple(torch.rand(1, 2, 3) for _ in range(MAX_KERNEL_TARGETS + 1))
    assert "at most" in _compiled_refusal(targets=many, draft=None)
    assert "fp32/bf16/fp16" in _compiled_refusal(targets=(torch.rand(1, 2, 3, dtype=torch.float64),), draft=None)
    assert _compiled_refusal(targets=(torch.rand(1, 2, 3),), draft=None) is None


def test_cuda_supports_refuses_a_batch_beyond_its_grid():
    from collab_ops.ops.speculative import MAX_CUDA_GRID_ROWS, _cuda_refusal

    target = (torch.rand(1, 2, 3),)
    too_many_rows = torch.zeros(MAX_CUDA_GRID_ROWS + 1, 1, dtype=torch.int64)
    assert "at most 65535 rows" in _cuda_refusal(draft_tokens=too_many_rows, targets=target, draft=None)
    too_many_drafts = torch.zeros(1, MAX_CUDA_GRID_ROWS, dtype=torch.int64)
    assert "65535 positions" in _cuda_refusal(draft_tokens=too_many_drafts, targets=target, draft=None)
    assert _cuda_refusal(draft_tokens=torch.zeros(MAX_CUDA_GRID_ROWS, 1, dtype=torch.int64), targets=target, draft=None) is None
