"""collab_ops.hf processors inside `generate`, against a naive loop that reruns every model on the
full sequence without caches and fuses with the formulas written out here."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LogitsProcessorList  # noqa: E402

from collab_ops.hf import (  # noqa: E402
    CollaborativeLogitsProcessor,
    ContrastiveDecodingLogitsProcessor,
    ProxyTuningLogitsProcessor,
)

from tiny_models import VOCAB, tiny_llama  # noqa: E402

NEW_TOKENS = 6


def last_logits(model, ids, mask):
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1].float()


def weighted_logprobs(logits, weights, width):
    return sum(w * torch.log_softmax(l[:, :width], dim=-1) for w, l in zip(weights, logits))


def contrastive_score(logits, alpha):
    expert, amateur = (torch.log_softmax(l, dim=-1) for l in logits)
    plausible = expert >= expert.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(alpha))
    return (expert - amateur).masked_fill(~plausible, float("-inf"))


@torch.no_grad()
def naive_greedy(models, score, ids, mask):
    for _ in range(NEW_TOKENS):
        fused = score([last_logits(m, ids, mask) for m in models])
        ids = torch.cat([ids, fused.argmax(-1, keepdim=True)], dim=-1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
    return ids


def greedy_generate(main, processor, ids, mask):
    return main.generate(
        ids,
        attention_mask=mask,
        logits_processor=LogitsProcessorList([processor]),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
    )


def left_padded_prompts():
    torch.manual_seed(7)
    long_prompt = torch.randint(1, VOCAB, (1, 7))
    short_prompt = torch.randint(1, VOCAB, (1, 4))
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    ids[0], mask[0] = long_prompt[0], 1
    ids[1, 3:], mask[1, 3:] = short_prompt[0], 1
    return ids, mask, [long_prompt, short_prompt]


@pytest.fixture(scope="module")
def models():
    return tiny_llama(0), tiny_llama(1), tiny_llama(2)


def test_collaborative_matches_naive_loop_on_left_padded_batch(models):
    main, aux_a, aux_b = models
    ids, mask, _ = left_padded_prompts()
    weights = [1.0, 0.7, -0.4]
    processor = CollaborativeLogitsProcessor([aux_a, aux_b], weights[1:], main_weight=weights[0], attention_mask=mask)
    generated = greedy_generate(main, processor, ids, mask)
    expected = naive_greedy(models, lambda logits: weighted_logprobs(logits, weights, VOCAB), ids, mask)
    assert torch.equal(generated, expected)


def test_left_padded_batch_equals_prompts_one_by_one(models):
    main, aux_a, aux_b = models
    ids, mask, prompts = left_padded_prompts()
    batched = greedy_generate(main, CollaborativeLogitsProcessor([aux_a, aux_b], [0.5, 0.5], attention_mask=mask), ids, mask)
    for row, prompt in enumerate(prompts):
        alone = greedy_generate(main, CollaborativeLogitsProcessor([aux_a, aux_b], [0.5, 0.5]), prompt, None)
        assert torch.equal(batched[row, -alone.shape[1]:], alone[0])


def test_contrastive_decoding_matches_li_et_al(models):
    main, amateur, _ = models
    ids, mask, _ = left_padded_prompts()
    processor = ContrastiveDecodingLogitsProcessor(amateur, alpha=0.1, attention_mask=mask)
    generated = greedy_generate(main, processor, ids, mask)
    expected = naive_greedy([main, amateur], lambda logits: contrastive_score(logits, 0.1), ids, mask)
    assert torch.equal(generated, expected)


def test_proxy_tuning_matches_formula(models):
    large_base, tuned_small, base_small = models
    ids, mask, _ = left_padded_prompts()
    processor = ProxyTuningLogitsProcessor(tuned_small, base_small, alpha=0.8, attention_mask=mask)
    generated = greedy_generate(large_base, processor, ids, mask)
    expected = naive_greedy(models, lambda logits: weighted_logprobs(logits, [1.0, 0.8, -0.8], VOCAB), ids, mask)
    assert torch.equal(generated, expected)


def test_auxiliary_with_padded_vocabulary_is_aligned(models):
    main = models[0]
    wide_aux = tiny_llama(3, vocab_size=VOCAB + 16)
    ids, mask, _ = left_padded_prompts()
    processor = CollaborativeLogitsProcessor([wide_aux], [0.6], attention_mask=mask)
    generated = greedy_generate(main, processor, ids, mask)
    expected = naive_greedy(
        [main, wide_aux], lambda logits: weighted_logprobs(logits, [1.0, 0.6], VOCAB), ids, mask
    )
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
    with pytest.raises(TypeError, match="sequence of models"):
        CollaborativeLogitsProcessor(aux, [0.5])
    with pytest.raises(TypeError, match="output is fixed"):
        CollaborativeLogitsProcessor([aux], [0.5], output="logprobs")


def test_models_on_different_devices_are_refused(models):
    elsewhere = tiny_llama(5).to("meta")
    with pytest.raises(ValueError, match="share one device"):
        CollaborativeLogitsProcessor([models[1], elsewhere], [0.5, 0.5])
    ids, mask, _ = left_padded_prompts()
    processor = CollaborativeLogitsProcessor([elsewhere], [0.5], attention_mask=mask)
    with pytest.raises(ValueError, match="input_ids are on cpu"):
        processor(ids, torch.randn(2, VOCAB))
