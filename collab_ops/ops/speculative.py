"""speculative_verify: lossless verification of K draft tokens against a target, possibly fused.

The public function validates shapes, dtypes, devices and scalar options (no host
synchronisation), canonicalises the arguments and dispatches to a backend. The semantics
(distributions, acceptance rule, random numbers of the reference, invalid rows) are defined in
`collab_ops.reference.speculative`.

Canonical implementation signature, registered with
`collab_ops._dispatch.register("speculative_verify", backend, fn)` and called with keywords:

    fn(*, draft_tokens, targets, target_weights, draft, num_draft_tokens,
       inputs_are_logits, temperature, greedy, seed) -> (tokens, num_emitted, num_accepted)

    draft_tokens       int64 [B, K], contiguous. Ids at positions >= num_draft_tokens[b] are
                       never read as tokens (ragged rows may pad with anything).
    targets            tuple of T >= 1 tensors [B, K+1, V].
    target_weights     float32: [B, T] per-row weights on the device (possibly a stride-0 view), or
                       [T] on the CPU for Python floats, read on the host by the kernels.
    draft              None (q one-hot at the draft ids) or a tensor [B, K, V].
    num_draft_tokens   int64: [B] contiguous, on the device, or a 0-dim CPU tensor: every row uses
                       that many drafts (no device tensor to build). Values are unchecked and may
                       lie outside [0, K].
    inputs_are_logits  bool: softmax(x / temperature) per model, else probabilities.
    temperature        float > 0; exactly 1.0 when inputs are probabilities and in greedy mode
                       (T > 0 moves no argmax; the compiled op also ignores it there).
    greedy             bool.
    seed               int64: [B] contiguous per-row seeds, or a 0-dim base seed (on the device,
                       or on the CPU: read on the host) from which row b's seed is
                       base + b * reference.ROW_SEED_STRIDE (mod 2^64). Every random number of
                       row b comes from its row seed alone, so a row's output does not depend on
                       the rows around it. Unread when greedy.
    returns            tokens int64 [B, K+1] (emitted tokens left-aligned, then -1),
                       num_emitted int64 [B] (accepted + 1; 0 for an invalid row),
                       num_accepted int64 [B] (0 for an invalid row), on the inputs' device.

All float tensors (targets and draft) share one dtype in (float32, bfloat16, float16) and have a
unit stride in the vocabulary dimension; other strides are arbitrary. All tensors are on one
device. An implementation must not synchronise with the host and must not modify its inputs.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import _availability, _dispatch
from .._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_bool,
    check_choice,
    check_dim_size,
    check_float_tensor,
    check_positive,
    check_same_device,
    check_tensor,
    constant_float32_vector,
    host_constant_cache,
)
from ..reference import speculative as reference

MODES = ("sample", "greedy")
INPUT_KINDS = ("probs", "logits")

TensorOrSequence = Union[torch.Tensor, Sequence[torch.Tensor]]


def speculative_verify(
    draft_tokens: torch.Tensor,
    target: TensorOrSequence,
    draft: Optional[torch.Tensor] = None,
    *,
    inputs: str = "probs",
    num_draft_tokens: Optional[torch.Tensor] = None,
    target_weights: Union[None, Sequence[float], torch.Tensor] = None,
    temperature: float = 1.0,
    mode: str = "sample",
    seed: Union[None, int, torch.Tensor] = None,
    strict: bool = False,
    return_accepted: bool = False,
    backend: Optional[str] = None,
):
    """Verify K draft tokens per row against the target and emit 1..K+1 tokens per row.

    Args:
        draft_tokens: int64/int32 [B, K], the drafted ids.
        target: [B, K+1, V] target scores for the K draft positions and the bonus position, or a
            sequence of such tensors fused with `target_weights` as `fuse_logits` fuses
            (EFT speculative up-scaling): p = softmax(sum_k w_k z_k), z_k = log_softmax(l_k / T)
            for logits and log(p_k) for probabilities. Probabilities of a single target (weight
            1) and of the draft are used as given: each row is expected to sum to 1 and is not
            renormalised (as in FlashInfer and vLLM).
        draft: [B, K, V] draft scores, or None for drafts without probabilities (q one-hot).
        inputs: "probs" or "logits", for target and draft alike.
        num_draft_tokens: int [B], ragged drafts: row b uses its first n_b drafts and takes the
            bonus from target position n_b. Default: all K. A value outside [0, K] makes the row
            invalid (see below).
        target_weights: T floats, a float tensor [T] or per-row [B, T]. Required when T > 1.
        temperature: applied to logits (target and draft); must be 1.0 for probabilities. Greedy
            mode ignores it: T > 0 moves no argmax (kernels do not scale, so no near-tie rounds to a tie).
        mode: "sample" (lossless rejection sampling: accept draft i with probability
            min(1, p_i/q_i); at the first rejection emit a sample of norm(max(0, p - q)), or of p
            if that is all zero; if all are accepted emit a bonus token from p_{n_b}) or "greedy"
            (accept while draft == argmax p, then emit argmax p; ties go to the smallest id).
        seed: None (draws row seeds from torch's default generator of the device), an int, or an
            integer tensor: 0-dim (spread over the rows as an int is) or [B] per-row seeds. The
            same seed gives the same tokens on the same backend (backends draw the final token
            differently, so not across backends); a row's tokens depend only on its inputs and
            its row seed.
        strict: raise ValueError naming the invalid rows instead of returning them empty. Costs
            one host synchronisation.
        return_accepted: also return num_accepted [B] int64.
        backend: None (best available; env COLLAB_OPS_BACKEND overrides) or a backend name.

    Returns:
        (tokens int64 [B, K+1], num_emitted int64 [B]), plus num_accepted int64 [B] when
        `return_accepted`. Row b emits tokens[b, :num_emitted[b]] (its accepted drafts, then the
        corrected or bonus token) and is padded with -1; num_emitted = num_accepted + 1.
        An invalid row (num_draft_tokens outside [0, K], a used draft id outside [0, V), or a
        bad value where the decision reads: NaN, +inf, a negative probability, every token
        excluded; see `collab_ops.reference.speculative` for which entries are read) gets tokens
        all -1, num_emitted 0 and num_accepted 0; `strict=True` raises. Probabilities used as
        given are read only at the drafted ids and in the row where the chain stops, so a bad
        value elsewhere in them is not seen.
    """
    mode = check_choice("mode", mode, MODES)
    inputs = check_choice("inputs", inputs, INPUT_KINDS)
    inputs_are_logits = inputs == "logits"
    greedy = mode == "greedy"
    temperature = check_positive("temperature", temperature)
    if not inputs_are_logits and temperature != 1.0:
        raise ValueError(
            f"temperature={temperature} applies to inputs='logits' only; pass temperature=1.0 with probabilities"
        )
    if greedy:
        temperature = 1.0  # canonical: dividing by T would only round near-ties differently
    check_bool("strict", strict)
    check_bool("return_accepted", return_accepted)

    draft_tokens = check_tensor("draft_tokens", draft_tokens, ndim=2, dtypes=INDEX_DTYPES)
    batch, num_drafts = draft_tokens.shape
    named_targets = _named_targets(target)
    vocab_size = _check_targets(named_targets, batch, num_drafts)
    if draft is not None:
        check_float_tensor("draft", draft, ndim=3)
        check_dim_size("draft", draft, 0, batch, "the batch size of draft_tokens")
        check_dim_size("draft", draft, 1, num_drafts, "the number of drafts K = draft_tokens.shape[1]")
        check_dim_size("draft", draft, 2, vocab_size, f"the vocabulary size of {named_targets[0][0]}")
    if num_draft_tokens is not None:
        check_tensor("num_draft_tokens", num_draft_tokens, ndim=1, dtypes=INDEX_DTYPES)
        check_dim_size("num_draft_tokens", num_draft_tokens, 0, batch, "the batch size of draft_tokens")
    _check_seed(seed, batch)
    device = check_same_device(
        [("draft_tokens", draft_tokens), *named_targets, ("draft", draft), ("num_draft_tokens", num_draft_tokens)]
        + [(name, value) for name, value in (("target_weights", target_weights), ("seed", seed)) if isinstance(value, torch.Tensor)]
    )
    weights = _canonical_weights(target_weights, len(named_targets), batch, device)

    float_dtype = _common_float_dtype([tensor for _, tensor in named_targets] + ([draft] if draft is not None else []))
    case = dict(
        draft_tokens=_contiguous_int64(draft_tokens),
        targets=tuple(_canonical_scores(tensor, float_dtype) for _, tensor in named_targets),
        target_weights=weights,
        draft=None if draft is None else _canonical_scores(draft, float_dtype),
        num_draft_tokens=_all_drafts(num_drafts) if num_draft_tokens is None else _contiguous_int64(num_draft_tokens),
        inputs_are_logits=inputs_are_logits,
        temperature=temperature,
        greedy=greedy,
        seed=_row_seeds(seed, device, greedy),
    )
    implementation = _dispatch.dispatch("speculative_verify", device, backend, **case)
    tokens, num_emitted, num_accepted = implementation.fn(**case)
    if strict:
        invalid = num_emitted == 0
        if bool(invalid.any()):  # the one host synchronisation strict=True pays for
            raise ValueError(_describe_invalid_rows(case, invalid.nonzero().flatten()))
    if return_accepted:
        return tokens, num_emitted, num_accepted
    return tokens, num_emitted


def _named_targets(target) -> list[tuple[str, torch.Tensor]]:
    if isinstance(target, torch.Tensor):
        return [("target", target)]
    if not isinstance(target, (list, tuple)):
        raise TypeError(f"target must be a tensor or a list/tuple of tensors, got {type(target).__name__}")
    if len(target) == 0:
        raise ValueError("target is an empty sequence; give at least one target tensor")
    return [(f"target[{index}]", tensor) for index, tensor in enumerate(target)]


def _check_targets(named_targets: list[tuple[str, torch.Tensor]], batch: int, num_drafts: int) -> int:
    """Checks every target against draft_tokens and the first target; returns the vocabulary size."""
    first_name, first = named_targets[0]
    for name, tensor in named_targets:
        check_float_tensor(name, tensor, ndim=3)
        check_dim_size(name, tensor, 0, batch, "the batch size of draft_tokens")
        check_dim_size(name, tensor, 1, num_drafts + 1, "K + 1 (K = draft_tokens.shape[1] drafts plus the bonus position)")
        check_dim_size(name, tensor, 2, first.shape[2], f"the vocabulary size of {first_name}")
    if first.shape[2] == 0:
        raise ValueError(f"{first_name} has an empty vocabulary (shape {tuple(first.shape)})")
    return first.shape[2]


def _check_seed(seed, batch: int) -> None:
    if seed is None:
        return
    if isinstance(seed, torch.Tensor):
        if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"seed must be an integer tensor, got dtype {str(seed.dtype).replace('torch.', '')}")
        if seed.dim() == 1:
            check_dim_size("seed", seed, 0, batch, "the batch size of draft_tokens")
        elif seed.dim() != 0:
            raise ValueError(f"seed must be a 0-dim tensor or have shape [B], got shape {tuple(seed.shape)}")
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be None, an int or an integer tensor, got {type(seed).__name__}")


def _canonical_weights(target_weights, num_targets: int, batch: int, device: torch.device) -> torch.Tensor:
    """float32 [B, T] on `device` for per-row weights; T Python weights become a [T] CPU tensor,
    which the kernels read on the host and pass by value (no synchronising host-to-device copy)."""
    if target_weights is None:
        if num_targets > 1:
            raise ValueError(f"target_weights is required to fuse {num_targets} targets")
        target_weights = [1.0]
    if isinstance(target_weights, torch.Tensor):
        check_tensor("target_weights", target_weights, dtypes=FLOAT_DTYPES + (torch.float64,))
        if target_weights.dim() == 1:
            check_dim_size("target_weights", target_weights, 0, num_targets, "the number of targets")
            return target_weights.to(torch.float32)[None, :].expand(batch, num_targets)
        if target_weights.dim() == 2:
            check_dim_size("target_weights", target_weights, 0, batch, "the batch size of draft_tokens")
            check_dim_size("target_weights", target_weights, 1, num_targets, "the number of targets")
            return target_weights.to(torch.float32)
        raise ValueError(f"target_weights must have shape [T] or [B, T], got {tuple(target_weights.shape)}")
    if not isinstance(target_weights, (list, tuple)):
        raise TypeError(f"target_weights must be a sequence of floats or a tensor, got {type(target_weights).__name__}")
    if len(target_weights) != num_targets:
        raise ValueError(f"target_weights has {len(target_weights)} weights but there are {num_targets} targets")
    return constant_float32_vector("target_weights", target_weights)


def _common_float_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _canonical_scores(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Same values in the shared dtype with a unit vocabulary stride; copies only when needed."""
    if tensor.dtype != dtype:  # (tested first: even a no-op .to costs a dispatch per call)
        tensor = tensor.to(dtype)
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _contiguous_int64(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype != torch.int64:
        tensor = tensor.to(torch.int64)
    return tensor if tensor.is_contiguous() else tensor.contiguous()


@host_constant_cache(maxsize=64)
def _all_drafts(num_drafts: int) -> torch.Tensor:
    """num_draft_tokens for "every row uses all K drafts": a CPU scalar the kernels read on the
    host (no device tensor is built), made once per K; nothing writes it."""
    return torch.tensor(num_drafts, dtype=torch.int64, device="cpu")


def _row_seeds(seed, device: torch.device, greedy: bool) -> torch.Tensor:
    """The canonical seed: [B] per-row seeds, or a 0-dim base seed that the implementations spread
    over the rows. Python ints and greedy calls become CPU scalars, read on the host by the
    kernels: no device kernel runs for them."""
    if greedy:
        return _unread_seed()
    if seed is None:
        return torch.randint(torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max, (), dtype=torch.int64, device=device)
    if isinstance(seed, int):
        return torch.tensor(_as_int64(seed), dtype=torch.int64)
    return _contiguous_int64(seed)


def _spread_row_seeds(seed: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """[B] int64 row seeds on `device` from a seed tensor: a [B] tensor as it is, a 0-dim base seed
    spread over the rows exactly as the implementations spread it (reference.row_seeds)."""
    if seed.dim() == 1:
        return seed.to(device=device, dtype=torch.int64)
    stride = _as_int64(reference.ROW_SEED_STRIDE)
    return seed.to(device=device, dtype=torch.int64) + torch.arange(batch, dtype=torch.int64, device=device) * stride


@host_constant_cache(maxsize=1)
def _unread_seed() -> torch.Tensor:
    """What greedy mode passes as its seed, which nothing reads: one shared CPU scalar."""
    return torch.zeros((), dtype=torch.int64, device="cpu")


def _as_int64(value: int) -> int:
    """Any Python int, wrapped to a signed 64-bit value."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _describe_invalid_rows(case: dict, invalid_rows: torch.Tensor) -> str:
    """Names each invalid row with the reasons the reference finds for it (error path only)."""
    reasons = reference.possible_invalid_row_reasons(**case)
    lines = []
    for row in invalid_rows.tolist():
        found = [reason for reason, mask in reasons.items() if bool(mask[row])]
        lines.append(f"  row {row}: {'; '.join(found) if found else 'rejected by the backend kernel'}")
    return f"speculative_verify: {len(lines)} invalid row(s) (strict=True):\n" + "\n".join(lines)


_dispatch.register("speculative_verify", "reference", reference.speculative_verify)


# Must agree with kMaxSpeculativeTargets in csrc/common/speculative.h.
MAX_KERNEL_TARGETS = 8


def _compiled_refusal(*, targets, draft, **_) -> Optional[str]:
    """Why the C++/CUDA kernels cannot take this call, or None."""
    if len(targets) > MAX_KERNEL_TARGETS:
        return f"the speculative_verify kernels fuse at most {MAX_KERNEL_TARGETS} targets, got {len(targets)}"
    dtype = targets[0].dtype
    if dtype not in FLOAT_DTYPES:
        return f"the speculative_verify kernels take fp32/bf16/fp16 inputs, got {dtype}"
    if any(t.dtype != dtype for t in targets) or (draft is not None and draft.dtype != dtype):
        return "the speculative_verify kernels need the targets and the draft in one dtype"
    return None


# Must agree with the grid limit checked in csrc/cuda/speculative_verify.cu (rows and positions are grid y/z).
MAX_CUDA_GRID_ROWS = 65535


def _cuda_refusal(*, draft_tokens, **case) -> Optional[str]:
    """Why the CUDA kernels cannot take this call, or None."""
    reason = _compiled_refusal(**case)
    if reason is None:
        batch, num_drafts = draft_tokens.shape
        if batch > MAX_CUDA_GRID_ROWS or num_drafts + 1 > MAX_CUDA_GRID_ROWS:
            reason = (f"the CUDA speculative_verify grid takes at most {MAX_CUDA_GRID_ROWS} rows and "
                      f"{MAX_CUDA_GRID_ROWS} positions, got [{batch}, {num_drafts + 1}]")
    return reason


def _compiled_speculative_verify(*, draft_tokens, targets, target_weights, draft, num_draft_tokens, inputs_are_logits, temperature, greedy, seed):
    return torch.ops.collab_ops.speculative_verify(
        draft_tokens, list(targets), target_weights, draft, num_draft_tokens, inputs_are_logits, temperature, greedy, seed
    )


if _availability.extension() is not None:

    @torch.library.register_fake("collab_ops::speculative_verify")
    def _speculative_verify_fake(draft_tokens, targets, target_weights, draft, num_draft_tokens, inputs_are_logits, temperature, greedy, seed):
        batch, num_drafts = draft_tokens.shape
        return (
            draft_tokens.new_empty((batch, num_drafts + 1), dtype=torch.int64),
            draft_tokens.new_empty((batch,), dtype=torch.int64),
            draft_tokens.new_empty((batch,), dtype=torch.int64),
        )

    _dispatch.register("speculative_verify", "cpu", _compiled_speculative_verify, supports=_compiled_refusal)
    _dispatch.register("speculative_verify", "cuda", _compiled_speculative_verify, supports=_cuda_refusal)
