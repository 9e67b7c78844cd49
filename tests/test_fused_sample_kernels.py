"""The compiled fused_sample kernel on the CPU against the reference (exact greedy tokens, kept
sets, seeds, rows without a token, strict mode, opcheck)."""
import pytest
import torch

import collab_ops
import fused_sample_checks as checks
from collab_ops.ops.fusion import fused_sample
from backends import cpu_backends

BACKENDS = cpu_backends("fused_sample", candidates=("cpu",))
CASES = list(checks.greedy_cases())


def test_the_cpu_kernel_is_tested_when_the_extension_is_built():
    if "cpu" in collab_ops.available_backends():
        assert BACKENDS == ["cpu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", range(len(CASES)))
def test_greedy_equals_the_reference(backend, index):
    checks.check_greedy_case(backend, "cpu", CASES[index], seed=100 + index)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_takes_the_first_of_tied_maxima(backend):
    checks.check_greedy_takes_the_first_of_tied_maxima(backend, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds(backend):
    checks.check_seeds(backend, "cpu")


def test_the_philox_oracle_matches_known_answers():
    checks.check_philox_oracle_matches_known_answers()


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipping_never_changes_the_token(backend):
    checks.check_skipping_never_changes_the_token(backend, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_sets_include_ties(backend):
    checks.check_kept_sets_include_ties(backend, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_a_token(backend):
    checks.check_rows_without_a_token(backend, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_undefined_values_give_no_token(backend):
    checks.check_undefined_values_give_no_token(backend, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_batch(backend):
    checks.check_an_empty_batch(backend, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strict_raises(backend):
    logits = torch.randn(3, 6)
    logits[1] = -float("inf")
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        fused_sample([logits], [1.0], seed=0, strict=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_kernel_refuses_sampling_without_a_seed(backend):
    logits = [torch.randn(2, 5)]
    with pytest.raises(ValueError, match="seed"):
        torch.ops.collab_ops.fused_sample(logits, torch.ones(2, 1), [1.0], True, None, 0, 5, 1.0, 0, 1.0, 0.0, False, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(3))
def test_opcheck(backend, case):
    args = list(checks.opcheck_samples("cpu"))[case]
    torch.library.opcheck(torch.ops.collab_ops.fused_sample.default, args)
