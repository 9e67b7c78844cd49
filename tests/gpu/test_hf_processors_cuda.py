"""collab_ops.hf processors with the models on the GPU (the fusion ops' CUDA kernels inside
`generate`): each preset's greedy output on a left-padded batch, and every step's scores, against
the naive loop of tests/test_hf_processors.py (skipped without a CUDA device)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_processors import (  # noqa: E402
    PRESETS,
    Recorder,
    assert_every_step_follows_formula,
    greedy_generate,
    left_padded_prompts,
    naive_greedy,
    sharpened,
)
from tiny_models import tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def cuda_models():
    return [sharpened(tiny_llama(seed)).cuda() for seed in (10, 11, 12, 13)]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_on_cuda_matches_naive_loop_on_left_padded_batch(cuda_models, name):
    preset = PRESETS[name]
    main, auxiliary = cuda_models[0], cuda_models[1 : 1 + preset.num_auxiliary]

    def score(logits):  # the formulas (and dynamic fusion's NumPy oracle) run on the CPU
        return preset.score([l.cpu() for l in logits]).cuda()

    ids, mask, _ = left_padded_prompts()
    ids, mask = ids.cuda(), mask.cuda()
    recorder = Recorder(preset.build(auxiliary, mask))
    generated = greedy_generate(main, recorder, ids, mask)
    assert generated.device.type == "cuda"
    assert torch.equal(generated, naive_greedy([main, *auxiliary], score, ids, mask))
    assert_every_step_follows_formula(recorder, [main, *auxiliary], score, mask)
