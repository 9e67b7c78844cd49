"""The demo's closing table: our fused ops against the eager PyTorch chains, on this machine.

A short version of `python -m collab_ops bench` (which needs the source tree) that ships in the
wheel: medians of repeated calls, the backend that served each call, the speed-up over eager.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from .. import _dispatch, baselines, presets
from ..ops.distill import kd_loss
from ..ops.fusion import fused_sample
from ..ops.speculative import speculative_verify

PROXY_TUNING_WEIGHTS = (1.0, 1.0, -1.0)
NUM_DRAFTS = 5


def median_ms(fn: Callable[[], object], device: torch.device, budget_s: float = 0.4, min_calls: int = 5) -> float:
    """Median wall-clock milliseconds of `fn` (synchronising CUDA), after one warm-up call."""
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    synchronize()
    times = []
    started = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - started < budget_s:
        begin = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - begin)
        if len(times) >= 200:
            break
    return 1000 * statistics.median(times)


def _backend_of(fn: Callable[[], object]) -> str:
    with _dispatch.recording() as chosen:
        fn()
    return "+".join(sorted({impl.backend for impl in chosen})) or "?"


def _cases(device: torch.device, vocab: int, batch: int):
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=3.0, dtype=torch.float32, requires_grad=False):
        tensor = (scale * torch.randn(*shape, generator=generator, device=device)).to(dtype)
        return tensor.requires_grad_(requires_grad)

    logits = [randn(batch, vocab, dtype=torch.bfloat16) for _ in range(3)]
    yield (
        "proxy-tuning step (fused_sample)", f"B={batch} K=3 V={vocab} bf16",
        lambda: fused_sample(logits, **presets.proxy_tuning(1.0)),
        lambda: baselines.eager_proxy_tuning_step(logits, PROXY_TUNING_WEIGHTS),
    )

    target = randn(batch, NUM_DRAFTS + 1, vocab, scale=1.0).softmax(-1)
    draft = randn(batch, NUM_DRAFTS, vocab, scale=1.0).softmax(-1)
    draft_tokens = torch.randint(0, vocab, (batch, NUM_DRAFTS), generator=generator, device=device)
    yield (
        "speculative verification", f"B={batch} K={NUM_DRAFTS} V={vocab} fp32 probs",
        lambda: speculative_verify(draft_tokens, target, draft),
        lambda: baselines.eager_speculative_verify(draft_tokens, target, draft, False),
    )

    tokens = 8 * batch
    student = randn(tokens, vocab, requires_grad=True)
    teacher = randn(tokens, vocab)

    def ours_kd():
        kd_loss(student, teacher, divergence="forward_kl").backward()

    def eager_kd():
        baselines.eager_forward_kl(student, teacher).backward()

    yield "distillation loss fwd+bwd (kd_loss)", f"N={tokens} V={vocab} fp32 forward_kl", ours_kd, eager_kd


def kernel_table(device: torch.device, quick: bool = False) -> list[dict]:
    """One row per op: median ms of ours and of eager PyTorch, the speed-up and our backend."""
    vocab = 32000 if quick or device.type == "cpu" else 152064
    batch = 4 if quick else 16
    rows = []
    for name, shape, ours, eager in _cases(device, vocab, batch):
        ours_ms = median_ms(ours, device)
        eager_ms = median_ms(eager, device)
        rows.append(dict(op=name, shape=shape, backend=_backend_of(ours), ours_ms=ours_ms, eager_ms=eager_ms,
                         speedup=eager_ms / ours_ms))
    return rows
