"""collab_ops.hf.speculative_generate against the target's own `generate`, a naive uncached loop
for fused targets, and (sampling) the exact target distribution computed by enumeration."""
import itertools

import pytest
import torch

transformers = pytest.importorskip("transformers")
scipy_stats = pytest.importorskip("scipy.stats")

from collab_ops.hf import SpeculativeStats, speculative_generate  # noqa: E402
from tiny_models import VOCAB, pad_batch, tiny_llama  # noqa: E402

NEW_TOKENS = 12


def left_padded(prompts):
    batch = pad_batch([{"input_ids": torch.as_tensor(prompt)} for prompt in prompts], padding_side="left")
    return batch["input_ids"], batch["attention_mask"]


def perturbed_copy(model, noise, noise_seed=9, vocab_size=None):
    """`model` with small weight noise: a draft that agrees with that target on some tokens and
    not on others, so rows accept different numbers of drafts. A wider `vocab_size` adds random
    padding rows to the embeddings and the LM head."""
    original = model.state_dict()
    copy = tiny_llama(0, vocab_size=vocab_size or model.config.vocab_size)
    generator = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for name, parameter in copy.named_parameters():
            parameter[: original[name].shape[0]] = original[name]
            parameter.add_(noise * torch.randn(parameter.shape, generator=generator))
    return copy


def prompts_of_different_lengths():
    generator = torch.Generator().manual_seed(5)
    return left_padded([torch.randint(1, VOCAB, (n,), generator=generator) for n in (7, 3, 5, 1)])


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def close_draft(target):
    return perturbed_copy(target, noise=0.004)


@pytest.mark.parametrize("num_draft_tokens", [1, 3, 6])
def test_greedy_equals_target_generate_on_left_padded_batch(target, close_draft, num_draft_tokens):
    ids, mask = prompts_of_different_lengths()
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS)
    generated, stats = speculative_generate(
        target, close_draft, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
        num_draft_tokens=num_draft_tokens, return_stats=True,
    )
    assert torch.equal(generated, expected)
    assert all(torch.equal(x, y) for x, y in zip((ids, mask), prompts_of_different_lengths()))  # inputs unchanged
    # The case the batched cache must survive: rows accepted different numbers of drafts, some
    # rounds rejected drafts, and more than one token per round was emitted on average.
    assert len(set(stats.accepted.tolist())) > 1
    assert (stats.accepted < stats.drafted).any() and stats.accepted.sum() > 0
    assert stats.rounds < NEW_TOKENS


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_equals_target_generate_on_an_unpadded_batch(target, close_draft, batch):
    # No column is masked until rows accept different numbers of drafts: the models run without a
    # mask, then (batch 4) with the mask of the holes.
    ids = torch.randint(1, VOCAB, (batch, 5), generator=torch.Generator().manual_seed(6))
    expected = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS)
    for mask in (None, torch.ones_like(ids)):
        generated, stats = speculative_generate(target, close_draft, ids, attention_mask=mask,
                                                max_new_tokens=NEW_TOKENS, num_draft_tokens=3, return_stats=True)
        assert torch.equal(generated, expected)
        assert (stats.accepted < stats.drafted).any()
        if batch > 1:
            assert len(set(stats.accepted.tolist())) > 1


def test_draft_equal_to_target_accepts_everything(target):
    ids, mask = prompts_of_different_lengths()
    generated, stats = speculative_generate(
        target, target, ids, attention_mask=mask, max_new_tokens=10, num_draft_tokens=4, return_stats=True
    )
    assert isinstance(stats, SpeculativeStats)
    # 10 tokens with 4 drafts: rounds emit 5, 5 (the second round drafts 4 of the 5 left).
    assert stats.rounds == 2
    assert stats.drafted.tolist() == [8] * 4 and stats.accepted.tolist() == [8] * 4
    assert stats.acceptance_rate == 1.0
    assert torch.equal(generated, target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10))


def test_eos_stops_rows_and_pads_like_generate(target, close_draft):
    ids, mask = prompts_of_different_lengths()
    free = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS)
    eos = int(free[0, ids.shape[1] + 3])  # row 0 stops after at most 4 new tokens
    pad = VOCAB - 1
    expected = target.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=pad
    )
    generated = speculative_generate(
        target, close_draft, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, num_draft_tokens=3,
        eos_token_id=eos, pad_token_id=pad,
    )
    assert torch.equal(generated, expected)
    assert (generated[0, ids.shape[1] + 4:] == pad).all()


