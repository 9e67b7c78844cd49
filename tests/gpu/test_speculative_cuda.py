"""CUDA speculative_verify against the reference and the CPU kernel (skipped without a CUDA device).

The CUDA kernels draw the final token by an exponential race over many blocks, the CPU kernel and
the reference by inverse CDF: sampled tokens are compared by distribution (every statistical test
of test_speculative_stats.py, run on CUDA, and bucketed chi-square tests at the Qwen vocabulary,
B = 1 and B = 64), greedy tokens and invalid rows exactly, acceptance counts through the shared
Philox uniforms.
"""
import numpy as np
import pytest
import torch

import collab_ops
import test_speculative_stats as stats
from collab_ops.ops.speculative import speculative_verify
from collab_ops.reference import speculative as reference
from speculative_kernel_checks import (
    GREEDY_CASES,
    acceptance_case,
    assert_accept_alike,
    assert_same_as_reference,
    check_invalid_rows_match_reference,
    greedy_case,
    to_device,
)
from test_speculative_reference import assert_well_formed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

QWEN_VOCAB = 152064


def on_cuda(*args, backend=None, **kwargs):
    """speculative_verify on the CUDA backend for CPU tensors; results back on the CPU."""
    del backend

    def move(value):
        if isinstance(value, torch.Tensor):
            return value.cuda()
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    outputs = speculative_verify(*[move(a) for a in args], **{k: move(v) for k, v in kwargs.items()}, backend="cuda")
    return tuple(output.cpu() for output in outputs)


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


def with_clear_winner(case):
    """Raise each position's reference argmax in the first target so that no float32-vs-float64
    rounding of a fused score can move it (the drafts, mostly those argmaxes, stay meaningful)."""
    targets = case["target"] if isinstance(case["target"], list) else [case["target"]]
    weights = case["target_weights"]
    best = reference.target_probs(
        targets, torch.ones(1) if weights is None else weights.to(targets[0].device), case["inputs"] == "logits", 1.0
    ).argmax(-1, keepdim=True)
    first = targets[0].float()
    raised = first.gather(-1, best)
    raised = raised * 2 if case["inputs"] == "probs" else raised + 2.0
    targets[0] = first.scatter(-1, best, raised).to(targets[0].dtype)
    case["target"] = targets if len(targets) > 1 else targets[0]
    return case


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("inputs,dtype,num_targets", [("probs", torch.float32, 1), ("logits", torch.bfloat16, 1), ("logits", torch.bfloat16, 2)])
def test_greedy_at_qwen_vocabulary(batch, inputs, dtype, num_targets):
    # B = 1 cuts each row into many column chunks: the chunk merges must find the same argmax.
    # The reference runs on the GPU too (float64), which keeps this test fast.
    case = greedy_case(batch, 5, QWEN_VOCAB, seed=11 + batch, inputs=inputs, dtype=dtype, num_targets=num_targets, ragged=batch > 1)
    case = with_clear_winner(to_device(case, "cuda"))
    expected = speculative_verify(**case, mode="greedy", return_accepted=True, backend="reference")
    actual = speculative_verify(**case, mode="greedy", return_accepted=True, backend="cuda")
    for name, got, want in zip(("tokens", "num_emitted", "num_accepted"), actual, expected):
        assert torch.equal(got, want), f"{name}: got {got.tolist()}, expected {want.tolist()}"
    assert int(actual[2].sum()) > 0, "the case should accept drafts"


@pytest.mark.parametrize("inputs", ["probs", "logits"])
@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_invalid_rows_match_reference(inputs, mode):
    check_invalid_rows_match_reference("cuda", "cuda", inputs, mode)


STATISTICAL_TESTS = [
    name for name in dir(stats) if name.startswith("test_") and callable(getattr(stats, name))
]


@pytest.mark.parametrize("name", STATISTICAL_TESTS)
def test_statistical_tests_pass_on_cuda(name, monkeypatch):
    # Every losslessness test of the CPU suite (probabilities, logits with temperature, one-hot
    # drafts, ragged drafts, fused targets, the empty residual, probabilities used as given).
    monkeypatch.setattr(stats, "speculative_verify", on_cuda)
    test = getattr(stats, name)
    fusions = sorted(stats.FUSIONS) if "fusion" in test.__code__.co_varnames[: test.__code__.co_argcount] else [None]
    for fusion in fusions:
        test(backend="cuda", **({"fusion": fusion} if fusion else {}))


# Heavy ids spread over the vocabulary, so that the race's winners come from different blocks; the
# other ids share the rest of the mass and form one bucket.
HEAVY_IDS = torch.tensor([5, 30011, 60007, 90001, 120011, QWEN_VOCAB - 1])
REST_MASS = 0.05
SAMPLES = 4096


