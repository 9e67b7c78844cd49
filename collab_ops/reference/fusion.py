"""Pure-PyTorch references of the logit-fusion family: the oracle every backend is tested against.

They take the canonical arguments that `collab_ops.ops.fusion` builds after validation (the same
call every backend receives) and favour clarity over speed. Arithmetic runs in float64 when any
input is float64 and in float32 otherwise, so a test can obtain a float64 oracle by upcasting.

Fusion rules shared by `fuse_logits` and `fused_sample` (DESIGN.md, "Logit arithmetic"):

* Only the first `vocab_size` columns of every model are read; normalisation is over them.
* Model k contributes `w_k · z_k(x)` with `z_k = log_softmax(l_k / T_k)` (normalize) or `l_k / T_k`.
  A model whose weight is 0 in a row does not take part in that row at all: its NaNs and
  −infs are ignored there (no 0·(−inf) = NaN).
* `z_k(x) = −inf` in a model that takes part excludes x (score −inf) whatever the sign of w_k.
* With `plausibility_alpha=α`, x is excluded when `p_ref(x) < α · max p_ref`, p_ref the softmax of
  model `plausibility_ref` at its temperature (regardless of `normalize` and of its weight). A
  reference row that is entirely −inf has no plausible token.
* A row is *poisoned* when a model that takes part in it (non-zero weight, or the plausibility
  reference when α is set) has a NaN or a +inf among its first `vocab_size` columns (of l_k / T_k:
  a finite logit that overflows by its temperature counts as +inf). Either leaves the model's
  distribution undefined, whatever the sign of its weight. `fuse_logits` returns poisoned rows as
  all NaN; `fused_sample` returns −1 for them.
* A row whose tokens are all excluded is all −inf in `fuse_logits` (both outputs) and gives −1 in
  `fused_sample`.
* Finite inputs whose weighted sum overflows float32 (|s(x)| near 3.4e38) are outside the domain:
  a +inf score leaves the distribution undefined (NaN log-probs, −1 in `fused_sample`). The kernels
  add raw logits and normalise afterwards (one read of each input), so with `normalize=True` they
  overflow where this reference, which normalises each model first, may not.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

NO_TOKEN = -1


def per_row_weights(weights: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """[B, K] weights on `device` from the canonical form: [B, K] per-row weights on the device, or
    [K] per-model constants on the CPU (which the kernels take by value)."""
    if weights.dim() == 1:
        return weights.to(device)[None, :].expand(batch, -1)
    return weights


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _log_softmax_keeping_exclusions(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim in which −inf entries stay −inf even in an all −inf row
    (where torch's log_softmax would give NaN)."""
    normaliser = torch.logsumexp(x, dim=-1, keepdim=True)
    return torch.where(x == float("-inf"), x, x - normaliser)


def _undefined_values(scaled: torch.Tensor) -> torch.Tensor:
    """Per row: whether a model's scaled logits hold a NaN or a +inf (the row is poisoned)."""
    return (torch.isnan(scaled) | (scaled == float("inf"))).any(dim=-1)


def fused_scores(
    logits: Sequence[torch.Tensor],
    weights: torch.Tensor,
    temperatures: Sequence[float],
    normalize: bool,
    plausibility_alpha: Optional[float],
    plausibility_ref: int,
    vocab_size: int,
) -> torch.Tensor:
    """The fused score s = Σ_k w_k z_k with exclusions, plausibility mask and poisoned rows as NaN."""
    dtype = _compute_dtype(*logits)
    batch = logits[0].shape[0]
    device = logits[0].device
    row_weights = per_row_weights(weights, batch, device).to(dtype)
    scores = torch.zeros(batch, vocab_size, dtype=dtype, device=device)
    poisoned = torch.zeros(batch, dtype=torch.bool, device=device)

    for k, (model_logits, temperature) in enumerate(zip(logits, temperatures)):
        scaled = model_logits[:, :vocab_size].to(dtype) / temperature
        z = _log_softmax_keeping_exclusions(scaled) if normalize else scaled
        w = row_weights[:, k : k + 1]
        takes_part = w != 0
        # −inf excludes the token for either sign of w; w·(−inf) would be +inf for w < 0.
        term = torch.where(z == float("-inf"), z, w * z)
        scores = scores + torch.where(takes_part, term, torch.zeros_like(term))
        poisoned |= takes_part[:, 0] & _undefined_values(scaled)

    if plausibility_alpha is not None:
        reference = logits[plausibility_ref][:, :vocab_size].to(dtype) / temperatures[plausibility_ref]
        # log(p_ref(x) / max p_ref) = r(x) − max r, compared with log α (α itself could round to 0
        # in the compute dtype). In an all −inf row the difference is NaN and the negated
        # comparison marks every token implausible, as it should.
        log_ratio = reference - reference.max(dim=-1, keepdim=True).values
        implausible = ~(log_ratio >= math.log(plausibility_alpha))
        scores = scores.masked_fill(implausible, float("-inf"))
        poisoned |= _undefined_values(reference)

    return scores.masked_fill(poisoned[:, None], float("nan"))