@pytest.mark.parametrize("setting", [dict(repetition_penalty=1.05), dict(no_repeat_ngram_size=2),
                                     dict(suppress_tokens=[3]), dict(min_new_tokens=2)])
def test_generation_config_logits_processors_are_refused(target, close_draft, setting):
    """generate would apply these to the target's logits; speculative_generate applies none and must
    say so, not return a different decoding (min_new_tokens acts only with an EOS id)."""
    ids, mask = prompts_of_different_lengths()
    (name, value), = setting.items()
    original = getattr(target.generation_config, name)
    try:
        setattr(target.generation_config, name, value)
        with pytest.raises(ValueError, match=f"{name}=.*target.generation_config"):
            speculative_generate(target, close_draft, ids, attention_mask=mask, max_new_tokens=4, eos_token_id=1)
        if name == "min_new_tokens":  # without an EOS id it changes nothing
            assert torch.equal(speculative_generate(target, close_draft, ids, attention_mask=mask, max_new_tokens=4,
                                                    eos_token_id=[]),
                               target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=4))
    finally:
        setattr(target.generation_config, name, original)


def test_draft_with_padded_vocabulary(target):
    wide_draft = perturbed_copy(target, noise=0.004, vocab_size=VOCAB + 16)
    with torch.no_grad():  # make the padding columns win the draft's argmax unless aligned away
        wide_draft.lm_head.weight[VOCAB:] = 10 * wide_draft.lm_head.weight[:16]
    ids, mask = prompts_of_different_lengths()
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8)
    generated, stats = speculative_generate(
        target, wide_draft, ids, attention_mask=mask, max_new_tokens=8, return_stats=True
    )
    assert torch.equal(generated, expected)
    assert stats.accepted.sum() > 0


