"""The triton backend of fuse_logits and fused_sample against the reference: every fuse_logits
case of the kernel suite, greedy tokens, seeds, rows without a token, the sampled distribution
(chi-square), rows split into many chunks, and the refusal of top_k/top_p. Without a GPU the
kernels run in Triton's interpreter, a few programs per launch, so the sampling tests use few rows
and a small vocabulary."""
import numpy as np
import pytest
import torch

import collab_ops
import fused_sample_checks as checks
from collab_ops import BackendUnavailableError
from collab_ops.ops.fusion import fused_sample
from fusion_kernel_checks import check_fusion_case, check_undefined_values_poison_rows, fusion_cases

if "triton" not in collab_ops.available_backends():
    pytest.skip("triton is not available here (needs CUDA, or TRITON_INTERPRET=1 for CPU tensors)",
                allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSION_CASES = list(fusion_cases())
GREEDY_CASES = list(checks.greedy_cases())


@pytest.mark.parametrize("index", range(len(FUSION_CASES)))
def test_fuse_logits_matches_reference(index):
    check_fusion_case("triton", DEVICE, FUSION_CASES[index], seed=5000 + index)


@pytest.mark.parametrize("index", range(len(GREEDY_CASES)))
def test_greedy_equals_the_reference(index):
    checks.check_greedy_case("triton", DEVICE, GREEDY_CASES[index], seed=6000 + index)


def test_greedy_takes_the_first_of_tied_maxima():
    checks.check_greedy_takes_the_first_of_tied_maxima("triton", DEVICE)


def test_rows_without_a_token():
    checks.check_rows_without_a_token("triton", DEVICE)


def test_undefined_values_poison_rows():
    check_undefined_values_poison_rows("triton", DEVICE)
    checks.check_undefined_values_give_no_token("triton", DEVICE)


def test_seeds_repeat_and_key_each_row():
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(8, 40, generator=g).to(DEVICE), torch.randn(8, 40, generator=g).to(DEVICE, torch.bfloat16)]
    for options in (dict(), dict(temperature=0.7, min_p=0.01)):
        def run(seed):
            return fused_sample(logits, [1.0, -0.5], seed=seed, backend="triton", **options)

        first = run(11)
        assert torch.equal(first, run(11)) and torch.equal(first, run(torch.tensor(11, device=DEVICE)))
        assert not torch.equal(first, run(12))
        per_row = torch.arange(8, device=DEVICE) * 1009 + 5
        by_row = run(per_row)
        assert not torch.equal(by_row, run(per_row + 1))
        order = torch.randperm(8, generator=g).to(DEVICE)
        assert torch.equal(fused_sample([l[order] for l in logits], [1.0, -0.5], seed=per_row[order], backend="triton",
                                        **options), by_row[order])


def test_sampled_tokens_follow_the_fused_distribution():
    """Chi-square against the reference's exact distribution: CD-style weights, an excluded token
    in each model, the plausibility mask, temperature and min_p."""
    draws = 500 if DEVICE == "cpu" else 50_000  # the interpreter runs ~30 ms per row
    g = torch.Generator().manual_seed(0)
    expert, amateur = torch.randn(1, 6, generator=g) * 1.5, torch.randn(1, 6, generator=g)
    expert[0, 5], amateur[0, 4] = -float("inf"), -float("inf")
    fusion = dict(weights=[1.0, -0.5], temperatures=[1.0, 1.5], plausibility_alpha=0.05, temperature=0.8, min_p=0.05)
    from collab_ops.reference import fusion as reference

    scores = reference.fused_scores([expert.double(), amateur.double()], torch.tensor(fusion["weights"]),
                                    fusion["temperatures"], True, 0.05, 0, 6)[0] / 0.8
    probs = torch.softmax(scores, -1)
    probs = torch.where(probs >= 0.05 * probs.max(), probs, 0.0)
    probs = (probs / probs.sum()).numpy()
    tokens = fused_sample([expert.expand(draws, -1).to(DEVICE), amateur.expand(draws, -1).to(DEVICE)], seed=7,
                          backend="triton", **fusion)
    counts = np.bincount(tokens.cpu().numpy(), minlength=6)
    support = probs > 0
    assert counts[~support].sum() == 0, counts
    expected = probs[support] * draws
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    from scipy.stats import chi2

    assert statistic < chi2.ppf(1 - 1e-4, support.sum() - 1), (counts, expected)


def use_chunk_layout(monkeypatch, *, block, programs, merge_step):
    """Make the triton fusion launches split rows into chunks of `block` columns until the batch has
    `programs` programs (0: one chunk per row), on the GPU as in the interpreter, merging
    `merge_step` chunk partials per step."""
    from collab_ops.triton import fusion as triton_fusion

    for name, value in (("GPU_MAX_BLOCK", block), ("INTERPRETER_MAX_BLOCK", block), ("PROGRAMS_PER_SM", programs),
                        ("INTERPRETER_PROGRAMS", programs), ("MERGE_STEP", merge_step)):
        monkeypatch.setattr(triton_fusion, name, value)
    return triton_fusion


