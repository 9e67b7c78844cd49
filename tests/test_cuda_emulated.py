"""csrc/cuda's kernels and launchers run on the CPU through the CUDA emulator
(tests/cuda_emulation): the checks of the CUDA test suite that the emulator can afford, so that a
change to a CUDA kernel is exercised in CI and not first on the GPU machine.

The emulated kernels stand in for the "cpu" backend while a test runs (the `emulated` fixture), so
the shared check helpers call them through the public API and compare them with the reference.
fused_sample is compared token for token with the C++ CPU kernel, which draws the same Philox
stream and has its own statistical tests; speculative_verify draws its final token differently
from the CPU kernel, so its losslessness tests run on the emulated kernel too. Every test runs on
an emulated device with few SMs (a row in few chunks) and one with more (many blocks per row, so
the partials and the last block's fold run).
"""
import contextlib
import sys
from pathlib import Path

import pytest
import torch

from collab_ops import _dispatch
from collab_ops.ops.fusion import dynamic_fusion_weights, fused_sample
from collab_ops.ops.speculative import speculative_verify

import fused_sample_checks as sample_checks
import speculative_kernel_checks as speculative_checks
from fusion_kernel_checks import (check_dynamic_fusion_case, check_fusion_case, check_undefined_values_poison_rows,
                                  dynamic_fusion_cases, fusion_cases)

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emulation"))
import emulator_build  # noqa: E402

OPS = ("fuse_logits", "fused_sample", "speculative_verify", "dynamic_fusion_weights")
SMALL_DEVICE = (2, 2)  # SMs, blocks per SM
SPLIT_DEVICE = (16, 4)


@pytest.fixture(scope="module")
def emulator():
    if "cpu" not in _dispatch.registered_backends("fused_sample"):
        pytest.skip("the compiled extension (its argument builders) is not built")
    return emulator_build.load()


@pytest.fixture(params=[SMALL_DEVICE, SPLIT_DEVICE], ids=["few-blocks", "many-blocks"])
def emulated(request, emulator, monkeypatch):
    """The "cpu" backend of every emulated op runs the emulated CUDA kernels."""
    emulator.set_device(*request.param)
    for op in OPS:
        real = _dispatch._REGISTRY[op]["cpu"]
        monkeypatch.setitem(_dispatch._REGISTRY[op], "cpu",
                            _dispatch.Implementation(op, "cpu", getattr(emulator, op), real.supports))
    return emulator


@contextlib.contextmanager
def cpu_kernel(op):
    """Inside the block the "cpu" backend of `op` is the C++ CPU kernel again."""
    kernel = getattr(torch.ops.collab_ops, op)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(_dispatch._REGISTRY[op], "cpu", _dispatch.Implementation(
            op, "cpu", lambda *args, **kwargs: kernel(*args, **kwargs), None))
        yield


# --- fuse_logits and dynamic_fusion_weights ------------------------------------------------------

FUSION_CASES = list(fusion_cases())


@pytest.mark.parametrize("index", range(len(FUSION_CASES)))
def test_fuse_logits_matches_the_reference(emulated, index):
    check_fusion_case("cpu", "cpu", FUSION_CASES[index], seed=2000 + index)


def test_fuse_logits_undefined_values_poison_rows(emulated):
    check_undefined_values_poison_rows("cpu", "cpu")


DYNAMIC_CASES = list(dynamic_fusion_cases())


@pytest.mark.parametrize("index", range(len(DYNAMIC_CASES)))
def test_dynamic_fusion_weights_match_the_reference(emulated, index):
    check_dynamic_fusion_case("cpu", "cpu", DYNAMIC_CASES[index], seed=4000 + index)