def spread(distributions: np.ndarray) -> torch.Tensor:
    """[positions, 6] bucket distributions -> [positions, QWEN_VOCAB] float64."""
    full = torch.full((distributions.shape[0], QWEN_VOCAB), REST_MASS / (QWEN_VOCAB - len(HEAVY_IDS)), dtype=torch.float64)
    full[:, HEAVY_IDS] = torch.tensor(distributions) * (1 - REST_MASS)
    return full


def buckets(probabilities: torch.Tensor) -> np.ndarray:
    """[..., V] -> [..., 7]: the heavy ids' mass, then the rest."""
    heavy = probabilities[..., HEAVY_IDS]
    return torch.cat([heavy, probabilities.sum(-1, keepdim=True) - heavy.sum(-1, keepdim=True)], -1).numpy()


def bucket_of(tokens: torch.Tensor) -> torch.Tensor:
    lookup = torch.full((QWEN_VOCAB,), len(HEAVY_IDS), dtype=torch.int64)
    lookup[HEAVY_IDS] = torch.arange(len(HEAVY_IDS))
    return lookup[tokens]


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("variant", ["probs fp32", "logits bf16", "fused logits bf16"])
def test_qwen_vocabulary_is_lossless(batch, variant):
    # Per-position target and draft over V = 152064 (shared by the rows), drafts sampled from the
    # draft; the first emitted token must follow p_0, the token after one accepted draft p_1, and
    # the acceptances at position 0 must be Binomial(n, sum min(p_0, q_0)). Expected values come
    # from the reference's p and q of the very inputs (bf16 rounding included).
    target = spread(stats.TARGET)
    draft = spread(0.6 * stats.TARGET[: stats.NUM_DRAFTS] + 0.4 * stats.DRAFT)
    if variant == "probs fp32":
        inputs, weights, dtype = "probs", None, torch.float32
        targets = [target.float()]
        draft_input = draft.float()
    else:
        inputs, dtype = "logits", torch.bfloat16
        if variant == "fused logits bf16":  # p ∝ t^1.5 · t^-0.5 = t
            weights, targets = [1.5, -0.5], [target.log().to(dtype), (target.log() + 1.0).to(dtype)]
        else:
            weights, targets = None, [target.log().to(dtype)]
        draft_input = draft.log().to(dtype)
    p = reference.target_probs([t[None] for t in targets], torch.tensor(weights or [1.0]), inputs == "logits", 1.0)[0]
    q = reference.draft_probs(draft_input[None], torch.zeros(1, stats.NUM_DRAFTS, dtype=torch.int64), QWEN_VOCAB, inputs == "logits", 1.0)[0]

    calls = SAMPLES // batch
    generator = torch.Generator().manual_seed(20 + batch)
    cuda_targets = [t[None].expand(batch, -1, -1).contiguous().cuda() for t in targets]
    cuda_draft = draft_input[None].expand(batch, -1, -1).contiguous().cuda()
    all_drafts = torch.stack([torch.multinomial(q[i], calls * batch, replacement=True, generator=generator) for i in range(stats.NUM_DRAFTS)], 1)
    first, second, accepted_first = [], [], 0
    for call in range(calls):
        draft_tokens = all_drafts[call * batch : (call + 1) * batch]
        tokens, num_emitted, num_accepted = speculative_verify(
            draft_tokens.cuda(), cuda_targets if len(targets) > 1 else cuda_targets[0], cuda_draft, inputs=inputs,
            target_weights=weights, seed=1000 * batch + call, return_accepted=True, backend="cuda",
        )
        tokens, num_emitted, num_accepted = tokens.cpu(), num_emitted.cpu(), num_accepted.cpu()
        assert_well_formed(tokens, num_emitted, num_accepted, draft_tokens, torch.full((batch,), stats.NUM_DRAFTS), QWEN_VOCAB)
        first.append(tokens[:, 0])
        second.append(tokens[num_accepted >= 1, 1])
        accepted_first += int((num_accepted >= 1).sum())
    stats.assert_follows(bucket_of(torch.cat(first)), buckets(p[0]), f"{variant} B={batch}: first token")
    stats.assert_follows(bucket_of(torch.cat(second)), buckets(p[1]), f"{variant} B={batch}: token after one accepted")
    rate = float(torch.minimum(p[0], q[0]).sum())
    stats.assert_binomial(accepted_first, calls * batch, rate, f"{variant} B={batch}: acceptances at position 0")


@pytest.mark.parametrize("inputs", ["probs", "logits"])
def test_cpu_and_cuda_accept_alike_from_the_same_seeds(inputs):
    # The final token is drawn differently, so tokens after the stop are not compared.
    case = acceptance_case(256, inputs)
    cpu = speculative_verify(**case, return_accepted=True, backend="cpu")
    gpu = speculative_verify(**to_device(case, "cuda"), return_accepted=True, backend="cuda")
    assert_accept_alike(gpu[2], cpu[2])