def chunked_rows_inputs():
    """5 rows of 203 columns from 3 models of mixed dtypes with excluded tokens; row 1 has a NaN,
    row 2 excludes every token, row 3 holds +inf, row 4 has equal maxima in different chunks."""
    g = torch.Generator().manual_seed(21)
    logits = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(5, 203, generator=g) * 2
        x[torch.rand(5, 203, generator=g) < 0.1] = -float("inf")
        x[4] = 0.0
        x[4, [40, 180]] = 5.0
        logits.append(x.to(DEVICE, dtype))
    logits[0][1, 5] = float("nan")
    logits[1][2] = -float("inf")
    logits[2][3, 7] = float("inf")
    return logits, [1.0, -0.5, 0.25]


SAMPLING_OPTIONS = [
    dict(greedy=True),
    dict(seed=11),
    dict(seed="per row"),
    dict(seed=5, temperature=0.6, min_p=0.05),
    dict(seed=5, plausibility_alpha=0.2, plausibility_ref=1, min_p=0.1, normalize=False),
]


@pytest.mark.parametrize("index", range(len(SAMPLING_OPTIONS)))
def test_splitting_rows_into_chunks_changes_no_token(monkeypatch, index):
    """The same tokens with one chunk per row and with 13 chunks of 16 columns merged 4 a step: the
    noise is keyed by column, maxima merge exactly and ties go to the lower column across chunks."""
    logits, weights = chunked_rows_inputs()
    options = dict(SAMPLING_OPTIONS[index])
    if options.get("seed") == "per row":
        options["seed"] = torch.arange(5, device=DEVICE) * 7 + 3

    triton_fusion = use_chunk_layout(monkeypatch, block=16, programs=0, merge_step=128)
    assert triton_fusion._chunk_layout(5, 203, 16, torch.device(DEVICE)) == (1, 208)
    whole_rows = fused_sample(logits, weights, backend="triton", **options)
    use_chunk_layout(monkeypatch, block=16, programs=10_000, merge_step=4)
    assert triton_fusion._chunk_layout(5, 203, 16, torch.device(DEVICE)) == (13, 16)
    chunked = fused_sample(logits, weights, backend="triton", **options)

    assert torch.equal(chunked, whole_rows), (chunked.tolist(), whole_rows.tolist())
    # (row 3's +inf is a token only where the plausibility cut keeps its column)
    assert chunked[1:3].tolist() == [-1, -1] and chunked[0] >= 0 and chunked[4] >= 0
    if options.get("greedy"):
        assert chunked[4] == 40
        assert torch.equal(chunked.cpu(), fused_sample(logits, weights, backend="reference", **options).cpu())


@pytest.mark.parametrize("options", [dict(), dict(output="logits"), dict(plausibility_alpha=0.2, normalize=False),
                                     dict(temperatures=[1.0, 1.3, 0.8], plausibility_alpha=0.1, plausibility_ref=2)])
def test_fuse_logits_of_rows_split_into_chunks_matches_reference(monkeypatch, options):
    """Log-sum-exps merged from 13 chunk states (4 a step), and poisoned rows found in any chunk."""
    from collab_ops import fuse_logits
    from tolerance import assert_close_to_reference

    use_chunk_layout(monkeypatch, block=16, programs=10_000, merge_step=4)
    logits, weights = chunked_rows_inputs()
    result = fuse_logits(logits, weights, backend="triton", **options)
    exact = fuse_logits([t.double() for t in logits], weights, backend="reference", **options)
    working = fuse_logits(logits, weights, backend="reference", **options)
    assert_close_to_reference(result, exact, working, what=f"chunked fuse_logits {options}")


def test_top_k_and_top_p_are_refused_with_the_reason():
    logits = [torch.randn(2, 5, device=DEVICE)]
    for options in (dict(top_k=2), dict(top_p=0.5)):
        with pytest.raises(BackendUnavailableError, match="top_k/top_p"):
            fused_sample(logits, [1.0], seed=0, backend="triton", **options)


def test_more_than_eight_models_and_float64_are_refused_with_the_reason():
    from collab_ops import fuse_logits

    with pytest.raises(BackendUnavailableError, match="at most 8 models"):
        fuse_logits([torch.randn(2, 5, device=DEVICE)] * 9, [1.0] * 9, backend="triton")
    with pytest.raises(BackendUnavailableError, match="fp32/bf16/fp16"):
        fuse_logits([torch.randn(2, 5, dtype=torch.float64, device=DEVICE)], [1.0], backend="triton")


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_a_warm_step_is_capturable_in_a_cuda_graph():
    """After a first call has built the small device tables, a sampling step copies nothing from
    the host and synchronises nothing: it replays from a CUDA graph with a tensor seed."""
    logits = [torch.randn(4, 1000, device=DEVICE).bfloat16() for _ in range(3)]
    seed = torch.tensor(5, device=DEVICE)
    expected = fused_sample(logits, [1.0, 1.0, -1.0], seed=seed, backend="triton")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = fused_sample(logits, [1.0, 1.0, -1.0], seed=seed, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(tokens, expected)
