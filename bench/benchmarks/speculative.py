"""Speculative verification: K=5 draft tokens checked against the target in one call.

The baseline is the best plain PyTorch gets without a loop over rows or positions: gather p and q
at the draft ids, accept with probability min(1, p/q), find the first rejection with a cumprod,
build one residual row per sequence and draw once from each.
"""
from __future__ import annotations

import functools

import torch

from bench.benchmarks.fusion import QUICK_VOCAB, QWEN25_VOCAB
from bench.harness import Case, CallOrReason, benchmark, public_op_call
from bench.peers import flashinfer_chain
from collab_ops.baselines import eager_speculative_verify

NUM_DRAFT = 5


def flashinfer_call(draft_tokens, target, draft, inputs: str, device: torch.device) -> CallOrReason:
    if device.type != "cuda":
        return "FlashInfer runs on CUDA only"
    if inputs != "probs":
        return "FlashInfer's chain_speculative_sampling takes probabilities, not logits"
    try:
        from flashinfer.sampling import chain_speculative_sampling
    except ImportError:
        # The same kernel, built from FlashInfer's headers where its package cannot be installed.
        return flashinfer_chain.peer_call(draft_tokens, target, draft)
    except Exception as exc:
        return f"flashinfer does not import ({type(exc).__name__}: {exc})"
    return functools.partial(
        chain_speculative_sampling,
        draft_probs=draft,
        draft_token_ids=draft_tokens.to(torch.int32),
        target_probs=target,
    )


@benchmark(
    "speculative.verify",
    cuda=[dict(B=b, K=NUM_DRAFT, V=QWEN25_VOCAB, inputs=kind) for kind in ("probs", "logits") for b in (1, 64)],
    cpu=[dict(B=64, K=NUM_DRAFT, V=QWEN25_VOCAB, inputs=kind) for kind in ("probs", "logits")],
    quick=[dict(B=8, K=NUM_DRAFT, V=QUICK_VOCAB, inputs=kind) for kind in ("probs", "logits")],
)
def verify(shape: dict, device: torch.device) -> Case:
    """speculative_verify: fp32 probabilities or bf16 logits, vs vectorised PyTorch."""
    batch, num_draft, vocab, inputs = shape["B"], shape["K"], shape["V"], shape["inputs"]
    generator = torch.Generator(device=device).manual_seed(3)
    target_logits = 2 * torch.randn(batch, num_draft + 1, vocab, generator=generator, device=device)
    # A draft close to the target, so that rows accept a realistic, varying number of tokens.
    draft_logits = target_logits[:, :num_draft] + torch.randn(batch, num_draft, vocab, generator=generator, device=device)
    draft_probs = torch.softmax(draft_logits, dim=-1)
    draft_tokens = torch.multinomial(draft_probs.view(-1, vocab), 1, generator=generator).view(batch, num_draft)
    if inputs == "probs":
        target, draft, dtype = torch.softmax(target_logits, dim=-1), draft_probs, torch.float32
    else:
        target, draft, dtype = target_logits.bfloat16(), draft_logits.bfloat16(), torch.bfloat16
    del target_logits, draft_logits
    outputs_bytes = batch * (num_draft + 1) * 8 + batch * 8
    return Case(
        op="speculative_verify",
        shape=f"B={batch} K={num_draft} V={vocab} {inputs}",
        dtype=dtype,
        bytes_moved=sum(t.numel() * t.element_size() for t in (draft_tokens, target, draft)) + outputs_bytes,
        eager=eager_speculative_verify,
        eager_args=(draft_tokens, target, draft, inputs == "logits"),
        ours=public_op_call("speculative", "speculative_verify", draft_tokens, target, draft, inputs=inputs),
        peers={"flashinfer": flashinfer_call(draft_tokens, target, draft, inputs, device)},
    )
