"""Reference speculative verification: the oracle every backend of `speculative_verify` is tested against.

Written for clarity, not speed; every distribution is computed in float64. The entry point,
`speculative_verify`, has the canonical implementation signature documented in
`collab_ops.ops.speculative`; the public wrapper validates and canonicalises the arguments.

Distributions, for a row with drafts x_0..x_{K-1} and target positions 0..K:

* Target (possibly several models fused, EFT speculative up-scaling), with per-row weights w_k:
      z_k = log_softmax(l_k / temperature)      for logits
      z_k = log(p_k)                            for probabilities (need not sum to 1)
      p_i = softmax(sum over k with w_k != 0 of w_k * z_k)
  This is the reference `fuse_logits(normalize=True)` followed by a softmax, with its rules: a
  model of weight 0 is skipped (its −inf or NaN entries have no effect), and a −inf logit or zero
  probability in a model of non-zero weight excludes the token whatever the sign of the weight.
* Draft: q_i = softmax(d_i / temperature) for logits, softmax(log d_i) (= d_i / sum d_i) for
  probabilities; with no draft distribution (n-gram or other deterministic drafters) q_i is one-hot
  at x_i.

Sample mode (Leviathan et al. 2023; Chen et al. 2023), for a row using n = num_draft_tokens drafts:
  accept x_i, i < n, while u_i * q_i(x_i) < p_i(x_i), that is with probability min(1, p_i/q_i).
  At the first rejection j emit a sample of max(0, p_j − q_j) renormalised; if that residual is zero
  everywhere (only possible when p_j == q_j up to rounding and q_j(x_j) == 0) emit a sample of p_j.
  If all n drafts are accepted emit a sample of p_n, the bonus token.
  With a one-hot q the residual is p_j with x_j removed, renormalised.
Greedy mode: accept x_i while x_i == argmax p_i (ties go to the smallest id); then emit argmax p_j.

Random numbers (sample mode): row b seeds a CPU `torch.Generator` with seed[b] folded to 32 bits
(the generator keeps only 32 bits of a seed; folding lets the high bits count too) and draws K+1
float64 uniforms in [0, 1): u_0..u_{K-1} decide acceptance and u_K picks the emitted token by
inverse CDF. A row's output therefore depends only on its own inputs and seed, not on the batch
around it nor on the device. Other backends draw their own random streams. (Reading the seeds on
the host synchronises; the reference is the oracle, not a fast path.)

Invalid rows emit nothing: tokens all −1, num_emitted 0, num_accepted 0. Kernels find them as part
of the computation, without a host synchronisation. A row is invalid when
  * num_draft_tokens[b] lies outside [0, K];
  * a draft id at a used position (i < n) lies outside [0, V);
  * the target distribution is undefined (NaN) at a used position 0..n: NaN or +inf inputs,
    negative probabilities, or every token excluded;
  * in sample mode, the draft distribution is undefined at a used position 0..n−1.
Positions past n are never read, so ragged rows may pad draft_tokens with anything (e.g. −1).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import fusion

NUM_DRAFT_TOKENS_OUT_OF_RANGE = "num_draft_tokens outside [0, K]"
DRAFT_TOKEN_OUT_OF_RANGE = "a used draft token id outside [0, V)"
TARGET_UNDEFINED = "target distribution undefined (NaN input, negative probability or every token excluded)"
DRAFT_UNDEFINED = "draft distribution undefined (NaN input, negative probability or every token excluded)"


def fused_target_probs(
    targets: Sequence[torch.Tensor],
    target_weights: torch.Tensor,
    inputs_are_logits: bool,
    temperature: float,
) -> torch.Tensor:
    """p [B, K+1, V] float64 from T targets [B, K+1, V] and weights ([B, T] per row, or [T] on the CPU).

    Every (row, position) is one fuse_logits row, so the target is fused exactly as fuse_logits
    fuses (exclusions, weight-0 models, NaN rows)."""
    batch, positions, vocab_size = targets[0].shape
    scores_per_model = []
    for target in targets:
        values = target.to(torch.float64).reshape(batch * positions, vocab_size)
        # log p is a logit vector whose log_softmax is log(p / sum p).
        scores_per_model.append(values if inputs_are_logits else torch.log(values))
    fused = fusion.fuse_logits(
        scores_per_model,
        fusion.per_row_weights(target_weights, batch, targets[0].device).to(torch.float64).repeat_interleave(
            positions, dim=0
        ),
        temperatures=[temperature if inputs_are_logits else 1.0] * len(targets),
        normalize=True,
        plausibility_alpha=None,
        plausibility_ref=0,
        vocab_size=vocab_size,
        output_logprobs=False,
    )
    # An all −inf (every token excluded) or NaN score row becomes NaN here: an undefined target.
    return torch.softmax(fused, dim=-1).reshape(batch, positions, vocab_size)


def draft_probs(
    draft: Optional[torch.Tensor],
    draft_tokens: torch.Tensor,
    vocab_size: int,
    inputs_are_logits: bool,
    temperature: float,
) -> torch.Tensor:
    """q [B, K, V] float64; one-hot at the draft ids (clamped into range) when `draft` is None."""
    if draft is None:
        ids = draft_tokens.clamp(0, vocab_size - 1)
        return torch.nn.functional.one_hot(ids, vocab_size).to(torch.float64)
    values = draft.to(torch.float64)
    if inputs_are_logits:
        return torch.softmax(values / temperature, dim=-1)
    return torch.softmax(torch.log(values), dim=-1)


def invalid_row_reasons(
    draft_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    draft_distribution: Optional[torch.Tensor],
    num_draft_tokens: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Each reason a row can be invalid, mapped to a bool [B] mask of the rows it applies to.

    `draft_distribution` is the draft's q to check, or None when the call does not read one
    (greedy mode, or drafts given without probabilities)."""
    num_drafts = draft_tokens.shape[1]
    vocab_size = target_probs.shape[-1]
    draft_positions = torch.arange(num_drafts, device=draft_tokens.device)
    target_positions = torch.arange(num_drafts + 1, device=draft_tokens.device)
    used_drafts = draft_positions[None, :] < num_draft_tokens[:, None]
    used_targets = target_positions[None, :] <= num_draft_tokens[:, None]
    reasons = {
        NUM_DRAFT_TOKENS_OUT_OF_RANGE: (num_draft_tokens < 0) | (num_draft_tokens > num_drafts),
        DRAFT_TOKEN_OUT_OF_RANGE: (used_drafts & ((draft_tokens < 0) | (draft_tokens >= vocab_size))).any(-1),
        TARGET_UNDEFINED: (used_targets & target_probs.isnan().any(-1)).any(-1),
    }
    if draft_distribution is not None:
        reasons[DRAFT_UNDEFINED] = (used_drafts & draft_distribution.isnan().any(-1)).any(-1)
    return reasons


