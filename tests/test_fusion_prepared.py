"""PreparedFuseLogits (the decoding-loop form of fuse_logits that checks and dispatches once per
input layout) against fuse_logits itself, on every backend this build runs."""
import pytest
import torch

from collab_ops import fuse_logits, presets
from collab_ops.ops.fusion import PreparedFuseLogits

from backends import cpu_backends


def logits_list(batch, widths, dtypes, seed):
    generator = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(batch, w, generator=generator)).to(d) for w, d in zip(widths, dtypes)]


@pytest.mark.parametrize("backend", cpu_backends("fuse_logits"))
def test_every_call_equals_fuse_logits_across_layout_changes(backend):
    options = dict(presets.contrastive_decoding(alpha=0.2), output="logits", backend=backend)
    weights = options.pop("weights")
    prepared = PreparedFuseLogits(**options)
    layouts = [(3, (40, 40), (torch.float32, torch.bfloat16))] * 3 + [
        (5, (40, 40), (torch.float32, torch.bfloat16)),  # new batch size
        (5, (40, 48), (torch.float32, torch.bfloat16)),  # new width: vocab aligned to 40
        (5, (40, 48), (torch.float16, torch.bfloat16)),  # new dtype
    ]
    for step, (batch, widths, dtypes) in enumerate(layouts):
        logits = logits_list(batch, widths, dtypes, seed=step)
        expected = fuse_logits(logits, weights, **options)
        assert torch.equal(prepared(logits, weights), expected), step


@pytest.mark.parametrize("backend", cpu_backends("fuse_logits"))
def test_per_row_weight_tensors_are_taken_each_call(backend):
    prepared = PreparedFuseLogits(normalize=False, output="logits", backend=backend)
    for step in range(3):
        logits = logits_list(4, (32, 32, 32), (torch.float32,) * 3, seed=10 + step)
        weights = torch.rand(4, 3, generator=torch.Generator().manual_seed(step))
        expected = fuse_logits(logits, weights, normalize=False, output="logits", backend=backend)
        assert torch.equal(prepared(logits, weights), expected), step


def test_bad_options_and_inputs_raise_like_fuse_logits():
    logits = logits_list(2, (8, 8), (torch.float32,) * 2, seed=0)
    with pytest.raises(ValueError, match="temperatures"):
        PreparedFuseLogits(temperatures=[1.0])(logits, [1.0, -1.0])
    with pytest.raises(TypeError):
        PreparedFuseLogits(not_an_option=1)(logits, [1.0, -1.0])
    prepared = PreparedFuseLogits()
    prepared(logits, [1.0, -1.0])
    with pytest.raises(ValueError, match="weights"):
        prepared(logits, [1.0, -1.0, 2.0])  # a new weights list is a new layout: checked again
