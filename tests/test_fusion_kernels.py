"""Compiled and Triton fusion kernels on the CPU against the float64 reference."""
import pytest

import collab_ops
from fusion_kernel_checks import (check_dynamic_fusion_case, check_fusion_case, check_undefined_values_poison_rows,
                                  dynamic_fusion_cases, fusion_cases)
from backends import cpu_backends

CASES = list(fusion_cases())
DYNAMIC_CASES = list(dynamic_fusion_cases())
CPU_BACKENDS = cpu_backends("fuse_logits", candidates=("cpu",))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("index", range(len(CASES)))
def test_fuse_logits_kernel_matches_reference(backend, index):
    check_fusion_case(backend, "cpu", CASES[index], seed=1000 + index)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_undefined_values_poison_rows(backend):
    check_undefined_values_poison_rows(backend, "cpu")


def test_a_cpu_fusion_kernel_is_tested_when_the_extension_is_built():
    if "cpu" in collab_ops.available_backends():
        assert CPU_BACKENDS == ["cpu"]


DYNAMIC_CPU_BACKENDS = cpu_backends("dynamic_fusion_weights", candidates=("cpu",))


@pytest.mark.parametrize("backend", DYNAMIC_CPU_BACKENDS)
@pytest.mark.parametrize("index", range(len(DYNAMIC_CASES)))
def test_dynamic_fusion_weights_kernel_matches_reference(backend, index):
    check_dynamic_fusion_case(backend, "cpu", DYNAMIC_CASES[index], seed=3000 + index)