def fused_scores(models, weights, ids, mask, temperature=1.0, width=VOCAB):
    """sum_k w_k log_softmax(l_k / T) at every position, each model run on the full sequence;
    weights: T floats or per-row [B, T]."""
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    weights = torch.as_tensor(weights, dtype=torch.float64).expand(ids.shape[0], len(models))
    with torch.no_grad():
        logits = [m(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.double() for m in models]
    return sum(
        weights[:, k, None, None] * torch.log_softmax(l[..., :width] / temperature, dim=-1)
        for k, l in enumerate(logits)
    )


def naive_fused_greedy(models, weights, ids, mask, new_tokens, width=VOCAB):
    for _ in range(new_tokens):
        next_token = fused_scores(models, weights, ids, mask, width=width)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=-1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
    return ids


@pytest.mark.parametrize("drafter", ["small_ft", "separate"])
def test_fused_target_greedy_equals_naive_loop(target, close_draft, drafter):
    """EFT up-scaling: large base + 1.5 (small fine-tuned - small reference), drafted by the small
    fine-tuned model (which then runs once per step, as draft and as target) or by a separate
    model; the reference model has a padded vocabulary."""
    small_ft = perturbed_copy(target, noise=0.004, noise_seed=3)
    small_ref = perturbed_copy(target, noise=0.004, noise_seed=4, vocab_size=VOCAB + 8)
    targets, weights = [target, small_ft, small_ref], [1.0, 1.5, -1.5]
    ids, mask = prompts_of_different_lengths()
    expected = naive_fused_greedy(targets, weights, ids, mask, NEW_TOKENS)
    generated, stats = speculative_generate(
        targets, small_ft if drafter == "small_ft" else close_draft, ids, attention_mask=mask,
        max_new_tokens=NEW_TOKENS, num_draft_tokens=3,
        target_weights=weights, return_stats=True,
    )
    assert torch.equal(generated, expected)
    assert stats.accepted.sum() > 0 and (stats.accepted < stats.drafted).any()


def test_per_row_target_weights_follow_their_rows(target, close_draft):
    """Rows finish in different rounds and leave the batch; each keeps its own weights."""
    small_ft = perturbed_copy(target, noise=0.004, noise_seed=3)
    small_ref = perturbed_copy(target, noise=0.004, noise_seed=4)
    targets = [target, small_ft, small_ref]
    weights = torch.tensor([[1.0, 1.5, -1.5], [1.0, 0.0, 0.0], [1.0, -1.0, 1.0], [1.0, 0.5, -0.5]])
    ids, mask = prompts_of_different_lengths()
    generated = speculative_generate(
        targets, close_draft, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, num_draft_tokens=3,
        target_weights=weights,
    )
    assert torch.equal(generated, naive_fused_greedy(targets, weights, ids, mask, NEW_TOKENS))


def test_wider_target_is_aligned_to_the_draft_vocabulary():
    wide_target = tiny_llama(6, vocab_size=VOCAB + 16)
    with torch.no_grad():  # the padding columns would win the target's argmax if not cut off
        wide_target.lm_head.weight[VOCAB:] = 10 * wide_target.lm_head.weight[:16]
    ids, mask = prompts_of_different_lengths()
    generated = speculative_generate(wide_target, tiny_llama(7), ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(generated, naive_fused_greedy([wide_target], [1.0], ids, mask, 6))


# Sampling: the joint law of 3 new tokens over a vocabulary of 8, from a batch of identical prompts
# (two prompts, one of them left-padded), against the exact target law computed by enumeration.
SMALL_VOCAB = 8
SAMPLED_TOKENS = 3
DRAWS = 6000


def peaked_llama(seed, vocab_size):
    """A tiny Llama with logits of standard deviation ~1.5 instead of ~0.1, so that its
    distributions are far from uniform and far from another seed's."""
    model = tiny_llama(seed, vocab_size=vocab_size)
    with torch.no_grad():
        model.lm_head.weight.mul_(15.0)
    return model


@pytest.fixture(scope="module")
def small_models():
    """EFT-style targets [large, small fine-tuned, small reference] and a draft close to the large
    model, with a padded vocabulary."""
    large, small_ref = peaked_llama(10, SMALL_VOCAB), peaked_llama(11, SMALL_VOCAB)
    small_ft = perturbed_copy(small_ref, noise=0.05)
    return [large, small_ft, small_ref], perturbed_copy(large, noise=0.01, vocab_size=SMALL_VOCAB + 4)


def exact_joint_law(models, weights, prompt, temperature):
    """P(x1, x2, x3 | prompt) of the fused target, by enumerating all continuations."""
    prefixes = torch.tensor(list(itertools.product(range(SMALL_VOCAB), repeat=SAMPLED_TOKENS - 1)))
    ids = torch.cat([prompt.expand(prefixes.shape[0], -1), prefixes], dim=1)
    scores = fused_scores(models, weights, ids, torch.ones_like(ids), temperature, width=SMALL_VOCAB)
    log_probs = torch.log_softmax(scores[:, -SAMPLED_TOKENS:].double(), dim=-1)  # [prefixes, 3, V]
    joint = torch.zeros((SMALL_VOCAB,) * SAMPLED_TOKENS, dtype=torch.float64)
    for row, (x1, x2) in enumerate(prefixes.tolist()):
        joint[x1, x2] = (log_probs[row, 0, x1] + log_probs[row, 1, x2] + log_probs[row, 2]).exp()
    return joint.flatten()


def chi_square_p_value(counts, probs, min_expected=5.0):
    """Pearson's test with the cells of expected count < min_expected pooled into one."""
    expected = probs * counts.sum()
    small = expected < min_expected
    observed = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    statistic = float(((observed - expected) ** 2 / expected).sum())
    return float(scipy_stats.chi2.sf(statistic, observed.numel() - 1))


@pytest.mark.parametrize("case", ["one_target", "fused_target", "fused_target_drafted_by_small_ft"])
def test_sampled_output_follows_the_target_distribution(small_models, case):
    targets, draft = small_models
    fused = case != "one_target"
    if case == "fused_target_drafted_by_small_ft":
        draft = targets[1]
    targets, weights, temperature = (targets, [1.0, 0.8, -0.8], 1.0) if fused else (targets[:1], None, 0.7)
    prompts = [torch.tensor([3, 1, 4, 1, 5]), torch.tensor([2, 7, 1])]  # the second one left-padded
    ids, mask = left_padded(prompts * (DRAWS // 2))
    generated, stats = speculative_generate(
        targets if fused else targets[0], draft, ids, attention_mask=mask, max_new_tokens=SAMPLED_TOKENS,
        num_draft_tokens=2, do_sample=True, temperature=temperature, seed=1234, target_weights=weights,
        return_stats=True,
    )
    assert 0.1 < stats.acceptance_rate < 0.9  # both the accept and the residual path are exercised
    cells = (generated[:, -SAMPLED_TOKENS:] * SMALL_VOCAB ** torch.arange(SAMPLED_TOKENS - 1, -1, -1)).sum(-1)
    for index, prompt in enumerate(prompts):
        counts = torch.bincount(cells[index :: len(prompts)], minlength=SMALL_VOCAB ** SAMPLED_TOKENS).double()
        law = exact_joint_law(targets, weights or [1.0], prompt[None], temperature)
        assert abs(float(law.sum()) - 1.0) < 1e-9
        assert counts[law == 0].sum() == 0
        assert chi_square_p_value(counts, law) > 1e-3


def test_sampling_is_repeatable_under_a_seed(target, close_draft):
    ids, mask = prompts_of_different_lengths()
    run = lambda seed: speculative_generate(  # noqa: E731
        target, close_draft, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, num_draft_tokens=3,
        do_sample=True, seed=seed,
    )
    first = run(7)
    assert torch.equal(first, run(7))
    assert not torch.equal(first, run(8))
    per_row = torch.tensor([11, 12, 13, 14])
    assert torch.equal(run(per_row), run(per_row.clone()))
    torch.manual_seed(0)
    unseeded = run(None)
    torch.manual_seed(0)
    assert torch.equal(unseeded, run(None))


def test_bad_input_is_refused_with_the_argument_named(target, close_draft):
    ids, mask = prompts_of_different_lengths()
    with pytest.raises(ValueError, match="num_draft_tokens"):
        speculative_generate(target, close_draft, ids, attention_mask=mask, num_draft_tokens=0)
    with pytest.raises(TypeError, match="num_draft_tokens"):
        speculative_generate(target, close_draft, ids, attention_mask=mask, num_draft_tokens=2.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(target, close_draft, ids, attention_mask=mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="target_weights has 3 weights but there are 2"):
        speculative_generate([target, close_draft], close_draft, ids, attention_mask=mask, target_weights=[1, 1, 1])
    with pytest.raises(ValueError, match="target_weights is required"):
        speculative_generate([target, close_draft], close_draft, ids, attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        speculative_generate(target, close_draft, ids, attention_mask=mask[:2])
    with pytest.raises(ValueError, match="left-padded"):
        speculative_generate(target, close_draft, ids, attention_mask=mask.flip(-1))
    with pytest.raises(TypeError, match="input_ids"):
        speculative_generate(target, close_draft, ids.float(), attention_mask=mask)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target, close_draft, ids, do_sample=True, temperature=0.0)
    # greedy decoding ignores the temperature, as generate does
    assert torch.equal(speculative_generate(target, close_draft, ids, attention_mask=mask, max_new_tokens=2, temperature=0.0),
                       speculative_generate(target, close_draft, ids, attention_mask=mask, max_new_tokens=2))
    for bad_seed, error in (("abc", TypeError), (2**63, ValueError), (torch.zeros(2, 2, dtype=torch.int64), ValueError)):
        with pytest.raises(error, match="seed"):  # refused in greedy mode too, though unused there
            speculative_generate(target, close_draft, ids, attention_mask=mask, seed=bad_seed)
    with pytest.raises(ValueError, match="vocab_size=80 but target scores only 64"):
        speculative_generate(target, close_draft, ids, vocab_size=80)
    with pytest.raises(TypeError, match="draft must be a model"):
        speculative_generate(target, None, ids)


def test_models_on_different_devices_are_refused(target):
    elsewhere = tiny_llama(5).to("meta")
    ids, mask = prompts_of_different_lengths()
    with pytest.raises(ValueError, match="draft is on meta but target is on cpu"):
        speculative_generate(target, elsewhere, ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"target\[1\] is on meta"):
        speculative_generate([target, elsewhere], target, ids, attention_mask=mask, target_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="input_ids are on cpu but the models are on meta"):
        speculative_generate(elsewhere, elsewhere, ids, attention_mask=mask)
