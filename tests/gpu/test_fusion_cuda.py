"""CUDA fusion kernels against the float64 reference (skipped without a CUDA device)."""
import pytest
import torch

import collab_ops
from fusion_kernel_checks import (
    check_dynamic_fusion_case,
    check_fusion_case,
    check_undefined_values_poison_rows,
    dynamic_fusion_cases,
    dynamic_fusion_gpu_cases,
    fusion_cases,
    random_logits,
)

CASES = list(fusion_cases())
DYNAMIC_CASES = list(dynamic_fusion_cases())
DYNAMIC_GPU_CASES = list(dynamic_fusion_gpu_cases())


def test_cuda_backend_is_available_on_a_gpu_machine():
    assert collab_ops.backend_status()["cuda"] == "available"


@pytest.mark.parametrize("index", range(len(CASES)))
def test_fuse_logits_cuda_matches_reference(index):
    check_fusion_case("cuda", "cuda", CASES[index], seed=2000 + index)


def test_fuse_logits_undefined_values_poison_rows():
    check_undefined_values_poison_rows("cuda", "cuda")


def test_fuse_logits_default_dispatch_picks_cuda():
    with collab_ops._dispatch.recording() as chosen:
        collab_ops.fuse_logits([torch.randn(2, 11, device="cuda")], [1.0])
    assert [impl.backend for impl in chosen] == ["cuda"]


@pytest.mark.parametrize("index", range(len(DYNAMIC_CASES)))
def test_dynamic_fusion_weights_cuda_matches_reference(index):
    check_dynamic_fusion_case("cuda", "cuda", DYNAMIC_CASES[index], seed=4000 + index)


@pytest.mark.parametrize("index", range(len(DYNAMIC_GPU_CASES)))
def test_dynamic_fusion_weights_cuda_full_vocabulary_matches_reference(index):
    """B=16 x 152064 bf16 with the default 21-point grid, 32- and 1-point grids, up to 4 experts,
    -inf and NaN rows, and outlier tokens ~150 nats apart (tests/fusion_kernel_checks.py)."""
    check_dynamic_fusion_case("cuda", "cuda", DYNAMIC_GPU_CASES[index], seed=4100 + index)


def test_dynamic_fusion_weights_cuda_repeats_bit_for_bit():
    # The chunk partials are folded by whichever block finishes last; the fold order is fixed,
    # and the arrival counters start from zero on every call.
    generator = torch.Generator().manual_seed(4200)
    large, expert, base = (random_logits(16, 152064, torch.bfloat16, "cuda", generator=generator) for _ in range(3))
    first = collab_ops.dynamic_fusion_weights(large, [expert, base], base, backend="cuda")
    for _ in range(3):
        assert torch.equal(collab_ops.dynamic_fusion_weights(large, [expert, base], base, backend="cuda"), first)
    # Expert == base: every candidate's state equals P's bit for bit, all objectives are exactly 0
    # and the first grid entry wins, as in the reference.
    tied = collab_ops.dynamic_fusion_weights(large, [base], base, grid=[0.5, 0.0, 1.0], backend="cuda")
    assert torch.equal(tied, torch.full((16, 1), 0.5, device="cuda"))