@pytest.mark.parametrize("inputs,dtype", [("probs", torch.float32), ("logits", torch.bfloat16)])
def test_seeded_call_is_deterministic_and_rows_independent(inputs, dtype):
    # At the Qwen vocabulary a row alone (B = 1) is cut into many more chunks than in a batch of
    # 64: the race's winner must not depend on the chunking.
    generator = torch.Generator().manual_seed(9)
    target = torch.randn(64, 6, QWEN_VOCAB, generator=generator)
    draft = torch.randn(64, 5, QWEN_VOCAB, generator=generator)
    if inputs == "probs":
        target, draft = target.softmax(-1), draft.softmax(-1)
    target, draft = target.to(dtype).cuda(), draft.to(dtype).cuda()
    draft_tokens = torch.randint(0, QWEN_VOCAB, (64, 5), generator=generator).cuda()
    num_draft_tokens = torch.randint(0, 6, (64,), generator=generator).cuda()
    seeds = torch.arange(64, device="cuda") * 104729
    options = dict(inputs=inputs, num_draft_tokens=num_draft_tokens, seed=seeds, return_accepted=True, backend="cuda")
    first = speculative_verify(draft_tokens, target, draft, **options)
    again = speculative_verify(draft_tokens, target, draft, **options)
    for got, want in zip(again, first):
        assert torch.equal(got, want)
    assert_well_formed(*(t.cpu() for t in first), draft_tokens.cpu(), num_draft_tokens.cpu(), QWEN_VOCAB)
    for row in (0, 7, 63):
        alone_options = dict(options, num_draft_tokens=num_draft_tokens[row : row + 1], seed=seeds[row : row + 1])
        alone = speculative_verify(draft_tokens[row : row + 1], target[row : row + 1], draft[row : row + 1], **alone_options)
        assert torch.equal(alone[0][0], first[0][row]), f"row {row}"


def test_qwen_vocabulary_invalid_rows_next_to_valid_ones():
    # Probabilities read as given: a NaN at a drafted id and a negative entry in a row without
    # drafts (its stop row) make those rows invalid; a NaN off the drafted ids of a row that
    # certainly accepts is never read.
    generator = torch.Generator().manual_seed(13)
    target = torch.rand(64, 6, QWEN_VOCAB, generator=generator)
    target /= target.sum(-1, keepdim=True)
    draft = target[:, :5].clone()
    draft_tokens = torch.randint(0, QWEN_VOCAB, (64, 5), generator=generator)
    counts = torch.full((64,), 5)
    target[3, 2, draft_tokens[3, 2]] = float("nan")
    counts[10] = 0
    target[10, 0, 777] = -0.25
    target[20, 0, (draft_tokens[20, 0] + 1) % QWEN_VOCAB] = float("nan")  # q = p at x_0: accepted
    tokens, num_emitted, _ = speculative_verify(
        draft_tokens.cuda(), target.cuda(), draft.cuda(), num_draft_tokens=counts.cuda(), seed=5, return_accepted=True, backend="cuda"
    )
    invalid = (num_emitted == 0).cpu()
    assert invalid.nonzero().flatten().tolist() == [3, 10]
    assert bool((tokens[invalid] == -1).all())


@pytest.mark.parametrize("inputs", ["probs", "logits"])
def test_cuda_graph_capture_with_tensor_seed(inputs):
    generator = torch.Generator().manual_seed(10)
    target = torch.randn(8, 4, 4001, generator=generator)
    draft = torch.randn(8, 3, 4001, generator=generator)
    if inputs == "probs":
        target, draft = target.softmax(-1), draft.softmax(-1)
    target, draft = target.cuda(), draft.cuda()
    draft_tokens = torch.randint(0, 4001, (8, 3), generator=generator).cuda()
    seed = torch.zeros((), dtype=torch.int64, device="cuda")

    def step():
        return speculative_verify(draft_tokens, target, draft, inputs=inputs, seed=seed, backend="cuda")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    replays = []
    for value in (3, 4, 3):
        seed.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])
        replays.append(captured[0].clone())
    assert torch.equal(replays[0], replays[2])


def test_opcheck_on_cuda():
    generator = torch.Generator().manual_seed(12)
    target = torch.randn(3, 4, 11, generator=generator).cuda()
    draft = torch.randn(3, 3, 11, generator=generator).cuda()
    draft_tokens = torch.randint(0, 11, (3, 3), generator=generator).cuda()
    per_row = (
        draft_tokens, [target], torch.ones(3, 1, device="cuda"), draft,
        torch.tensor([3, 1, 0], device="cuda"), True, 0.8, False, torch.tensor([1, 2, 3], device="cuda"),
    )
    torch.library.opcheck(torch.ops.collab_ops.speculative_verify.default, per_row)
    # The wrapper's defaults: all K drafts and one base seed as CPU scalars, plain probabilities.
    scalars = (
        draft_tokens, [target.softmax(-1)], torch.ones(1), draft.softmax(-1), torch.tensor(3), False, 1.0, False,
        torch.tensor(-5),
    )
    torch.library.opcheck(torch.ops.collab_ops.speculative_verify.default, scalars)
