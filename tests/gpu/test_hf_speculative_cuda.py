"""speculative_generate with models on the GPU (skipped without a CUDA device): greedy output
equals the target's own `generate`, and sampling is repeatable under a seed."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from collab_ops.hf import speculative_generate  # noqa: E402
from test_hf_speculative import NEW_TOKENS, perturbed_copy, prompts_of_different_lengths  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(0)
    return target.cuda(), perturbed_copy(target, noise=0.004).cuda()


def test_greedy_equals_target_generate(models):
    target, draft = models
    ids, mask = (tensor.cuda() for tensor in prompts_of_different_lengths())
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS)
    generated, stats = speculative_generate(
        target, draft, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, num_draft_tokens=3, return_stats=True
    )
    assert generated.device == ids.device
    assert torch.equal(generated, expected)
    assert stats.accepted.sum() > 0


def test_sampling_is_repeatable(models):
    target, draft = models
    ids, mask = (tensor.cuda() for tensor in prompts_of_different_lengths())
    seeds = torch.tensor([1, 2, 3, 4], device="cuda")
    runs = [
        speculative_generate(
            target, draft, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True, seed=seed
        )
        for seed in (seeds, seeds.clone(), 5)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
