"""Public logit-fusion ops: `fuse_logits`, `fused_sample`, `dynamic_fusion_weights`.

Each function validates its arguments (shapes, dtypes, devices and Python scalars only, so no
host synchronisation), brings them into one canonical form and hands that to the backend chosen
by `collab_ops._dispatch`. Every backend implementation is called positionally with exactly:

    fuse_logits(logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref,
                vocab_size, output_logprobs) -> Tensor[B, vocab_size] float32
    fused_sample(logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref,
                 vocab_size, temperature, top_k, top_p, min_p, greedy, seed) -> Tensor[B] int64
    dynamic_fusion_weights(large, experts, base, grid, vocab_size) -> Tensor[B, T] float32

where `logits` is a list of the caller's `[B, V_k]` tensors (original dtypes and strides, never
cast or copied), `weights` float32: a `[B, K]` tensor of per-row weights on their device, or, for
a list of K floats, a `[K]` CPU tensor that the kernels read on the host and pass by value (a
device tensor would cost a synchronising host-to-device copy per call and could not be captured in
a CUDA graph), `temperatures` a list of K floats, `plausibility_alpha` None or a float,
`plausibility_ref` and `vocab_size` ints, `seed` an int64 tensor of shape () or [B] on the
device (None exactly when `greedy`), `grid` a float32 `[G]` tensor on the device. The same
arguments, by name, are the `case` that a backend's `supports(**case)` sees, so a kernel can
refuse, say, more than 8 models; the reference accepts any K.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import _availability, _dispatch
from .._validation import (
    FLOAT_DTYPES,
    canonical_seed,
    check_bool,
    check_choice,
    check_dim_size,
    check_float32,
    check_in_range,
    check_int,
    check_positive,
    check_same_device,
    check_seed,
    check_tensor,
    constant_float32_vector,
    host_constant_cache,
)
from ..reference import fusion as reference

OUTPUTS = ("logprobs", "logits")
# float64 logits are accepted so that tests can ask the reference for a float64 oracle through
# the public API; the result then is float64 and compiled kernels refuse the case in `supports`.
LOGIT_DTYPES = FLOAT_DTYPES + (torch.float64,)
WEIGHT_DTYPES = LOGIT_DTYPES
# Fan et al.'s search grid: 0, 0.1, ..., 2.0.
DEFAULT_GRID_POINTS = 21
DEFAULT_GRID_STEP = 0.1

Weights = Union[Sequence[float], torch.Tensor]


def _check_model_list(name: str, tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of 2-D tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError(f"{name} must hold at least one tensor, got an empty {type(tensors).__name__}")
    return [check_tensor(f"{name}[{i}]", t, ndim=2, dtypes=LOGIT_DTYPES) for i, t in enumerate(tensors)]


def _check_batch(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> int:
    first_name, first = named_tensors[0]
    for name, tensor in named_tensors[1:]:
        check_dim_size(name, tensor, 0, first.shape[0], f"the batch size of {first_name}")
    return first.shape[0]


def _common_vocab_size(named_tensors: Sequence[tuple[str, torch.Tensor]], vocab_size) -> int:
    """`vocab_size`, or the smallest width when None; every model must have that many columns."""
    if vocab_size is None:
        name, narrowest = min(named_tensors, key=lambda item: item[1].shape[1])
        if narrowest.shape[1] == 0:
            raise ValueError(f"{name} has no columns (shape {tuple(narrowest.shape)})")
        return narrowest.shape[1]
    vocab_size = check_int("vocab_size", vocab_size, minimum=1)
    for name, tensor in named_tensors:
        if tensor.shape[1] < vocab_size:
            raise ValueError(
                f"vocab_size={vocab_size} is larger than {name}, which has {tensor.shape[1]} columns"
            )
    return vocab_size


def _canonical_weights(weights: Weights, num_models: int, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(weights, torch.Tensor):
        check_tensor("weights", weights, dtypes=WEIGHT_DTYPES)
        if tuple(weights.shape) != (batch, num_models):
            raise ValueError(
                f"weights must be K={num_models} floats or a [B, K] = [{batch}, {num_models}] tensor "
                f"of per-row weights, got a tensor of shape {tuple(weights.shape)}"
            )
        return weights.to(torch.float32)
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a list of K floats or a [B, K] tensor, got {type(weights).__name__}")
    if len(weights) != num_models:
        raise ValueError(f"weights has {len(weights)} entries but logits has K={num_models} models")
    return constant_float32_vector("weights", weights)


def _canonical_temperatures(temperatures, num_models: int) -> list[float]:
    if temperatures is None:
        return [1.0] * num_models
    if not isinstance(temperatures, (list, tuple)):
        raise TypeError(f"temperatures must be a list of K floats, got {type(temperatures).__name__}")
    if len(temperatures) != num_models:
        raise ValueError(f"temperatures has {len(temperatures)} entries but logits has K={num_models} models")
    return [check_positive(f"temperatures[{k}]", t) for k, t in enumerate(temperatures)]


def _fusion_case(
    logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref, vocab_size
) -> tuple[dict, torch.device, int]:
    """The canonical fusion arguments (in impl order), the device and the batch size."""
    logits = _check_model_list("logits", logits)
    names = [f"logits[{k}]" for k in range(len(logits))]
    named = list(zip(names, logits))
    weight_tensor = weights if isinstance(weights, torch.Tensor) else None
    device = check_same_device(named + [("weights", weight_tensor)])
    batch = _check_batch(named)
    num_models = len(logits)
    if plausibility_alpha is not None:
        plausibility_alpha = check_in_range("plausibility_alpha", plausibility_alpha, 0.0, 1.0, low_open=True)
    plausibility_ref = check_int("plausibility_ref", plausibility_ref, minimum=0)
    if plausibility_ref >= num_models:
        raise ValueError(f"plausibility_ref={plausibility_ref} is not a model index (K={num_models})")
    case = dict(
        logits=logits,
        weights=_canonical_weights(weights, num_models, batch, device),
        temperatures=_canonical_temperatures(temperatures, num_models),
        normalize=check_bool("normalize", normalize),
        plausibility_alpha=plausibility_alpha,
        plausibility_ref=plausibility_ref,
        vocab_size=_common_vocab_size(named, vocab_size),
    )
    return case, device, batch


def fuse_logits(
    logits: Sequence[torch.Tensor],
    weights: Weights,
    *,
    temperatures: Optional[Sequence[float]] = None,
    normalize: bool = True,
    plausibility_alpha: Optional[float] = None,
    plausibility_ref: int = 0,
    vocab_size: Optional[int] = None,
    output: str = "logprobs",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Fuse K models' next-token logits into one float32 `[B, vocab_size]` score.

    s(x) = Σ_k w_k · z_k(x), z_k = log_softmax(l_k / T_k) if `normalize` else l_k / T_k.

    Args:
        logits: K tensors `[B, V_k]` (fp32/bf16/fp16, one device, may differ in dtype and width;
            float64 too, for which the result is float64 and only the reference serves).
        weights: K floats, or a `[B, K]` tensor of per-row weights.
        temperatures: K positive floats (default all 1).
        normalize: fuse log-probabilities (True) or temperature-scaled raw logits (False).
        plausibility_alpha: α in (0, 1]: exclude tokens with p_ref < α · max p_ref, p_ref the
            softmax of model `plausibility_ref` at its temperature (Li et al.'s V_head).
        vocab_size: the shared vocabulary; columns at or beyond it are ignored. Default: the
            smallest V_k. A model narrower than vocab_size is an error.
        output: "logprobs" (log_softmax of s) or "logits" (s).
        backend: None (best available, or COLLAB_OPS_BACKEND), "reference", "cpu", "cuda", "triton".

    A −inf in a model with non-zero weight excludes that token (for either sign of the weight);
    a model with weight 0 is ignored entirely in that row. Rows with every token excluded come back
    all −inf; rows where a participating model has a NaN or +inf come back all NaN
    (see `collab_ops.reference.fusion`). The reference accepts any K; compiled kernels may refuse
    large K, in which case dispatch falls back or names the reason.
    """
    case, device, _ = _fusion_case(
        logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref, vocab_size
    )
    case["output_logprobs"] = check_choice("output", output, OUTPUTS) == "logprobs"
    impl = _dispatch.dispatch("fuse_logits", device, backend, **case)
    return impl.fn(*case.values())


