"""Triton backend of fuse_logits and fused_sample (canonical signatures: collab_ops.ops.fusion).

The second GPU path after the CUDA kernels (dispatch tries cuda first): one program per row
(collab_ops/triton/fusion_kernels.py), so it suits batches that fill the GPU rather than B=1.
fused_sample here has no top_k/top_p (their value selection runs on the cuda and cpu backends);
min_p, temperature, greedy and per-row or batch seeds are supported. The random stream is
Triton's Philox (`tl.rand`) keyed by the row's seed: the same seed repeats on this backend, and
differs from the cuda and cpu backends' streams (as documented for fused_sample).

Triton is imported when a kernel first runs, so this module imports without it.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

MAX_MODELS = 8  # the kernels' pointer arguments P0..P7
# One seed for the batch is spread over rows as speculative_verify spreads it
# (collab_ops.reference.speculative.ROW_SEED_STRIDE), as a signed 64-bit integer.
_ROW_SEED_SPREAD = 0x9E3779B97F4A7C15 - 2**64


def _kernels():
    from . import fusion_kernels

    return fusion_kernels


def fused_sample_supports(*, top_k, top_p, **_case) -> Optional[str]:
    """The refusal beyond the model count and dtypes, which collab_ops.ops.fusion checks for every
    fusion kernel."""
    if top_k > 0 or top_p < 1.0:
        return "the triton fused_sample takes no top_k/top_p (their selection runs on the cuda and cpu backends)"
    return None


def _block(vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK columns, num_warps) of a row program."""
    block = 1 << max(0, (min(vocab, 2048 if device.type == "cuda" else 1024) - 1).bit_length())
    return block, max(1, min(8, block // 256)) if device.type == "cuda" else 1


@functools.lru_cache(maxsize=64)
def _device_constants(device: torch.device, strides: tuple, inv_temperatures: tuple, weights: Optional[tuple]):
    """The small per-call tables on the device, built once per distinct layout and options: a
    decoding loop repeats them every step, and a fresh host-to-device copy would synchronise (and
    could not be captured in a CUDA graph). The kernels only read them."""
    strides_table = torch.tensor(strides, dtype=torch.int64).to(device)
    temperatures_table = torch.tensor(inv_temperatures, dtype=torch.float32).to(device)
    weights_table = None if weights is None else torch.tensor(weights, dtype=torch.float32).to(device)
    return strides_table, temperatures_table, weights_table


class _Launch:
    """The arguments every fusion kernel shares, built once per call."""

    def __init__(self, logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref, vocab_size):
        device = logits[0].device
        batch = logits[0].shape[0]
        self.num_models = len(logits)
        self.pointers = list(logits) + [logits[0]] * (MAX_MODELS - len(logits))
        constant_weights = tuple(weights.tolist()) if weights.dim() == 1 else None  # [K] on the CPU
        self.strides, self.inv_temperatures, self.weights = _device_constants(
            device, tuple((t.stride(0), t.stride(1)) for t in logits), tuple(1.0 / t for t in temperatures),
            constant_weights)
        if constant_weights is not None:
            self.weight_row_stride = 0
        else:
            self.weights = weights.to(torch.float32).contiguous()
            self.weight_row_stride = self.weights.stride(0)
        self.normalize = bool(normalize)
        self.plausibility = plausibility_alpha is not None
        self.log_alpha = math.log(plausibility_alpha) if self.plausibility else 0.0
        self.plausibility_ref = int(plausibility_ref)
        self.vocab = int(vocab_size)
        self.batch = batch
        self.device = device
        self.block, self.num_warps = _block(self.vocab, device)
        self.stats = self.inv_temperatures  # read by no kernel until model_stats fills a real table

    def model_stats(self, only_reference: bool):
        """The row statistics the score needs: every model's log-sum-exp when normalising, else
        only the plausibility reference's max."""
        self.stats = torch.empty((self.batch, self.num_models, 3), dtype=torch.float32, device=self.device)
        _kernels().model_stats_kernel[(self.batch,)](
            *self.pointers, self.strides, self.inv_temperatures, self.stats, self.vocab,
            K=self.num_models, ONLY_REF=only_reference, REF=self.plausibility_ref, BLOCK=self.block,
            num_warps=self.num_warps,
        )


def fuse_logits(logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref, vocab_size,
                output_logprobs) -> torch.Tensor:
    launch = _Launch(logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref, vocab_size)
    out = torch.empty((launch.batch, launch.vocab), dtype=torch.float32, device=launch.device)
    if launch.batch == 0:
        return out
    if launch.normalize or launch.plausibility:
        launch.model_stats(only_reference=not launch.normalize)
    _kernels().fuse_kernel[(launch.batch,)](
        *launch.pointers, launch.strides, launch.inv_temperatures, launch.weights, launch.weight_row_stride,
        launch.stats, out, launch.vocab, launch.log_alpha,
        K=launch.num_models, NORMALIZE=launch.normalize, PLAUSIBILITY=launch.plausibility,
        REF=launch.plausibility_ref, LOGPROBS=bool(output_logprobs), INF_UNDEFINED=False, BLOCK=launch.block,
        num_warps=launch.num_warps,
    )
    return out


def fused_sample(logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref, vocab_size,
                 temperature, top_k, top_p, min_p, greedy, seed) -> torch.Tensor:
    launch = _Launch(logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref, vocab_size)
    tokens = torch.empty(launch.batch, dtype=torch.int64, device=launch.device)
    if launch.batch == 0:
        return tokens
    if launch.plausibility:
        launch.model_stats(only_reference=True)
    if greedy or seed is None:  # no seed is read: any int64 tensor on the device stands in
        seed_tensor, seed_row_stride, seed_spread = launch.strides, 0, 0
    elif seed.dim() == 1:
        seed_tensor, seed_row_stride, seed_spread = seed.contiguous(), 1, 0
    else:
        seed_tensor, seed_row_stride, seed_spread = seed.reshape(1), 0, _ROW_SEED_SPREAD
    log_min_p = math.log(min_p) if min_p > 0 else float("-inf")
    # The per-model log-sum-exps are per-row constants, which sampling does not see: NORMALIZE off,
    # with a normalised model's +inf (which would make its log-softmax NaN) marking the row undefined.
    _kernels().sample_kernel[(launch.batch,)](
        *launch.pointers, launch.strides, launch.inv_temperatures, launch.weights, launch.weight_row_stride,
        launch.stats, seed_tensor, seed_row_stride, seed_spread, tokens, launch.vocab, launch.log_alpha,
        1.0 / float(temperature), log_min_p,
        K=launch.num_models, NORMALIZE=False, PLAUSIBILITY=launch.plausibility, REF=launch.plausibility_ref,
        GREEDY=bool(greedy), MIN_P=bool(min_p > 0 and not greedy), INF_UNDEFINED=launch.normalize,
        BLOCK=launch.block, num_warps=launch.num_warps,
    )
    return tokens