def row_uniforms(seed: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] float64 uniforms in [0, 1), row b drawn from a CPU generator seeded with seed[b]."""
    uniforms = torch.empty(seed.shape[0], count, dtype=torch.float64)
    generator = torch.Generator(device="cpu")
    for row, row_seed in enumerate(seed.tolist()):
        generator.manual_seed((row_seed ^ (row_seed >> 32)) & 0xFFFF_FFFF)
        uniforms[row] = torch.rand(count, generator=generator, dtype=torch.float64)
    return uniforms.to(seed.device)


def sample_by_inverse_cdf(distribution: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One id per row of an unnormalised non-negative [B, V] distribution, driven by uniforms [B].

    Never returns an id of zero mass: the search goes right past flat stretches of the CDF, and a
    needle rounded up to the total falls back to the last id with mass."""
    cdf = distribution.cumsum(dim=-1)
    needle = uniform * cdf[:, -1]
    ids = torch.searchsorted(cdf, needle[:, None], right=True).squeeze(-1)
    has_mass = distribution > 0
    vocab_size = distribution.shape[-1]
    last_with_mass = vocab_size - 1 - has_mass.flip(-1).int().argmax(-1)
    return torch.minimum(ids, last_with_mass)


def speculative_verify(
    *,
    draft_tokens: torch.Tensor,
    targets: Sequence[torch.Tensor],
    target_weights: torch.Tensor,
    draft: Optional[torch.Tensor],
    num_draft_tokens: torch.Tensor,
    inputs_are_logits: bool,
    temperature: float,
    greedy: bool,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [B, K+1], num_emitted [B], num_accepted [B]), all int64; see the module docstring."""
    batch, num_drafts = draft_tokens.shape
    vocab_size = targets[0].shape[-1]
    device = draft_tokens.device
    rows = torch.arange(batch, device=device)

    target_probs = fused_target_probs(targets, target_weights, inputs_are_logits, temperature)
    q = None if greedy else draft_probs(draft, draft_tokens, vocab_size, inputs_are_logits, temperature)
    reasons = invalid_row_reasons(draft_tokens, target_probs, None if draft is None else q, num_draft_tokens)
    valid = ~torch.stack(list(reasons.values())).any(0)

    # Invalid rows are computed with clamped values and blanked at the end.
    drafts_used = num_draft_tokens.clamp(0, num_drafts)
    ids = draft_tokens.clamp(0, vocab_size - 1)
    used = torch.arange(num_drafts, device=device)[None, :] < drafts_used[:, None]
    drafted_targets = target_probs[:, :num_drafts]
    if greedy:
        accepted = ids == drafted_targets.argmax(-1)
    else:
        uniforms = row_uniforms(seed, num_drafts + 1)
        p_of_draft = drafted_targets.gather(-1, ids[..., None]).squeeze(-1)
        q_of_draft = q.gather(-1, ids[..., None]).squeeze(-1)
        accepted = uniforms[:, :num_drafts] * q_of_draft < p_of_draft
    num_accepted = (accepted & used).long().cumprod(-1).sum(-1)

    # The stop position is the first rejection, or the bonus position when every draft was accepted.
    stop_target = target_probs[rows, num_accepted]
    if greedy:
        final_token = stop_target.argmax(-1)
    else:
        rejected = num_accepted < drafts_used
        # A zero draft row past the last draft makes the bonus residual p itself.
        q_with_bonus = torch.cat([q, q.new_zeros(batch, 1, vocab_size)], dim=1)
        stop_draft = q_with_bonus[rows, num_accepted] * rejected[:, None]
        residual = (stop_target - stop_draft).clamp_min(0)
        residual_is_empty = residual.sum(-1) == 0
        final_distribution = torch.where(residual_is_empty[:, None], stop_target, residual)
        final_token = sample_by_inverse_cdf(final_distribution, uniforms[:, num_drafts])

    positions = torch.arange(num_drafts + 1, device=device)[None, :]
    padded_drafts = torch.cat([draft_tokens, draft_tokens.new_full((batch, 1), -1)], dim=1)
    tokens = torch.where(positions < num_accepted[:, None], padded_drafts, -1)
    tokens = torch.where(positions == num_accepted[:, None], final_token[:, None], tokens)
    tokens = torch.where(valid[:, None], tokens, -1)
    num_accepted = torch.where(valid, num_accepted, 0)
    num_emitted = torch.where(valid, num_accepted + 1, 0)
    return tokens, num_emitted, num_accepted