def test_launch_plans_follow_the_device_they_run_on(emulator, monkeypatch):
    # The launchers query SM counts and occupancy once per device (csrc/cuda/device_facts.h): a
    # device of another shape must get its own plan, and the first device its old one back.
    monkeypatch.setitem(_dispatch._REGISTRY["dynamic_fusion_weights"], "cpu", _dispatch.Implementation(
        "dynamic_fusion_weights", "cpu", emulator.dynamic_fusion_weights, None))
    monkeypatch.setitem(_dispatch._REGISTRY["speculative_verify"], "cpu", _dispatch.Implementation(
        "speculative_verify", "cpu", emulator.speculative_verify, None))
    generator = torch.Generator().manual_seed(11)
    large, expert, base = (torch.randn(2, 9000, generator=generator) for _ in range(3))
    target = torch.randn(2, 3, 9000, generator=generator).softmax(-1)
    draft_tokens = torch.randint(0, 9000, (2, 2), generator=generator)

    def blocks_per_call():
        counts = []
        for call in (lambda: dynamic_fusion_weights(large, [expert], base, backend="cpu"),
                     lambda: speculative_verify(draft_tokens, target, inputs="probs", seed=1, backend="cpu")):
            before = emulator.blocks_launched()
            call()
            counts.append(emulator.blocks_launched() - before)
        return counts

    emulator.set_device(*SMALL_DEVICE)
    small = blocks_per_call()
    emulator.set_device(*SPLIT_DEVICE)
    split = blocks_per_call()
    emulator.set_device(*SMALL_DEVICE)
    assert all(s < b for s, b in zip(small, split)), (small, split)
    assert blocks_per_call() == small


# --- fused_sample ----------------------------------------------------------------------------------

GREEDY_CASES = list(sample_checks.greedy_cases())


@pytest.mark.parametrize("index", range(len(GREEDY_CASES)))
def test_greedy_sampling_equals_the_reference(emulated, index):
    sample_checks.check_greedy_case("cpu", "cpu", GREEDY_CASES[index], seed=300 + index)


def test_greedy_takes_the_first_of_tied_maxima(emulated):
    sample_checks.check_greedy_takes_the_first_of_tied_maxima("cpu", "cpu")


def test_rows_without_a_token(emulated):
    sample_checks.check_rows_without_a_token("cpu", "cpu")


def test_undefined_values_give_no_token(emulated):
    sample_checks.check_undefined_values_give_no_token("cpu", "cpu")


def test_an_empty_batch(emulated):
    sample_checks.check_an_empty_batch("cpu", "cpu")


def test_kept_sets_include_ties(emulated):
    sample_checks.check_kept_sets_include_ties("cpu", "cpu", rows=400)


def test_skipping_never_changes_the_token(emulated):
    sample_checks.check_skipping_never_changes_the_token("cpu", "cpu", batch=6, vocab=8009)


@pytest.mark.parametrize("options", sample_checks.SAME_DRAW_OPTIONS)
def test_sampled_tokens_equal_the_cpu_kernels(emulated, options):
    logits, weights, seeds = sample_checks.same_draw_inputs(6, 20011)
    for seed in seeds:
        emulated_tokens = fused_sample(logits, weights, seed=seed, backend="cpu", **options)
        with cpu_kernel("fused_sample"):
            cpu_tokens = fused_sample(logits, weights, seed=seed, backend="cpu", **options)
        assert torch.equal(emulated_tokens, cpu_tokens), (options, emulated_tokens.tolist(), cpu_tokens.tolist())


# --- speculative_verify ----------------------------------------------------------------------------

SPECULATIVE_GREEDY = speculative_checks.GREEDY_CASES


@pytest.mark.parametrize("index", range(len(SPECULATIVE_GREEDY)))
def test_speculative_greedy_matches_the_reference(emulated, index):
    batch, num_drafts, vocab, inputs, dtype, layout, num_targets = SPECULATIVE_GREEDY[index]
    case = speculative_checks.greedy_case(batch, num_drafts, vocab, seed=50 + index, inputs=inputs, dtype=dtype,
                                          layout=layout, num_targets=num_targets)
    speculative_checks.assert_same_as_reference("cpu", "cpu", case, mode="greedy")


