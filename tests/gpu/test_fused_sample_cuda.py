"""The CUDA fused_sample kernels (skipped without a CUDA device): the CPU kernel checks, chi-square
goodness of fit, identical tokens to the CPU kernel for the same seed, torch.compile and CUDA graphs."""
import numpy as np
import pytest
import torch

import fused_sample_checks as checks
import test_fusion_sampling_stats as stats
from collab_ops.ops.fusion import fused_sample

CASES = list(checks.greedy_cases())


@pytest.mark.parametrize("index", range(len(CASES)))
def test_greedy_equals_the_reference(index):
    checks.check_greedy_case("cuda", "cuda", CASES[index], seed=300 + index)


def test_greedy_takes_the_first_of_tied_maxima():
    checks.check_greedy_takes_the_first_of_tied_maxima("cuda", "cuda")


def test_seeds():
    checks.check_seeds("cuda", "cuda")


def test_skipping_never_changes_the_token():
    checks.check_skipping_never_changes_the_token("cuda", "cuda")


def test_kept_sets_include_ties():
    checks.check_kept_sets_include_ties("cuda", "cuda")


def test_rows_without_a_token():
    checks.check_rows_without_a_token("cuda", "cuda")


def test_undefined_values_give_no_token():
    checks.check_undefined_values_give_no_token("cuda", "cuda")


def test_an_empty_batch():
    checks.check_an_empty_batch("cuda", "cuda")


@pytest.mark.parametrize("case", range(3))
def test_opcheck(case):
    args = list(checks.opcheck_samples("cuda"))[case]
    torch.library.opcheck(torch.ops.collab_ops.fused_sample.default, args)


@pytest.mark.parametrize("config", range(len(stats.CONFIGS)))
def test_sampler_matches_exact_distribution(config):
    options = stats.CONFIGS[config]
    models = stats.model_pair()
    expanded = [m.expand(stats.DRAWS, stats.VOCAB).cuda() for m in models]
    tokens = fused_sample(expanded, **stats.FUSION, **options, seed=5000 + config, backend="cuda").cpu()
    stats.assert_fits(np.bincount(tokens.numpy(), minlength=stats.VOCAB), stats.exact_distribution(models, **options))


@pytest.mark.parametrize("options", checks.SAME_DRAW_OPTIONS)
def test_cpu_and_cuda_kernels_draw_the_same_tokens(options):
    logits, weights, seeds = checks.same_draw_inputs(8, 152064)
    for seed in seeds:
        cpu = fused_sample(logits, weights, seed=seed, backend="cpu", **options)
        gpu = fused_sample([l.cuda() for l in logits], weights, seed=seed.cuda(), backend="cuda", **options)
        assert torch.equal(cpu, gpu.cpu()), (options, cpu.tolist(), gpu.tolist())


def test_torch_compile_calls_the_kernel():
    logits = [torch.randn(4, 1000, device="cuda"), torch.randn(4, 1000, device="cuda", dtype=torch.bfloat16)]
    seed = torch.tensor(9, device="cuda")

    def step(a, b, seed):
        return fused_sample([a, b], [1.0, -0.5], top_k=20, seed=seed, backend="cuda")

    compiled = torch.compile(step, fullgraph=False)
    assert torch.equal(compiled(*logits, seed), step(*logits, seed))


def test_cuda_graph_capture_with_a_tensor_seed():
    logits = [torch.randn(4, 152064, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    seed = torch.tensor(1, device="cuda")
    run = lambda: fused_sample(logits, [1.0, 1.0, -1.0], top_p=0.9, seed=seed, backend="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = run()
    for value in (1, 2):
        seed.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(tokens, run())
