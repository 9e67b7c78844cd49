"""collab_ops.hf processors inside `generate`, against a naive loop that reruns every model on the
full sequence without caches and fuses with the formulas written out here (dynamic fusion's α
search: the brute-force NumPy oracle of tests/fusion_oracle.py)."""
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from collab_ops.hf import (  # noqa: E402
    CollaborativeLogitsProcessor,
    ContrastiveDecodingLogitsProcessor,
    DynamicFusionLogitsProcessor,
    EFTLogitsProcessor,
    ProxyTuningLogitsProcessor,
)

from fusion_oracle import dynamic_weights  # noqa: E402
from tiny_models import VOCAB, tiny_llama  # noqa: E402

NEW_TOKENS = 6
# Randomly initialised tiny models give near-uniform next-token distributions (logit std ~0.1):
# no token falls outside contrastive decoding's plausibility set and every dynamic-fusion row
# picks α = 1. Scaling the LM head spreads the logits (std ~1) so that both are exercised.
LM_HEAD_SCALE = 10.0
DEFAULT_GRID = [i / 10 for i in range(21)]


def sharpened(model):
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    return model


def last_logits(model, ids, mask):
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1].float()


def weighted_logprobs(logits, weights, temperatures=None):
    temperatures = temperatures or [1.0] * len(logits)
    return sum(w * torch.log_softmax(l / t, dim=-1) for w, l, t in zip(weights, logits, temperatures))


def expert_plausible(expert_logits, alpha):
    p = torch.softmax(expert_logits, dim=-1)
    return p >= alpha * p.max(dim=-1, keepdim=True).values


def li_contrastive(logits, alpha, amateur_temperature=1.0):
    expert, amateur = logits
    score = torch.log_softmax(expert, dim=-1) - torch.log_softmax(amateur / amateur_temperature, dim=-1)
    return score.masked_fill(~expert_plausible(expert, alpha), float("-inf"))


def obrien_lewis_contrastive(logits, alpha, beta):
    expert, amateur = logits
    score = (1 + beta) * expert - beta * amateur
    return score.masked_fill(~expert_plausible(expert, alpha), float("-inf"))


def dynamic_fusion(logits, grid):
    large, *experts, base = logits
    alpha = torch.from_numpy(dynamic_weights(large, experts, base, grid)).float()
    return large + sum(alpha[:, t : t + 1] * (expert - base) for t, expert in enumerate(experts))


def aligned(logits):
    """Every model's logits cut to the narrowest vocabulary (models share a tokenizer)."""
    width = min(l.shape[-1] for l in logits)
    return [l[:, :width] for l in logits]


def naive_scores(models, score, ids, mask):
    return score(aligned([last_logits(m, ids, mask) for m in models]))


