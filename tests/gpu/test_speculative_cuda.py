"""CUDA speculative_verify against the reference and the CPU kernel (skipped without a CUDA device)."""
import numpy as np
import pytest
import torch

import collab_ops
from collab_ops.ops.speculative import speculative_verify
from speculative_kernel_checks import GREEDY_CASES, assert_same_as_reference, greedy_case, invalid_row_case, to_device
from test_speculative_stats import DRAFT, NUM_DRAFTS, TARGET, assert_lossless, per_row, sample_drafts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_backend_is_available_and_picked():
    assert collab_ops.backend_status()["cuda"] == "available"
    impl = collab_ops._dispatch.dispatch(
        "speculative_verify", torch.device("cuda"), None, targets=(torch.rand(1, 2, 3, device="cuda"),), draft=None
    )
    assert impl.backend == "cuda"


@pytest.mark.parametrize("index", range(len(GREEDY_CASES)))
def test_greedy_matches_reference_exactly(index):
    batch, num_drafts, vocab, inputs, dtype, layout, num_targets = GREEDY_CASES[index]
    case = greedy_case(batch, num_drafts, vocab, seed=index, inputs=inputs, dtype=dtype, layout=layout, num_targets=num_targets)
    assert_same_as_reference("cuda", "cuda", case, mode="greedy")


def test_greedy_at_qwen_vocabulary_and_one_row():
    # B = 1 cuts each row into many column chunks: the chunk merges must find the same argmax.
    case = greedy_case(1, 5, 152064, seed=11, inputs="logits", dtype=torch.bfloat16, ragged=False)
    assert_same_as_reference("cuda", "cuda", case, mode="greedy")


@pytest.mark.parametrize("inputs", ["probs", "logits"])
@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_invalid_rows_match_reference(inputs, mode):
    case = invalid_row_case(inputs, seed=3)
    seed = torch.arange(10) * 7919
    expected = speculative_verify(**case, mode=mode, seed=seed, return_accepted=True, backend="reference")
    actual = speculative_verify(**to_device(case, "cuda"), mode=mode, seed=seed.cuda(), return_accepted=True, backend="cuda")
    assert torch.equal(actual[1].cpu() == 0, expected[1] == 0)
    if mode == "greedy":
        for got, want in zip(actual, expected):
            assert torch.equal(got.cpu(), want)


def test_sampled_drafts_are_lossless_on_cuda():
    draft_tokens = sample_drafts(DRAFT, seed=1).cuda()
    tokens, num_emitted, num_accepted = speculative_verify(
        draft_tokens, per_row(TARGET).cuda(), per_row(DRAFT).cuda(), seed=11, return_accepted=True, backend="cuda"
    )
    first_acceptance = np.minimum(TARGET[0], DRAFT[0]).sum()
    assert_lossless(tokens.cpu(), num_emitted.cpu(), num_accepted.cpu(), TARGET, first_acceptance, "cuda probs")


def test_one_hot_drafts_are_lossless_on_cuda():
    proposal = 0.7 * np.eye(TARGET.shape[1])[TARGET[:NUM_DRAFTS].argmax(-1)] + 0.3 / TARGET.shape[1]
    draft_tokens = sample_drafts(proposal, seed=4).cuda()
    tokens, num_emitted, num_accepted = speculative_verify(
        draft_tokens, per_row(TARGET).cuda(), None, seed=13, return_accepted=True, backend="cuda"
    )
    first_acceptance = (TARGET[0] * proposal[0]).sum()
    assert_lossless(tokens.cpu(), num_emitted.cpu(), num_accepted.cpu(), TARGET, first_acceptance, "cuda one-hot")


@pytest.mark.parametrize("inputs", ["probs", "logits"])
def test_cpu_and_cuda_draw_the_same_tokens_from_the_same_seeds(inputs):
    # Same Philox uniforms and the same inverse CDF: only rounding of running sums may differ.
    generator = torch.Generator().manual_seed(8)
    target = torch.randn(256, 5, 3001, generator=generator)
    draft = torch.randn(256, 4, 3001, generator=generator)
    if inputs == "probs":
        target, draft = target.softmax(-1), draft.softmax(-1)
    draft_tokens = torch.randint(0, 3001, (256, 4), generator=generator)
    seeds = torch.randint(-(2**62), 2**62, (256,), generator=generator)
    cpu = speculative_verify(draft_tokens, target, draft, inputs=inputs, seed=seeds, backend="cpu")
    gpu = speculative_verify(draft_tokens.cuda(), target.cuda(), draft.cuda(), inputs=inputs, seed=seeds.cuda(), backend="cuda")
    same_rows = (cpu[0] == gpu[0].cpu()).all(-1).float().mean()
    assert same_rows >= 0.99, f"only {float(same_rows):.3f} of rows agree"


def test_seeded_call_is_deterministic_and_rows_independent():
    generator = torch.Generator().manual_seed(9)
    target = torch.randn(64, 6, 5000, generator=generator).cuda()
    draft = torch.randn(64, 5, 5000, generator=generator).cuda()
    draft_tokens = torch.randint(0, 5000, (64, 5), generator=generator).cuda()
    seeds = torch.arange(64, device="cuda") * 104729
    first = speculative_verify(draft_tokens, target, draft, inputs="logits", seed=seeds, backend="cuda")
    again = speculative_verify(draft_tokens, target, draft, inputs="logits", seed=seeds, backend="cuda")
    assert torch.equal(first[0], again[0])
    alone = speculative_verify(draft_tokens[7:8], target[7:8], draft[7:8], inputs="logits", seed=seeds[7:8], backend="cuda")
    assert torch.equal(alone[0][0], first[0][7])


def test_cuda_graph_capture_with_tensor_seed():
    generator = torch.Generator().manual_seed(10)
    target = torch.randn(8, 4, 4001, generator=generator).cuda()
    draft = torch.randn(8, 3, 4001, generator=generator).cuda()
    draft_tokens = torch.randint(0, 4001, (8, 3), generator=generator).cuda()
    seed = torch.zeros(8, dtype=torch.int64, device="cuda")

    def step():
        return speculative_verify(draft_tokens, target, draft, inputs="logits", seed=seed, backend="cuda")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for value in (3, 4):
        seed.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])


def test_opcheck_on_cuda():
    generator = torch.Generator().manual_seed(12)
    target = torch.randn(3, 4, 11, generator=generator).cuda()
    draft = torch.randn(3, 3, 11, generator=generator).cuda()
    args = (
        torch.randint(0, 11, (3, 3), generator=generator).cuda(), [target], torch.ones(3, 1, device="cuda"), draft,
        torch.tensor([3, 1, 0], device="cuda"), True, 0.8, False, torch.tensor([1, 2, 3], device="cuda"),
    )
    torch.library.opcheck(torch.ops.collab_ops.speculative_verify.default, args)