def _layout(tensors: Sequence[torch.Tensor], weights: Weights) -> tuple:
    """What checking and dispatching `fuse_logits` depend on, besides the options: every input's
    shape, strides, dtype and device, and the weights list itself (or its tensor's layout)."""
    tensor_layout = tuple((t.shape, t.stride(), t.dtype, t.device) for t in tensors)
    if isinstance(weights, torch.Tensor):
        return tensor_layout, (weights.shape, weights.dtype, weights.device)
    return tensor_layout, tuple(weights)


class PreparedFuseLogits:
    """`fuse_logits` with fixed options for a loop that calls it with inputs of one layout (a
    decoding loop: new logits and, for per-row weights, a new weights tensor every step).

    The first call, and any call whose inputs differ in shape, strides, dtype or device (or whose
    weights list differs), checks and dispatches as `fuse_logits` does; the others reuse that
    check and the chosen implementation, which saves the Python validation (most of a small
    call's host time). Results are `fuse_logits`'s.
    """

    def __init__(self, **options):
        self._options = options
        self._layout: Optional[tuple] = None

    def __call__(self, logits: Sequence[torch.Tensor], weights: Weights) -> torch.Tensor:
        layout = _layout(logits, weights) if isinstance(logits, (list, tuple)) else None
        if layout is None or layout != self._layout:
            options = dict(self._options)
            output = options.pop("output", "logprobs")
            backend = options.pop("backend", None)
            case, device, _ = _fusion_case(logits, weights, **{
                "temperatures": None, "normalize": True, "plausibility_alpha": None, "plausibility_ref": 0,
                "vocab_size": None, **options})
            case["output_logprobs"] = check_choice("output", output, OUTPUTS) == "logprobs"
            self._implementation = _dispatch.dispatch("fuse_logits", device, backend, **case)
            self._case, self._layout = case, layout
            return self._implementation.fn(*case.values())
        self._case["logits"] = list(logits)
        if isinstance(weights, torch.Tensor):
            self._case["weights"] = weights.to(torch.float32)
        return self._implementation.fn(*self._case.values())