@torch.no_grad()
def naive_greedy(models, score, ids, mask):
    for _ in range(NEW_TOKENS):
        fused = naive_scores(models, score, ids, mask)
        ids = torch.cat([ids, fused.argmax(-1, keepdim=True)], dim=-1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
    return ids


def generate(main, processor, ids, mask, **options):
    options = {"do_sample": False, **options}
    return main.generate(
        ids,
        attention_mask=mask,
        logits_processor=LogitsProcessorList([processor]),
        max_new_tokens=NEW_TOKENS,
        **options,
    )


def greedy_generate(main, processor, ids, mask):
    return generate(main, processor, ids, mask)


def left_padded_prompts():
    torch.manual_seed(7)
    long_prompt = torch.randint(1, VOCAB, (1, 7))
    short_prompt = torch.randint(1, VOCAB, (1, 4))
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    ids[0], mask[0] = long_prompt[0], 1
    ids[1, 3:], mask[1, 3:] = short_prompt[0], 1
    return ids, mask, [long_prompt, short_prompt]


@dataclass
class Preset:
    """A processor built from auxiliary models (in the order `score` receives them after the
    main model's logits) and its formula."""

    build: Callable  # (auxiliary models, attention_mask, **constructor options) -> processor
    num_auxiliary: int
    score: Callable  # [main logits, *auxiliary logits] -> fused scores


PRESETS = {
    "contrastive_li": Preset(
        lambda aux, mask, **options: ContrastiveDecodingLogitsProcessor(
            aux[0], alpha=0.1, attention_mask=mask, **options
        ),
        1,
        lambda logits: li_contrastive(logits, 0.1),
    ),
    "contrastive_li_amateur_temperature": Preset(
        lambda aux, mask, **options: ContrastiveDecodingLogitsProcessor(
            aux[0], alpha=0.2, amateur_temperature=0.5, attention_mask=mask, **options
        ),
        1,
        lambda logits: li_contrastive(logits, 0.2, amateur_temperature=0.5),
    ),
    "contrastive_obrien_lewis": Preset(
        lambda aux, mask, **options: ContrastiveDecodingLogitsProcessor(
            aux[0], alpha=0.1, beta=0.5, attention_mask=mask, **options
        ),
        1,
        lambda logits: obrien_lewis_contrastive(logits, 0.1, 0.5),
    ),
    "proxy_tuning": Preset(
        lambda aux, mask, **options: ProxyTuningLogitsProcessor(
            aux[0], aux[1], alpha=0.8, attention_mask=mask, **options
        ),
        2,
        lambda logits: weighted_logprobs(logits, [1.0, 0.8, -0.8]),
    ),
    "eft": Preset(
        lambda aux, mask, **options: EFTLogitsProcessor(aux[0], aux[1], beta=1.5, attention_mask=mask, **options),
        2,
        lambda logits: weighted_logprobs(logits, [1.0, 1.5, -1.5]),
    ),
    "dynamic_fusion_one_expert": Preset(
        lambda aux, mask, **options: DynamicFusionLogitsProcessor(aux[0], aux[1], attention_mask=mask, **options),
        2,
        lambda logits: dynamic_fusion(logits, DEFAULT_GRID),
    ),
    "dynamic_fusion_two_experts": Preset(
        lambda aux, mask, **options: DynamicFusionLogitsProcessor(
            [aux[0], aux[1]], aux[2], grid=[0.0, 0.5, 1.0, 1.5], attention_mask=mask, **options
        ),
        3,
        lambda logits: dynamic_fusion(logits, [0.0, 0.5, 1.0, 1.5]),
    ),
}


@pytest.fixture(scope="module")
def models():
    return tiny_llama(0), tiny_llama(1), tiny_llama(2)


@pytest.fixture(scope="module")
def sharp_models():
    """Main model first, then enough auxiliary models for every preset."""
    return [sharpened(tiny_llama(seed)) for seed in (10, 11, 12, 13)]


@pytest.fixture(scope="module")
def wide_model():
    """An auxiliary model whose embeddings are padded 16 columns beyond the shared vocabulary."""
    return sharpened(tiny_llama(14, vocab_size=VOCAB + 16))


class Recorder(LogitsProcessor):
    """Runs a processor and keeps every step's input_ids and returned scores."""

    def __init__(self, processor):
        self.processor = processor
        self.steps = []

    def __call__(self, input_ids, scores):
        fused = self.processor(input_ids, scores)
        self.steps.append((input_ids.clone(), fused.clone()))
        return fused


def assert_every_step_follows_formula(recorder, models, score, prompt_mask):
    """Each recorded step's scores equal `score` of the models rerun on that step's rows; the
    mask is the prompt's, extended by one unpadded column per generated token."""
    with torch.no_grad():
        for step_ids, fused in recorder.steps:
            generated = step_ids.shape[1] - prompt_mask.shape[1]
            step_mask = torch.cat([prompt_mask, prompt_mask.new_ones(prompt_mask.shape[0], generated)], dim=-1)
            expected = naive_scores(models, score, step_ids, step_mask)
            excluded = torch.isneginf(expected)
            assert torch.equal(torch.isneginf(fused[:, : expected.shape[1]]), excluded)
            torch.testing.assert_close(fused[:, : expected.shape[1]][~excluded], expected[~excluded], rtol=1e-4, atol=1e-4)


# --- the presets, each against its formula --------------------------------------------------


def assert_greedy_matches_naive_loop(preset, main, aux):
    ids, mask, _ = left_padded_prompts()
    recorder = Recorder(preset.build(aux, mask))
    generated = greedy_generate(main, recorder, ids, mask)
    expected = naive_greedy([main, *aux], preset.score, ids, mask)
    assert torch.equal(generated, expected)
    # Greedy tokens alone miss errors that keep the argmax (a per-row offset, a slightly wrong α).
    assert_every_step_follows_formula(recorder, [main, *aux], preset.score, mask)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_greedy_matches_naive_loop_on_left_padded_batch(sharp_models, name):
    preset = PRESETS[name]
    assert_greedy_matches_naive_loop(preset, sharp_models[0], sharp_models[1 : 1 + preset.num_auxiliary])


@pytest.mark.parametrize("name", PRESETS)
def test_preset_with_padded_vocabulary_auxiliary_matches_naive_loop(sharp_models, wide_model, name):
    preset = PRESETS[name]
    assert_greedy_matches_naive_loop(preset, sharp_models[0], [wide_model, *sharp_models[2 : 1 + preset.num_auxiliary]])


@pytest.mark.parametrize("name", PRESETS)
def test_preset_left_padded_batch_equals_prompts_one_by_one(sharp_models, name):
    preset = PRESETS[name]
    main, aux = sharp_models[0], sharp_models[1 : 1 + preset.num_auxiliary]
    ids, mask, prompts = left_padded_prompts()
    batched = greedy_generate(main, preset.build(aux, mask), ids, mask)
    for row, prompt in enumerate(prompts):
        alone = greedy_generate(main, preset.build(aux, None), prompt, None)
        assert torch.equal(batched[row, -alone.shape[1] :], alone[0])


@pytest.mark.parametrize("name", PRESETS)
def test_preset_sampling_with_a_seed_is_repeatable(sharp_models, name):
    preset = PRESETS[name]
    main, aux = sharp_models[0], sharp_models[1 : 1 + preset.num_auxiliary]
    ids, mask, _ = left_padded_prompts()

    def sample(seed):
        torch.manual_seed(seed)
        return generate(main, preset.build(aux, mask), ids, mask, do_sample=True)

    first = sample(1234)
    assert torch.equal(sample(1234), first)
    others = [sample(seed) for seed in (1, 2, 3)]
    assert any(not torch.equal(other, first) for other in others), "the seed does not change the sample"


@pytest.mark.parametrize("name", ["contrastive_obrien_lewis", "proxy_tuning", "dynamic_fusion_two_experts"])
def test_num_return_sequences_with_sampling_fuses_every_row_correctly(sharp_models, name):
    """Every step of a sampled, left-padded, 3-sequences-per-prompt `generate` returns, row by
    row, the formula applied to the row's own prefix."""
    preset = PRESETS[name]
    main, aux = sharp_models[0], sharp_models[1 : 1 + preset.num_auxiliary]
    ids, mask, _ = left_padded_prompts()
    n = 3
    recorder = Recorder(preset.build(aux, mask.repeat_interleave(n, dim=0)))
    torch.manual_seed(5)
    out = generate(main, recorder, ids, mask, do_sample=True, num_return_sequences=n)
    assert out.shape == (2 * n, ids.shape[1] + NEW_TOKENS)
    assert torch.equal(out[:, : ids.shape[1]], ids.repeat_interleave(n, dim=0))
    assert len(recorder.steps) == NEW_TOKENS
    continuations = {tuple(row.tolist()) for row in out[:n, ids.shape[1] :]}
    assert len(continuations) > 1, "the sampled sequences of one prompt are all equal"
    assert_every_step_follows_formula(recorder, [main, *aux], preset.score, mask.repeat_interleave(n, dim=0))


def test_num_return_sequences_without_a_repeated_mask_names_the_fix(sharp_models):
    main, aux = sharp_models[0], sharp_models[1:3]
    ids, mask, _ = left_padded_prompts()
    processor = PRESETS["proxy_tuning"].build(aux, mask)
    with pytest.raises(ValueError, match="repeat_interleave"):
        generate(main, processor, ids, mask, do_sample=True, num_return_sequences=2)


@pytest.mark.parametrize("name", ["contrastive_li", "eft", "dynamic_fusion_one_expert"])
def test_preset_beam_search_is_refused(sharp_models, name):
    preset = PRESETS[name]
    main, aux = sharp_models[0], sharp_models[1 : 1 + preset.num_auxiliary]
    ids, mask, _ = left_padded_prompts()
    with pytest.raises(ValueError, match="beam search"):
        generate(main, preset.build(aux, mask), ids, mask, num_beams=2)


def test_the_sharpened_models_exercise_the_plausibility_mask_and_varying_alpha(sharp_models):
    """Guards the test set-up: with every token plausible, or with a constant α, the tests above
    would not tell contrastive decoding from a plain difference, or a per-row search from a
    fixed weight."""
    main, expert, base = sharp_models[:3]
    torch.manual_seed(3)
    ids = torch.randint(1, VOCAB, (8, 5))
    with torch.no_grad():
        logits = [m(ids).logits[:, -1] for m in (main, expert, base)]
    assert not expert_plausible(logits[0], 0.1).all()
    assert len(np.unique(dynamic_weights(logits[0], [logits[1]], logits[2], DEFAULT_GRID))) > 1


# --- presets: argument checks -----------------------------------------------------------------


def test_contrastive_decoding_argument_errors(sharp_models):
    amateur = sharp_models[1]
    with pytest.raises(ValueError, match="amateur_temperature"):
        ContrastiveDecodingLogitsProcessor(amateur, beta=0.5, amateur_temperature=0.5)
    with pytest.raises(ValueError, match="alpha"):
        ContrastiveDecodingLogitsProcessor(amateur, alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        ContrastiveDecodingLogitsProcessor(amateur, alpha=1.5, beta=0.5)
    with pytest.raises(TypeError, match="beta"):
        ContrastiveDecodingLogitsProcessor(amateur, beta="0.5")
    with pytest.raises(ValueError, match="amateur_temperature"):
        ContrastiveDecodingLogitsProcessor(amateur, amateur_temperature=0.0)


def test_eft_argument_errors(sharp_models):
    with pytest.raises(TypeError, match="beta"):
        EFTLogitsProcessor(sharp_models[1], sharp_models[2], beta=None)


def test_dynamic_fusion_argument_errors(sharp_models):
    expert, base = sharp_models[1:3]
    with pytest.raises(ValueError, match="experts"):
        DynamicFusionLogitsProcessor([], base)
    with pytest.raises(TypeError, match="base_small"):
        DynamicFusionLogitsProcessor(expert, [base])
    with pytest.raises(ValueError, match="grid"):
        DynamicFusionLogitsProcessor(expert, base, grid=[])
    with pytest.raises(ValueError, match=r"grid\[1\]"):
        DynamicFusionLogitsProcessor(expert, base, grid=[0.0, float("nan")])
    with pytest.raises(TypeError, match="grid"):
        DynamicFusionLogitsProcessor(expert, base, grid="0.5")


def test_dynamic_fusion_grid_tensor_is_used_as_given(sharp_models):
    """A one-point grid is a fixed weight: l_large + α (l_expert − l_base)."""
    main, expert, base = sharp_models[:3]
    ids, mask, _ = left_padded_prompts()
    processor = DynamicFusionLogitsProcessor([expert], base, grid=torch.tensor([0.7]), attention_mask=mask)
    generated = greedy_generate(main, processor, ids, mask)
    expected = naive_greedy(
        [main, expert, base], lambda logits: logits[0] + 0.7 * (logits[1] - logits[2]), ids, mask
    )
    assert torch.equal(generated, expected)


# --- CollaborativeLogitsProcessor: the shared auxiliary-model machinery -----------------------


def test_collaborative_matches_naive_loop_on_left_padded_batch(models):
    main, aux_a, aux_b = models
    ids, mask, _ = left_padded_prompts()
    weights = [1.0, 0.7, -0.4]
    processor = CollaborativeLogitsProcessor([aux_a, aux_b], weights[1:], main_weight=weights[0], attention_mask=mask)
    generated = greedy_generate(main, processor, ids, mask)
    expected = naive_greedy(models, lambda logits: weighted_logprobs(logits, weights), ids, mask)
    assert torch.equal(generated, expected)


def test_left_padded_batch_equals_prompts_one_by_one(models):
    main, aux_a, aux_b = models
    ids, mask, prompts = left_padded_prompts()
    batched = greedy_generate(main, CollaborativeLogitsProcessor([aux_a, aux_b], [0.5, 0.5], attention_mask=mask), ids, mask)
    for row, prompt in enumerate(prompts):
        alone = greedy_generate(main, CollaborativeLogitsProcessor([aux_a, aux_b], [0.5, 0.5]), prompt, None)
        assert torch.equal(batched[row, -alone.shape[1]:], alone[0])


def test_auxiliary_with_padded_vocabulary_is_aligned(models):
    main = models[0]
    wide_aux = tiny_llama(3, vocab_size=VOCAB + 16)
    ids, mask, _ = left_padded_prompts()
    processor = CollaborativeLogitsProcessor([wide_aux], [0.6], attention_mask=mask)
    generated = greedy_generate(main, processor, ids, mask)
    expected = naive_greedy([main, wide_aux], lambda logits: weighted_logprobs(logits, [1.0, 0.6]), ids, mask)
    assert torch.equal(generated, expected)


def test_wider_main_model_gets_minus_inf_beyond_the_shared_vocabulary(models):
    wide_main = tiny_llama(4, vocab_size=VOCAB + 16)
    ids, mask, _ = left_padded_prompts()
    processor = CollaborativeLogitsProcessor([models[1]], [0.6], attention_mask=mask)
    scores = processor(ids, torch.randn(2, VOCAB + 16))
    assert scores.shape == (2, VOCAB + 16)
    assert torch.isneginf(scores[:, VOCAB:]).all() and torch.isfinite(scores[:, :VOCAB]).all()
    generated = greedy_generate(wide_main, CollaborativeLogitsProcessor([models[1]], [0.6], attention_mask=mask), ids, mask)
    assert (generated[:, ids.shape[1]:] < VOCAB).all()


def test_wider_main_model_in_dynamic_fusion_gets_minus_inf_beyond_the_shared_vocabulary(sharp_models):
    ids, mask, _ = left_padded_prompts()
    processor = DynamicFusionLogitsProcessor(sharp_models[1], sharp_models[2], attention_mask=mask)
    scores = processor(ids, torch.randn(2, VOCAB + 16))
    assert scores.shape == (2, VOCAB + 16)
    assert torch.isneginf(scores[:, VOCAB:]).all() and torch.isfinite(scores[:, :VOCAB]).all()


def test_attention_mask_batch_must_match_input_ids(models):
    ids, mask, _ = left_padded_prompts()
    processor = CollaborativeLogitsProcessor([models[1]], [0.5], attention_mask=mask[:1])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        processor(ids, torch.randn(2, VOCAB))


def test_batch_change_between_steps_is_refused(models):
    ids, mask, _ = left_padded_prompts()
    processor = CollaborativeLogitsProcessor([models[1]], [0.5], attention_mask=mask)
    processor(ids, torch.randn(2, VOCAB))
    grown = torch.cat([ids, ids[:, -1:]], dim=-1)
    with pytest.raises(ValueError, match="beam search"):
        processor(grown.repeat(2, 1), torch.randn(4, VOCAB))


def test_beam_search_is_refused(models):
    main, aux, _ = models
    ids, mask, _ = left_padded_prompts()
    processor = CollaborativeLogitsProcessor([aux], [0.5], attention_mask=mask)
    with pytest.raises(ValueError, match="beam search"):
        main.generate(
            ids, attention_mask=mask, logits_processor=LogitsProcessorList([processor]), num_beams=2, max_new_tokens=2
        )


def test_reordered_rows_are_refused_without_a_mask(models):
    """What beam search does between steps; without a prompt mask only the row contents reveal it."""
    ids, _, _ = left_padded_prompts()
    processor = CollaborativeLogitsProcessor([models[1]], [0.5])
    processor(ids, torch.randn(2, VOCAB))
    grown = torch.cat([ids, ids[:, -1:]], dim=-1)
    with pytest.raises(ValueError, match="beam search"):
        processor(grown.flip(0), torch.randn(2, VOCAB))


@pytest.mark.parametrize("name", ["contrastive_li", "proxy_tuning", "dynamic_fusion_one_expert"])
def test_without_the_row_order_check_greedy_still_matches_the_naive_loop(sharp_models, name):
    preset = PRESETS[name]
    aux = sharp_models[1 : 1 + preset.num_auxiliary]
    ids, mask, _ = left_padded_prompts()
    assert preset.build(aux, mask).check_row_order
    recorder = Recorder(preset.build(aux, mask, check_row_order=False))
    generated = greedy_generate(sharp_models[0], recorder, ids, mask)
    assert torch.equal(generated, naive_greedy([sharp_models[0], *aux], preset.score, ids, mask))
    assert_every_step_follows_formula(recorder, [sharp_models[0], *aux], preset.score, mask)


def test_without_the_row_order_check_reordered_rows_pass_unnoticed(models):
    """What check_row_order=False gives up (the batch-size check stays)."""
    ids, mask, _ = left_padded_prompts()
    processor = CollaborativeLogitsProcessor([models[1]], [0.5], check_row_order=False)
    processor(ids, torch.randn(2, VOCAB))
    grown = torch.cat([ids, ids[:, -1:]], dim=-1)
    processor(grown.flip(0), torch.randn(2, VOCAB))
    checked = CollaborativeLogitsProcessor([models[1]], [0.5], attention_mask=mask, check_row_order=False)
    checked(ids, torch.randn(2, VOCAB))
    with pytest.raises(ValueError, match="beam search"):
        checked(grown.repeat(2, 1), torch.randn(4, VOCAB))


def test_steps_past_the_buffers_first_capacity_keep_masks_and_positions_right(models):
    """The mask and position buffers start with 64 columns of room and double: 150 steps later the
    fused scores still equal the formula on the whole sequence."""
    main, aux, _ = models
    ids, mask, _ = left_padded_prompts()
    processor = CollaborativeLogitsProcessor([aux], [-0.5], attention_mask=mask)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for step in range(151):
            if step:
                ids = torch.cat([ids, torch.randint(1, VOCAB, (2, 1), generator=generator)], dim=-1)
                mask = torch.cat([mask, mask.new_ones(2, 1)], dim=-1)
            scores = last_logits(main, ids, mask) if step == 150 else torch.randn(2, VOCAB)
            fused = processor(ids, scores)
    expected = naive_scores([main, aux], lambda logits: weighted_logprobs(logits, [1.0, -0.5]), ids, mask)
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)


def test_reusing_a_processor_for_a_second_prompt_is_refused(models):
    ids, mask, _ = left_padded_prompts()
    processor = CollaborativeLogitsProcessor([models[1]], [0.5], attention_mask=mask)
    processor(ids, torch.randn(2, VOCAB))
    with pytest.raises(ValueError, match="fresh processor"):
        processor(ids, torch.randn(2, VOCAB))


def test_constructor_errors(models):
    aux = models[1]
    with pytest.raises(ValueError, match="2 weights for 1"):
        CollaborativeLogitsProcessor([aux], [0.5, 0.5])
    with pytest.raises(ValueError, match="at least one auxiliary model"):
        CollaborativeLogitsProcessor([], [])
    with pytest.raises(TypeError, match="sequence of models"):
        CollaborativeLogitsProcessor(aux, [0.5])
    with pytest.raises(TypeError, match="output is fixed"):
        CollaborativeLogitsProcessor([aux], [0.5], output="logprobs")
    with pytest.raises(TypeError, match="check_row_order must be a bool"):
        ProxyTuningLogitsProcessor(aux, aux, check_row_order="no")
    # fusion options are checked when the processor is built, not at the first decoding step
    with pytest.raises(TypeError, match="unknown fusion option\\(s\\) \\['plausibilty_alpha'\\]"):
        CollaborativeLogitsProcessor([aux], [0.5], plausibilty_alpha=0.1)
    with pytest.raises(ValueError, match="fusion_options: plausibility_alpha"):
        CollaborativeLogitsProcessor([aux], [0.5], plausibility_alpha=2.0)
    with pytest.raises(ValueError, match="fusion_options: .*temperatures"):
        CollaborativeLogitsProcessor([aux], [0.5], temperatures=[1.0, -1.0])


def test_generating_from_inputs_embeds_is_refused(models):
    processor = CollaborativeLogitsProcessor([models[1]], [0.5])
    with pytest.raises(ValueError, match="give generate the prompt as input_ids"):
        processor(torch.zeros(1, 0, dtype=torch.long), torch.randn(1, VOCAB))


def test_models_on_different_devices_are_refused(models):
    elsewhere = tiny_llama(5).to("meta")
    with pytest.raises(ValueError, match="share one device"):
        CollaborativeLogitsProcessor([models[1], elsewhere], [0.5, 0.5])
    with pytest.raises(ValueError, match="share one device"):
        DynamicFusionLogitsProcessor(models[1], elsewhere)
    ids, mask, _ = left_padded_prompts()
    processor = CollaborativeLogitsProcessor([elsewhere], [0.5], attention_mask=mask)
    with pytest.raises(ValueError, match="input_ids are on cpu"):
        processor(ids, torch.randn(2, VOCAB))


def test_steps_pass_the_auxiliary_models_a_mask_only_for_padded_prompts(models):
    # An all-ones mask makes transformers test it for padding (a host synchronisation per model and
    # step on a GPU); without padding the steps pass none, which attends the same tokens.
    main, aux, _ = models
    masks_seen = []
    forward = aux.forward

    def recording_forward(*args, **kwargs):
        masks_seen.append(kwargs.get("attention_mask"))
        return forward(*args, **kwargs)

    aux.forward = recording_forward
    try:
        ids, padded_mask, _ = left_padded_prompts()
        unpadded_mask = torch.ones_like(ids)
        for mask, expect_masks in ((None, False), (unpadded_mask, False), (padded_mask, True)):
            masks_seen.clear()
            greedy_generate(main, CollaborativeLogitsProcessor([aux], [0.5], attention_mask=mask), ids, mask)
            assert len(masks_seen) == NEW_TOKENS
            steps = masks_seen[1:]
            if expect_masks:
                assert [m.shape[1] for m in steps] == [ids.shape[1] + n for n in range(1, NEW_TOKENS)]
            else:
                assert all(m is None for m in steps)
    finally:
        aux.forward = forward