def fuse_logits(
    logits: Sequence[torch.Tensor],
    weights: torch.Tensor,
    temperatures: Sequence[float],
    normalize: bool,
    plausibility_alpha: Optional[float],
    plausibility_ref: int,
    vocab_size: int,
    output_logprobs: bool,
) -> torch.Tensor:
    """Fused scores `[B, vocab_size]`: log_softmax(s) when `output_logprobs`, else s itself.

    `weights` is `[B, K]` (one weight per row and model); any number K ≥ 1 of models is accepted
    here, although compiled kernels may refuse large K through their dispatch `supports` check.
    All-excluded rows are all −inf, poisoned rows all NaN (see the module docstring).
    """
    scores = fused_scores(
        logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref, vocab_size
    )
    if output_logprobs:
        return _log_softmax_keeping_exclusions(scores)
    return scores


def _keep_top_k(x: torch.Tensor, top_k: int) -> torch.Tensor:
    """HF TopKLogitsWarper: keep every token scoring at least the k-th largest score (ties at the
    k-th value are all kept); k ≥ V keeps everything."""
    if top_k == 0 or top_k >= x.shape[-1]:
        return x
    kth_largest = torch.topk(x, top_k, dim=-1).values[:, -1:]
    return x.masked_fill(x < kth_largest, float("-inf"))