def fused_sample(
    logits: Sequence[torch.Tensor],
    weights: Weights,
    *,
    temperatures: Optional[Sequence[float]] = None,
    normalize: bool = True,
    plausibility_alpha: Optional[float] = None,
    plausibility_ref: int = 0,
    vocab_size: Optional[int] = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    greedy: bool = False,
    seed: Union[None, int, torch.Tensor] = None,
    strict: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Sample one token per row from the fused distribution: int64 `[B]`.

    The fusion options are those of `fuse_logits`. Sampling follows Hugging Face's warpers in
    their order: softmax(s / temperature), then top_k (keep scores ≥ the k-th largest; 0 = off),
    top_p (keep the smallest most-probable set with mass ≥ top_p; ties at its edge are kept;
    1 = off), min_p (drop p < min_p · max p; 0 = off); the most probable token always survives.
    `greedy=True` returns argmax s (first index on ties) and ignores the sampling options and seed
    (which are still checked).

    `seed`: an int, an int64 tensor (scalar, or `[B]` for one seed per row, on the inputs'
    device), or None to draw a fresh seed from torch's default CPU generator, so that
    `torch.manual_seed` makes unseeded calls reproducible. The same seed gives the same tokens on
    the same backend; different backends use different random streams.

    Rows where every token is excluded, or where a participating model has a NaN or +inf, get −1;
    the check happens inside the kernel without host synchronisation. `strict=True` instead raises
    ValueError naming those rows, at the cost of one synchronisation.
    """
    case, device, batch = _fusion_case(
        logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref, vocab_size
    )
    case["temperature"] = check_positive("temperature", temperature)
    case["top_k"] = check_int("top_k", top_k, minimum=0)
    case["top_p"] = check_in_range("top_p", top_p, 0.0, 1.0, low_open=True)
    case["min_p"] = check_in_range("min_p", min_p, 0.0, 1.0)
    case["greedy"] = check_bool("greedy", greedy)
    if greedy:  # the seed is unused, but a bad one is still refused (scalar checks always run)
        check_seed("seed", seed, device=device, batch=batch)
        case["seed"] = None
    else:
        case["seed"] = canonical_seed("seed", seed, device=device, batch=batch)
    strict = check_bool("strict", strict)
    impl = _dispatch.dispatch("fused_sample", device, backend, **case)
    tokens = impl.fn(*case.values())
    if strict:
        no_token = tokens < 0
        if bool(no_token.any()):
            rows = no_token.nonzero().flatten().tolist()
            raise ValueError(
                f"fused_sample(strict=True): no token can be sampled in row(s) {rows}: every token "
                "is excluded, or a model with non-zero weight (or the plausibility reference) has NaN or +inf"
            )
    return tokens


@host_constant_cache(maxsize=16)
def _default_grid(device: torch.device) -> torch.Tensor:
    """0, 0.1, ..., 2.0 in float32 on `device`, built once per device (three kernels otherwise, every
    decoding step); nothing writes it."""
    steps = torch.arange(DEFAULT_GRID_POINTS, dtype=torch.float64, device=device)
    return (steps * DEFAULT_GRID_STEP).to(torch.float32)


def _canonical_grid(grid, device: torch.device) -> torch.Tensor:
    if grid is None:
        return _default_grid(device)
    if isinstance(grid, torch.Tensor):
        check_tensor("grid", grid, ndim=1, dtypes=WEIGHT_DTYPES)
        if grid.device != device:
            raise ValueError(f"grid is on {grid.device} but the inputs are on {device}")
        values = grid if grid.dtype == torch.float32 else grid.to(torch.float32)
    elif isinstance(grid, (list, tuple)):
        values = torch.tensor([check_float32(f"grid[{i}]", v) for i, v in enumerate(grid)], dtype=torch.float32,
                              device=device)
    else:
        raise TypeError(f"grid must be a list of floats or a 1-D tensor, got {type(grid).__name__}")
    if values.numel() == 0:
        raise ValueError("grid must hold at least one candidate weight")
    return values


def dynamic_fusion_weights(
    large: torch.Tensor,
    experts: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    grid: Union[None, Sequence[float], torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Per-row expert weights `[B, T]` (float32; float64 for float64 inputs, which only the
    reference serves, as in `fuse_logits`) of dynamic logits fusion (Fan et al., NeurIPS 2024).

    For every row and every expert t, independently of the other experts, picks α_t in `grid`
    (default 0, 0.1, ..., 2.0) minimising
    (KL(P̃_t‖P) − KL(Q_t‖Q))² + (KL(P‖P̃_t) − KL(Q‖Q_t))², with P = softmax(large),
    Q = softmax(base), Q_t = softmax(experts[t]), P̃_t = softmax(large + α_t (experts[t] − base)).
    With one expert this is the paper's objective exactly; with several it is the per-expert
    search (see `collab_ops.reference.fusion.dynamic_fusion_weights` for the edge cases).
    Vocabularies are aligned to the narrowest input.

    Fuse with the result as per-row weights, model order [large, base, experts...]:
    `weights = torch.cat([ones, -alpha.sum(1, keepdim=True), alpha], dim=1)`,
    `fuse_logits([large, base, *experts], weights, normalize=False)`.
    """
    large = check_tensor("large", large, ndim=2, dtypes=LOGIT_DTYPES)
    experts = _check_model_list("experts", experts)
    base = check_tensor("base", base, ndim=2, dtypes=LOGIT_DTYPES)
    named = [("large", large)] + [(f"experts[{t}]", e) for t, e in enumerate(experts)] + [("base", base)]
    device = check_same_device(named)
    _check_batch(named)
    case = dict(
        large=large,
        experts=experts,
        base=base,
        grid=_canonical_grid(grid, device),
        vocab_size=_common_vocab_size(named, None),
    )
    impl = _dispatch.dispatch("dynamic_fusion_weights", device, backend, **case)
    return impl.fn(*case.values())


_dispatch.register("fuse_logits", "reference", reference.fuse_logits)
_dispatch.register("fused_sample", "reference", reference.fused_sample)
_dispatch.register("dynamic_fusion_weights", "reference", reference.dynamic_fusion_weights)


# Kernel limits; they must agree with kMaxFusedModels (csrc/common/fusion.h) and kMaxFusionExperts,
# kMaxFusionGrid (csrc/common/dynamic_fusion.h).
MAX_KERNEL_MODELS = 8
MAX_KERNEL_EXPERTS = 8
MAX_KERNEL_GRID = 32


def _fusion_kernel_refusal(logits, kernels: str, max_models: int) -> Optional[str]:
    """Why fusion kernels that take at most `max_models` fp32/bf16/fp16 inputs cannot take these."""
    if len(logits) > max_models:
        return f"{kernels} take at most {max_models} models, got {len(logits)}"
    wide = [k for k, t in enumerate(logits) if t.dtype not in FLOAT_DTYPES]
    if wide:
        return f"{kernels} take fp32/bf16/fp16 inputs, logits[{wide[0]}] is {logits[wide[0]].dtype}"
    return None


def _compiled_fusion_refusal(*, logits, weights, **_) -> Optional[str]:
    """Why the C++/CUDA fusion kernels cannot take this call, or None."""
    return _fusion_kernel_refusal(logits, "the fusion kernels", MAX_KERNEL_MODELS)


# Triton backend (collab_ops/triton/fusion.py): the second GPU path; triton itself is imported
# when a kernel first runs.
from ..triton import fusion as _triton_fusion  # noqa: E402


def _triton_fusion_refusal(*, logits, **_) -> Optional[str]:
    return _fusion_kernel_refusal(logits, "the triton fusion kernels", _triton_fusion.MAX_MODELS)


def _triton_sample_refusal(**case) -> Optional[str]:
    return _triton_fusion_refusal(**case) or _triton_fusion.fused_sample_supports(**case)


_dispatch.register("fuse_logits", "triton", _triton_fusion.fuse_logits, supports=_triton_fusion_refusal)
_dispatch.register("fused_sample", "triton", _triton_fusion.fused_sample, supports=_triton_sample_refusal)


def _compiled_dynamic_fusion_refusal(*, large, experts, base, grid, **_) -> Optional[str]:
    """Why the C++/CUDA dynamic-fusion kernels cannot take this call, or None."""
    if len(experts) > MAX_KERNEL_EXPERTS:
        return f"the dynamic fusion kernels take at most {MAX_KERNEL_EXPERTS} experts, got {len(experts)}"
    if grid.numel() > MAX_KERNEL_GRID:
        return f"the dynamic fusion kernels take at most {MAX_KERNEL_GRID} grid candidates, got {grid.numel()}"
    if any(t.dtype not in FLOAT_DTYPES for t in (large, base, *experts)):
        return "the dynamic fusion kernels take fp32/bf16/fp16 inputs"
    return None


def _compiled_fuse_logits(logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref, vocab_size, output_logprobs):
    return torch.ops.collab_ops.fuse_logits(
        list(logits), weights, temperatures, normalize, plausibility_alpha, plausibility_ref, vocab_size, output_logprobs
    )


def _compiled_fused_sample(
    logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref, vocab_size,
    temperature, top_k, top_p, min_p, greedy, seed,
):
    if seed is None and not greedy:
        raise ValueError("fused_sample kernels need a seed tensor unless greedy (the public wrapper draws one)")
    return torch.ops.collab_ops.fused_sample(
        list(logits), weights, temperatures, normalize, plausibility_alpha, plausibility_ref, vocab_size,
        temperature, top_k, top_p, min_p, greedy, seed,
    )


def _compiled_dynamic_fusion_weights(large, experts, base, grid, vocab_size):
    return torch.ops.collab_ops.dynamic_fusion_weights(large, list(experts), base, grid, vocab_size)


if _availability.extension() is not None:

    @torch.library.register_fake("collab_ops::fuse_logits")
    def _fuse_logits_fake(logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref, vocab_size, output_logprobs):
        torch._check(len(logits) >= 1)
        return logits[0].new_empty((logits[0].shape[0], vocab_size), dtype=torch.float32)

    @torch.library.register_fake("collab_ops::fused_sample")
    def _fused_sample_fake(logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref, vocab_size,
                           temperature, top_k, top_p, min_p, greedy, seed):
        torch._check(len(logits) >= 1)
        return logits[0].new_empty((logits[0].shape[0],), dtype=torch.int64)

    @torch.library.register_fake("collab_ops::dynamic_fusion_weights")
    def _dynamic_fusion_weights_fake(large, experts, base, grid, vocab_size):
        return large.new_empty((large.shape[0], len(experts)), dtype=torch.float32)

    for _backend in ("cpu", "cuda"):
        _dispatch.register("fuse_logits", _backend, _compiled_fuse_logits, supports=_compiled_fusion_refusal)
        _dispatch.register("fused_sample", _backend, _compiled_fused_sample, supports=_compiled_fusion_refusal)
        _dispatch.register(
            "dynamic_fusion_weights", _backend, _compiled_dynamic_fusion_weights, supports=_compiled_dynamic_fusion_refusal
        )
