"""The FlashInfer peer of the speculative benchmark (bench/peers/flashinfer_chain.py) computes what
FlashInfer documents, so that its timings compare like with like. Needs a CUDA device and the
library that bench/peers/build_flashinfer_chain.sh builds; skipped without either."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.peers import flashinfer_chain  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not flashinfer_chain.library_path().is_file(),
                       reason="bench/peers/build_flashinfer_chain.sh has not built the library"),
]

VOCAB = 1000


def one_hot_rows(tokens, vocab=VOCAB):
    """[B, n, vocab] fp32 probabilities, all mass on tokens[b][i]."""
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).float().cuda()


def test_drafts_the_target_agrees_with_are_all_accepted_and_the_bonus_follows():
    drafts = [[5, 7, 9], [1, 2, 3]]
    target = one_hot_rows([[5, 7, 9, 11], [1, 2, 3, 4]])
    tokens, accepted, emitted = flashinfer_chain.chain_speculative_sampling(
        one_hot_rows(drafts), torch.tensor(drafts, dtype=torch.int32).cuda(), target)
    assert tokens.tolist() == [[5, 7, 9, 11], [1, 2, 3, 4]]
    assert accepted.tolist() == [3, 3] and emitted.tolist() == [3, 3]


def test_a_draft_the_target_rules_out_is_replaced_by_the_residual():
    # Row 0 rejects its second draft (p = 0 there); the residual max(0, p - q) is all on token 42.
    drafts = [[5, 7, 9]]
    target = one_hot_rows([[5, 42, 9, 11]])
    tokens, _, emitted = flashinfer_chain.chain_speculative_sampling(
        one_hot_rows(drafts), torch.tensor(drafts, dtype=torch.int32).cuda(), target)
    assert tokens.tolist() == [[5, 42, -1, -1]]
    assert emitted.tolist() == [1]


def test_the_acceptance_rate_at_the_first_position_is_the_overlap():
    # q = (1/2, 1/2), p = (3/4, 1/4) on tokens 0 and 1: draft 0 is always accepted, draft 1 with
    # probability p/q = 1/2 and replaced by token 0 (the residual's only mass) when rejected, so the
    # first position accepts Σ min(p, q) = 3/4 of the drafts.
    rows = 8192
    q = torch.zeros(rows, 1, VOCAB, device="cuda")
    q[:, 0, :2] = 0.5
    p = torch.zeros(rows, 2, VOCAB, device="cuda")
    p[:, :, 0], p[:, :, 1] = 0.75, 0.25
    drafts = torch.arange(rows, device="cuda", dtype=torch.int32).remainder(2).view(rows, 1)
    tokens, _, emitted = flashinfer_chain.chain_speculative_sampling(q, drafts, p)
    first = drafts[:, 0] == 0
    assert (emitted[first] == 1).all()
    rate = emitted[~first].float().mean().item()
    assert abs(rate - 0.5) < 5 * (0.25 / (rows // 2)) ** 0.5
    rejected = ~first & (emitted == 0)
    assert (tokens[rejected, 0] == 0).all() and (tokens[rejected, 1] == -1).all()