def _keep_top_p(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF TopPLogitsWarper: keep the smallest most-probable set whose mass reaches top_p.

    Stated without reference to a sort order: x is kept iff the mass of the tokens strictly more
    probable than x is below top_p, so tokens tied with the last one needed are all kept, and the
    most probable token always is. top_p = 1 keeps everything (HF does not apply the warper then).
    """
    if top_p >= 1.0:
        return x
    probs = torch.softmax(x, dim=-1)
    sorted_probs = torch.sort(probs, dim=-1, descending=True).values
    cumulative = sorted_probs.cumsum(dim=-1)
    # Index of the first sorted token at which the cumulative mass reaches top_p; rounding can
    # leave the total just below top_p, in which case every token is needed.
    last_needed = (cumulative < top_p).sum(dim=-1, keepdim=True).clamp(max=x.shape[-1] - 1)
    cutoff = sorted_probs.gather(-1, last_needed)
    return x.masked_fill(probs < cutoff, float("-inf"))


def _keep_min_p(x: torch.Tensor, min_p: float) -> torch.Tensor:
    """HF MinPLogitsWarper: drop tokens with p < min_p · max p, p the distribution after the
    temperature (the ratio p / max p does not change when earlier filters renormalise)."""
    if min_p == 0.0:
        return x
    ratio_to_max = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return x.masked_fill(ratio_to_max < min_p, float("-inf"))


def _draw(probs: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """One multinomial draw per row: a scalar seed seeds one generator for the whole batch, a
    `[B]` seed seeds one generator per row (so a row's token depends only on its own seed)."""
    seeds = seed.reshape(-1).tolist()
    if len(seeds) == 1:
        generator = torch.Generator(device=probs.device).manual_seed(seeds[0])
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    tokens = []
    for row_probs, row_seed in zip(probs, seeds):
        generator = torch.Generator(device=probs.device).manual_seed(row_seed)
        tokens.append(torch.multinomial(row_probs, 1, generator=generator))
    return torch.cat(tokens)


def fused_sample(
    logits: Sequence[torch.Tensor],
    weights: torch.Tensor,
    temperatures: Sequence[float],
    normalize: bool,
    plausibility_alpha: Optional[float],
    plausibility_ref: int,
    vocab_size: int,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    greedy: bool,
    seed: Optional[torch.Tensor],
) -> torch.Tensor:
    """One token per row from softmax(s / temperature) after HF's warpers, in HF's order:
    temperature → top_k → top_p → min_p (each sees the previous one's output). Every filter keeps
    at least the most probable token. `greedy` returns argmax s (first index on ties) and ignores
    the sampling options and `seed`, which may then be None.

    Rows that are poisoned, all excluded, or have a +inf score get −1 (`NO_TOKEN`).
    """
    scores = fused_scores(
        logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref, vocab_size
    )
    if scores.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    no_token = (
        torch.isnan(scores).any(dim=-1)
        | (scores == float("inf")).any(dim=-1)
        | (scores == float("-inf")).all(dim=-1)
    )
    # Give undefined rows a harmless distribution so the filters and the draw run; their result
    # is replaced by −1 below.
    scores = scores.masked_fill(no_token[:, None], 0.0)

    if greedy:
        tokens = torch.argmax(scores, dim=-1)
    else:
        # Shifted by the row maximum first, which changes no filter or probability, so that a small
        # temperature cannot overflow finite scores to inf.
        x = (scores - scores.max(dim=-1, keepdim=True).values) / temperature
        x = _keep_top_k(x, top_k)
        x = _keep_top_p(x, top_p)
        x = _keep_min_p(x, min_p)
        tokens = _draw(torch.softmax(x, dim=-1), seed)
    return tokens.masked_fill(no_token, NO_TOKEN)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) per row from log-probabilities; terms with a(x) = 0 are 0, a(x) > 0 = b(x) gives +inf."""
    a = torch.exp(log_a)
    terms = torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a))
    return terms.sum(dim=-1)


def dynamic_fusion_weights(
    large: torch.Tensor,
    experts: Sequence[torch.Tensor],
    base: torch.Tensor,
    grid: torch.Tensor,
    vocab_size: int,
) -> torch.Tensor:
    """Per-row fusion weights `[B, T]` of dynamic logits fusion (Fan et al., NeurIPS 2024).

    With P = softmax(large), Q = softmax(base), Q_t = softmax(expert_t) over the first
    `vocab_size` columns, expert t's weight in row b is, independently of the other experts,

        α_t = argmin over α in grid of (KL(P̃_t‖P) − KL(Q_t‖Q))² + (KL(P‖P̃_t) − KL(Q‖Q_t))²,
        P̃_t = softmax(large + α (expert_t − base)),

    i.e. the per-expert search of the paper: the objective Σ_t [...] of DESIGN.md is minimised
    one α_t at a time, each with only expert t in P̃ and only expert t's term. With one expert this
    is exactly the joint objective. Ties go to the earliest grid entry. Details:

    * α = 0 gives P̃ = P exactly. For α ≠ 0 a token that is −inf in large, expert_t or base is
      excluded from P̃ (no ∞ − ∞), which makes KL(P‖P̃) infinite when P still has mass there.
    * A candidate whose objective is NaN or +inf never beats a finite one; if none is finite the
      first grid entry is returned.
    * α_t is NaN in rows where large, base or expert_t has a NaN among the compared columns.
    """
    dtype = _compute_dtype(large, base, *experts)
    large = large[:, :vocab_size].to(dtype)
    base = base[:, :vocab_size].to(dtype)
    candidates = grid.to(device=large.device, dtype=dtype)
    log_p = torch.log_softmax(large, dim=-1)
    log_q = torch.log_softmax(base, dim=-1)

    columns = []
    for expert in experts:
        expert = expert[:, :vocab_size].to(dtype)
        log_q_t = torch.log_softmax(expert, dim=-1)
        target_forward = _kl(log_q_t, log_q)
        target_reverse = _kl(log_q, log_q_t)
        excluded = (large == float("-inf")) | (expert == float("-inf")) | (base == float("-inf"))

        objectives = []
        for alpha in candidates.tolist():
            if alpha == 0.0:
                fused = large
            else:
                fused = (large + alpha * (expert - base)).masked_fill(excluded, float("-inf"))
            log_p_fused = torch.log_softmax(fused, dim=-1)
            objective = (_kl(log_p_fused, log_p) - target_forward) ** 2 + (
                _kl(log_p, log_p_fused) - target_reverse
            ) ** 2
            objectives.append(objective.masked_fill(torch.isnan(objective), float("inf")))
        best = torch.argmin(torch.stack(objectives, dim=-1), dim=-1)
        alpha_t = candidates[best]

        poisoned = torch.isnan(large).any(-1) | torch.isnan(base).any(-1) | torch.isnan(expert).any(-1)
        columns.append(alpha_t.masked_fill(poisoned, float("nan")))
    return torch.stack(columns, dim=-1)
