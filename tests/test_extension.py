"""The compiled extension: it loads, its operators are registered, and they pass torch's opcheck."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import collab_ops
from collab_ops import _availability

needs_cpu_kernels = pytest.mark.skipif(
    "cpu" not in collab_ops.available_backends(), reason=str(collab_ops.backend_status()["cpu"])
)


def test_backend_status_reports_every_backend_with_a_reason():
    status = collab_ops.backend_status()
    assert set(status) == {"reference", "cpu", "cuda", "triton"}
    assert status["reference"] == "available"
    for name, reason in status.items():
        assert isinstance(reason, str) and reason
        assert (name in collab_ops.available_backends()) == (reason == "available")


@needs_cpu_kernels
def test_extension_registers_its_operators():
    assert hasattr(torch.ops.collab_ops, "fuse_logits")
    schema = str(torch.ops.collab_ops.fuse_logits.default._schema)
    assert "Tensor[] logits" in schema


def test_cuda_backend_status_matches_the_build():
    status = collab_ops.backend_status()["cuda"]
    if _availability.extension() is not None and not _availability.compiled_with_cuda():
        assert "without CUDA" in status
    if not torch.cuda.is_available():
        assert status != "available"


def _fusion_samples(device):
    torch.manual_seed(0)
    mixed = [torch.randn(3, 11, device=device), torch.randn(3, 13, device=device, dtype=torch.bfloat16)]
    weights = torch.tensor([[1.0, -0.5]], device=device).expand(3, 2)
    yield (mixed, weights, [1.0, 0.7], True, 0.1, 0, 11, True)
    yield (mixed, weights.contiguous(), [1.0, 1.0], False, None, 0, 11, False)
    half = [torch.randn(2, 5, device=device, dtype=torch.float16).t().contiguous().t()]
    yield (half, torch.ones(5, 1, device=device)[:2], [2.0], True, None, 0, 2, False)


@needs_cpu_kernels
@pytest.mark.parametrize("case", range(3))
def test_fuse_logits_opcheck(case):
    args = list(_fusion_samples("cpu"))[case]
    torch.library.opcheck(torch.ops.collab_ops.fuse_logits.default, args)


@needs_cpu_kernels
def test_dynamic_fusion_weights_opcheck():
    torch.manual_seed(0)
    large, expert, base = torch.randn(3, 9), torch.randn(3, 11, dtype=torch.bfloat16), torch.randn(3, 9)
    grid = torch.tensor([0.0, 0.5, 1.0])
    torch.library.opcheck(torch.ops.collab_ops.dynamic_fusion_weights.default, (large, [expert], base, grid, 9))


@needs_cpu_kernels
def test_compiled_op_rejects_bad_arguments_with_clear_errors():
    x = torch.randn(2, 8)
    weights = torch.ones(2, 1)
    with pytest.raises(ValueError, match="fewer than vocab_size"):
        torch.ops.collab_ops.fuse_logits([x], weights, [1.0], True, None, 0, 9, True)
    with pytest.raises(ValueError, match="temperatures"):
        torch.ops.collab_ops.fuse_logits([x], weights, [0.0], True, None, 0, 8, True)
    with pytest.raises(TypeError, match="logits\\[0\\]"):
        torch.ops.collab_ops.fuse_logits([x.double()], weights, [1.0], True, None, 0, 8, True)
    with pytest.raises(ValueError, match="plausibility_alpha"):
        torch.ops.collab_ops.fuse_logits([x], weights, [1.0], True, 1.5, 0, 8, True)
    with pytest.raises(ValueError, match="grid"):
        torch.ops.collab_ops.dynamic_fusion_weights(x, [x], x, torch.zeros(33), 8)
    with pytest.raises(ValueError, match="experts\\[0\\] has 8 columns"):
        torch.ops.collab_ops.dynamic_fusion_weights(torch.randn(2, 9), [x], torch.randn(2, 9), torch.zeros(3), 9)


def test_import_without_extension_warns_once_and_keeps_reference():
    """With collab_ops._C hidden, import still works, warns once, and only the reference remains."""
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["collab_ops._C"] = None  # what a missing or unloadable extension looks like
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import collab_ops
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1, messages
        assert "collab_ops._C" in messages[0]
        assert set(collab_ops.available_backends()) <= {"reference", "triton"}
        assert "not built" in collab_ops.backend_status()["cpu"]
        print("ok")
        """
    )
    env = dict(os.environ)
    env.pop("COLLAB_OPS_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