@pytest.mark.parametrize("inputs", ["probs", "logits"])
def test_speculative_sampling_accepts_as_the_cpu_kernel(emulated, inputs):
    """Acceptance draws the same Philox uniforms on both backends (the final token is drawn
    differently, so it is only checked for form)."""
    case = speculative_checks.acceptance_case(48, inputs)
    tokens, emitted, accepted = speculative_verify(**case, return_accepted=True, backend="cpu")
    with cpu_kernel("speculative_verify"):
        cpu_accepted = speculative_verify(**case, return_accepted=True, backend="cpu")[2]
    speculative_checks.assert_accept_alike(accepted, cpu_accepted)
    # Every emitted token is a drafted one up to the number accepted, then one more, then -1.
    for row in range(48):
        n = int(accepted[row])
        assert int(emitted[row]) == n + 1
        assert torch.equal(tokens[row, :n], case["draft_tokens"][row, :n])
        assert int(tokens[row, n]) >= 0 and bool((tokens[row, n + 1 :] == -1).all())


@pytest.mark.parametrize("inputs", ["probs", "logits"])
@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_speculative_invalid_rows_match_the_reference(emulated, inputs, mode):
    """One bad row per rule (NaN, +inf, negative probability, bad draft id, ...) next to clean rows."""
    speculative_checks.check_invalid_rows_match_reference("cpu", "cpu", inputs, mode)


# The losslessness tests of the CPU suite on the emulated race (20000 rows of a 6-token vocabulary
# each; the probability-input ones, since logits only add the normaliser launch checked above).
STATISTICAL_TESTS = [
    "test_sampled_drafts_with_probabilities_are_lossless",
    "test_drafts_without_probabilities_are_lossless",
    "test_ragged_drafts_are_lossless",
    "test_empty_residual_falls_back_to_the_target",
    "test_unnormalised_probabilities_are_used_as_given",
]


@pytest.mark.parametrize("emulated", [SMALL_DEVICE], indirect=True, ids=["few-blocks"])
@pytest.mark.parametrize("name", STATISTICAL_TESTS)
def test_speculative_sampling_is_lossless(emulated, name):
    import test_speculative_stats as stats

    getattr(stats, name)(backend="cpu")



# The special-value rules (NaN and all-excluded rows, zero weights, plausibility edge cases, vocab
# alignment, layouts) of tests/test_fusion_reference.py, on the emulated kernels.
FUSION_RULE_TESTS = [
    ("test_per_row_weights", {}),
    ("test_negative_weight_times_neg_inf_excludes", {}),
    ("test_zero_weight_model_is_ignored_even_with_nan_and_neg_inf", {}),
    ("test_all_excluded_row_is_neg_inf_and_nan_row_is_nan", {"output": "logprobs"}),
    ("test_all_excluded_row_is_neg_inf_and_nan_row_is_nan", {"output": "logits"}),
    ("test_plausibility_mask_known_answer", {}),
    ("test_plausibility_uses_reference_temperature_and_zero_weight_reference", {}),
    ("test_all_neg_inf_plausibility_reference_leaves_no_plausible_token", {}),
    ("test_nan_in_zero_weight_plausibility_reference_poisons_row", {}),
    ("test_vocab_alignment_small_widths", {}),
    ("test_vocab_alignment_qwen_widths", {}),
    ("test_non_contiguous_inputs", {}),
    ("test_inputs_are_not_modified", {}),
    ("test_dynamic_weights_fp32_choose_a_minimiser", {}),
    ("test_dynamic_weights_known_answers", {}),
    ("test_dynamic_weights_per_expert_independence_and_grid", {}),
    ("test_dynamic_weights_nan_and_neg_inf_rows", {}),
    ("test_dynamic_weights_fuse_as_documented", {}),
]


@pytest.mark.parametrize("name, options", FUSION_RULE_TESTS, ids=[
    f"{name}{'-' + '-'.join(options.values()) if options else ''}" for name, options in FUSION_RULE_TESTS])
def test_fusion_rules(emulated, name, options):
    import test_fusion_reference as rules

    getattr(rules, name)(backend="cpu", **options)
