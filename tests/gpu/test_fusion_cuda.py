"""CUDA fusion kernels against the float64 reference (skipped without a CUDA device)."""
import pytest
import torch

import collab_ops
from fusion_kernel_checks import check_dynamic_fusion_case, check_fusion_case, dynamic_fusion_cases, fusion_cases

CASES = list(fusion_cases())
DYNAMIC_CASES = list(dynamic_fusion_cases())


def test_cuda_backend_is_available_on_a_gpu_machine():
    assert collab_ops.backend_status()["cuda"] == "available"


@pytest.mark.parametrize("index", range(len(CASES)))
def test_fuse_logits_cuda_matches_reference(index):
    check_fusion_case("cuda", "cuda", CASES[index], seed=2000 + index)


def test_fuse_logits_default_dispatch_picks_cuda():
    with collab_ops._dispatch.recording() as chosen:
        collab_ops.fuse_logits([torch.randn(2, 11, device="cuda")], [1.0])
    assert [impl.backend for impl in chosen] == ["cuda"]


@pytest.mark.parametrize("index", range(len(DYNAMIC_CASES)))
def test_dynamic_fusion_weights_cuda_matches_reference(index):
    check_dynamic_fusion_case("cuda", "cuda", DYNAMIC_CASES[index], seed=4000 + index)
