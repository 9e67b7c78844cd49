"""Triton backend of fuse_logits and fused_sample (canonical signatures: collab_ops.ops.fusion).

The second GPU path after the CUDA kernels (dispatch tries cuda first). Each row is split into
chunks, one program each, with as many chunks as bring the batch to about PROGRAMS_PER_SM programs
per SM, so B=1 spreads over the GPU; per-chunk partial states go to workspaces that the next
launch merges per row (collab_ops/triton/fusion_kernels.py), with no host synchronisation.
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

from .._validation import host_constant_cache

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


# The widest BLOCK (columns per step) of a program: on the GPU, enough loads in flight per step
# without spills; in Triton's interpreter (CPU tensors) a narrower one (a test narrows it further).
GPU_MAX_BLOCK = 2048
INTERPRETER_MAX_BLOCK = 1024
# Programs a launch aims at over the whole batch, as the CUDA kernels: rows split into chunks until
# about PROGRAMS_PER_SM per SM exist, so a single row keeps the GPU busy. The interpreter has no SMs:
# a few programs there, more than one per row for wide rows so the CPU tests run the chunk merges.
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 8
# Chunk partials a merging program folds per step of its loop: one step holds a 152064-column row
# split into 2048-column chunks (75), the finest split made for Qwen vocabularies.
MERGE_STEP = 128


def _block(vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK columns, num_warps) of a program."""
    widest = GPU_MAX_BLOCK if device.type == "cuda" else INTERPRETER_MAX_BLOCK
    block = 1 << max(0, (min(vocab, widest) - 1).bit_length())
    return block, max(1, min(8, block // 256)) if device.type == "cuda" else 1


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _chunk_layout(batch: int, vocab: int, block: int, device: torch.device) -> tuple[int, int]:
    """(chunks per row, columns per chunk): whole BLOCKs per chunk, as many chunks as the batch
    has room for within the programs wanted (rounded down, as the CUDA launchers do: a few programs
    past the target would only queue behind the others), at most one per BLOCK of the row."""
    programs = PROGRAMS_PER_SM * _sm_count(device) if device.type == "cuda" else INTERPRETER_PROGRAMS
    blocks_per_row = max(1, -(-vocab // block))
    chunks = min(blocks_per_row, max(1, programs // batch))
    chunk_columns = -(-blocks_per_row // chunks) * block
    return max(1, -(-vocab // chunk_columns)), chunk_columns


@host_constant_cache(maxsize=64)
def _device_constants(device: torch.device, strides: tuple, inv_temperatures: tuple, weights: Optional[tuple]):
    """The small per-call tables on the device, built once per distinct layout and options: a
    decoding loop repeats them every step, and a fresh host-to-device copy would synchronise (and
    could not be captured in a CUDA graph). The kernels only read them."""

    def table(values, dtype):
        return torch.tensor(values, dtype=dtype, device="cpu").to(device)

    weights_table = None if weights is None else table(weights, torch.float32)
    return table(strides, torch.int64), table(inv_temperatures, torch.float32), weights_table


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
        self.chunks, self.chunk_columns = _chunk_layout(batch, self.vocab, self.block, device)
        self.chunk_grid = (batch * self.chunks,)
        # Tables that no kernel of this call reads until model_stats fills real ones.
        self.model_partials = self.model_lse = self.inv_temperatures

    def workspace(self, *shape, dtype=torch.float32) -> torch.Tensor:
        """A [batch, *shape] table of per-row partial states, written before it is read."""
        return torch.empty((self.batch, *shape), dtype=dtype, device=self.device)

    def model_stats(self, only_reference: bool):
        """The row statistics the score needs: every chunk's (max, Σ exp) of every model, and their
        per-row log-sum-exps, when normalising; else only the chunk maxima of the plausibility
        reference (the kernels that apply the cut merge them)."""
        self.model_partials = self.workspace(self.chunks, self.num_models, 2)
        _kernels().model_stats_kernel[self.chunk_grid](
            *self.pointers, self.strides, self.inv_temperatures, self.model_partials, self.vocab, self.chunks,
            self.chunk_columns, K=self.num_models, ONLY_REF=only_reference, REF=self.plausibility_ref,
            BLOCK=self.block, num_warps=self.num_warps,
        )
        if not only_reference:
            self.model_lse = self.workspace(self.num_models)
            _kernels().model_lse_kernel[(self.batch,)](self.model_partials, self.model_lse, self.chunks,
                                                       K=self.num_models, MERGE_STEP=MERGE_STEP)

    def fusion_arguments(self) -> tuple:
        """The leading arguments of the kernels that compute fused scores."""
        return (*self.pointers, self.strides, self.inv_temperatures, self.weights, self.weight_row_stride,
                self.model_partials, self.model_lse)


def fuse_logits(logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref, vocab_size,
                output_logprobs) -> torch.Tensor:
    launch = _Launch(logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref, vocab_size)
    out = torch.empty((launch.batch, launch.vocab), dtype=torch.float32, device=launch.device)
    if launch.batch == 0:
        return out
    if launch.normalize or launch.plausibility:
        launch.model_stats(only_reference=not launch.normalize)
    kernels = _kernels()
    score_partials = launch.workspace(launch.chunks, kernels.SCORE_STATE_FIELDS.value)
    kernels.fuse_kernel[launch.chunk_grid](
        *launch.fusion_arguments(), score_partials, out, launch.vocab, launch.chunks, launch.chunk_columns,
        launch.log_alpha, K=launch.num_models, NORMALIZE=launch.normalize, PLAUSIBILITY=launch.plausibility,
        REF=launch.plausibility_ref, LOGPROBS=bool(output_logprobs), BLOCK=launch.block,
        MERGE_STEP=MERGE_STEP, num_warps=launch.num_warps,
    )
    # Always launched: whether a row is poisoned is known on the device only.
    kernels.fuse_finish_kernel[launch.chunk_grid](
        score_partials, out, launch.vocab, launch.chunks, launch.chunk_columns, LOGPROBS=bool(output_logprobs),
        BLOCK=launch.block, MERGE_STEP=MERGE_STEP, num_warps=launch.num_warps,
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
    use_min_p = bool(min_p > 0 and not greedy)
    log_min_p = math.log(min_p) if min_p > 0 else float("-inf")
    inv_temperature = 1.0 / float(temperature)
    kernels = _kernels()
    # The per-model log-sum-exps are per-row constants, which sampling does not see: NORMALIZE off.
    flags = dict(K=launch.num_models, NORMALIZE=False, PLAUSIBILITY=launch.plausibility, REF=launch.plausibility_ref,
                 BLOCK=launch.block, MERGE_STEP=MERGE_STEP, num_warps=launch.num_warps)
    score_max_partials = launch.inv_temperatures  # read only with min_p
    if use_min_p:
        score_max_partials = launch.workspace(launch.chunks)
        kernels.score_max_kernel[launch.chunk_grid](
            *launch.fusion_arguments(), score_max_partials, launch.vocab, launch.chunks, launch.chunk_columns,
            launch.log_alpha, inv_temperature, **flags,
        )
    candidate_keys = launch.workspace(launch.chunks)
    candidate_columns = launch.workspace(launch.chunks, 2, dtype=torch.int32)  # (column, row undefined)
    kernels.sample_kernel[launch.chunk_grid](
        *launch.fusion_arguments(), score_max_partials, seed_tensor, seed_row_stride, seed_spread, candidate_keys,
        candidate_columns, launch.vocab, launch.chunks, launch.chunk_columns, launch.log_alpha, inv_temperature,
        log_min_p, GREEDY=bool(greedy), MIN_P=use_min_p, **flags,
    )
    kernels.pick_token_kernel[(launch.batch,)](candidate_keys, candidate_columns, tokens, launch.vocab, launch.chunks,
                                               MERGE_STEP=MERGE_STEP)
    return tokens
