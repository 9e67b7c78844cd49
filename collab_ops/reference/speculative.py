"""Reference speculative verification: the oracle every backend of `speculative_verify` is tested against.

Written for clarity, not speed; every distribution is computed in float64. The entry point,
`speculative_verify`, has the canonical implementation signature documented in
`collab_ops.ops.speculative`; the public wrapper validates and canonicalises the arguments.

Distributions, for a row with drafts x_0..x_{K-1} and target positions 0..K:

* Plain target (one participating model, of weight exactly 1):
      p_i = P_i as given                         for probabilities (never renormalised: each row
                                                 is expected to sum to 1, as in FlashInfer and vLLM)
      p_i = softmax(l_i / temperature)           for logits
* Fused target (several models, or one of weight != 1; EFT speculative up-scaling), with per-row
  weights w_k:
      z_k = log_softmax(l_k / temperature)  for logits,  z_k = log(p_k)  for probabilities
      p_i = softmax(sum over k with w_k != 0 of w_k * z_k)
  This is the reference `fuse_logits(normalize=True)` followed by a softmax, with its rules: a
  model of weight 0 is skipped (its −inf or NaN entries have no effect), and a −inf logit or zero
  probability in a model of non-zero weight excludes the token whatever the sign of the weight.
  (Renormalising each model first would only shift the fused score by a constant per row.)
* Draft: q_i = Q_i as given for probabilities, softmax(d_i / temperature) for logits; with no
  draft distribution (n-gram or other deterministic drafters) q_i is one-hot at x_i.

Sample mode (Leviathan et al. 2023; Chen et al. 2023), for a row using n = num_draft_tokens drafts:
  accept x_i, i < n, while u_i * q_i(x_i) < p_i(x_i), that is with probability min(1, p_i/q_i).
  At the first rejection j (the stop position) emit a sample of max(0, p_j − q_j) renormalised; if
  that residual is zero everywhere (only possible when p_j <= q_j everywhere) emit a sample of
  p_j. If all n drafts are accepted the stop position is n: emit a sample of p_n, the bonus token.
  With a one-hot q the residual is p_j with x_j removed, renormalised.
Greedy mode: accept x_i while x_i == argmax p_i (ties go to the smallest id); then emit argmax p_j.
The temperature is 1 there (the public wrapper passes 1.0): T > 0 moves no argmax nor any row's
validity, and dividing by an extreme T could round distinct logits into a tie.

Random numbers (sample mode): the row seeds are seed[b] (per-row seeds) or base + b · ROW_SEED_STRIDE
(mod 2^64) for one base seed. Row b seeds a CPU `torch.Generator` with its seed folded to 32 bits
(the generator keeps only 32 bits of a seed; folding lets the high bits count too) and draws K+1
float64 uniforms in [0, 1): u_0..u_{K-1} decide acceptance and u_K picks the emitted token by
inverse CDF. A row's output therefore depends only on its own inputs and seed, not on the batch
around it nor on the device. Other backends draw their own random streams. (Reading the seeds on
the host synchronises; the reference is the oracle, not a fast path.)

Invalid rows emit nothing: tokens all −1, num_emitted 0, num_accepted 0. Kernels find them as part
of the computation, without a host synchronisation. Values are checked where the decision reads
them, so a row is invalid when
  * num_draft_tokens[b] lies outside [0, K];
  * a draft id at a used position (i < n) lies outside [0, V);
  * a target row read whole is undefined: NaN, +inf, a negative probability, or no mass (every
    token excluded). Read whole are every used target row 0..n for logits, fused targets and in
    greedy mode, and in sample mode every used draft row 0..n−1 for draft logits;
  * in sample mode, a drafted entry p_i(x_i) or q_i(x_i), i < n, is NaN, negative or +inf;
  * in sample mode with probabilities used as given: the target row at the stop position has such
    an entry or no mass, or (after a rejection) the draft row there has such an entry.
Whether the last rule finds a bad value off the drafted entries depends on where the row's chain
stops, so on its random numbers: backends, which draw different ones, may disagree on such rows.
Positions past n are never read, so ragged rows may pad draft_tokens with anything (e.g. −1).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import fusion

NUM_DRAFT_TOKENS_OUT_OF_RANGE = "num_draft_tokens outside [0, K]"
DRAFT_TOKEN_OUT_OF_RANGE = "a used draft token id outside [0, V)"
TARGET_UNDEFINED = "target distribution undefined at a used position (NaN, +inf, negative probability or no mass)"
DRAFT_UNDEFINED = "draft distribution undefined at a used position (NaN or +inf logit, or every token excluded)"
DRAFTED_ENTRY_UNDEFINED = "a drafted entry p_i(x_i) or q_i(x_i) is NaN, +inf or negative"
STOP_ROW_UNDEFINED = (
    "the stop position's target row (NaN, +inf, negative entry or no mass) or draft row (NaN, +inf or negative entry)"
)

# Row b's seed from one base seed: base + b * 2^64/phi (mod 2^64), so rows get distinct seeds and
# consecutive call seeds do not reuse each other's row streams. Must agree with kRowSeedStride in
# csrc/common/speculative.h.
ROW_SEED_STRIDE = 0x9E3779B97F4A7C15


def row_seeds(seed: torch.Tensor, batch: int) -> list[int]:
    """The signed 64-bit seed of every row: seed [B] per row, or a 0-dim base seed spread over the rows."""
    if seed.dim() == 1:
        return seed.tolist()
    base = int(seed)
    seeds = [(base + row * ROW_SEED_STRIDE) % (1 << 64) for row in range(batch)]
    return [value - (1 << 64) if value >= 1 << 63 else value for value in seeds]


def row_counts(num_draft_tokens: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """num_draft_tokens as [B] int64 on `device`: per row, or one 0-dim count for every row."""
    if num_draft_tokens.dim() == 0:
        return torch.full((batch,), int(num_draft_tokens), dtype=torch.int64, device=device)
    return num_draft_tokens.to(device)


def plain_target_rows(target_weights: torch.Tensor, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] bool: the row's target is one participating model of weight exactly 1, [B] its index)."""
    weights = fusion.per_row_weights(target_weights, batch, device)
    participating = weights != 0
    plain = (participating.sum(-1) == 1) & ((weights == 1).sum(-1) == 1)
    return plain, (weights == 1).int().argmax(-1)


def fused_target_probs(
    targets: Sequence[torch.Tensor],
    target_weights: torch.Tensor,
    inputs_are_logits: bool,
    temperature: float,
) -> torch.Tensor:
    """softmax of the fused score [B, K+1, V] float64 from T targets [B, K+1, V] and weights ([B, T]
    per row, or [T] on the CPU).

    Every (row, position) is one fuse_logits row, so the target is fused exactly as fuse_logits
    fuses (exclusions, weight-0 models, NaN rows). `target_probs` uses this for every row except
    plain probability targets."""
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


def target_probs(
    targets: Sequence[torch.Tensor],
    target_weights: torch.Tensor,
    inputs_are_logits: bool,
    temperature: float,
) -> torch.Tensor:
    """p [B, K+1, V] float64: plain probability targets as given (bad values kept, for the checks),
    every other row the softmax of its fused score."""
    probabilities = fused_target_probs(targets, target_weights, inputs_are_logits, temperature)
    if inputs_are_logits:
        return probabilities
    batch = targets[0].shape[0]
    plain, model = plain_target_rows(target_weights, batch, targets[0].device)
    given = torch.stack([target.to(torch.float64) for target in targets])[model, torch.arange(batch, device=model.device)]
    return torch.where(plain[:, None, None], given, probabilities)


def draft_probs(
    draft: Optional[torch.Tensor],
    draft_tokens: torch.Tensor,
    vocab_size: int,
    inputs_are_logits: bool,
    temperature: float,
) -> torch.Tensor:
    """q [B, K, V] float64: as given for probabilities; one-hot at the draft ids (clamped into
    range) when `draft` is None."""
    if draft is None:
        ids = draft_tokens.clamp(0, vocab_size - 1)
        return torch.nn.functional.one_hot(ids, vocab_size).to(torch.float64)
    values = draft.to(torch.float64)
    if inputs_are_logits:
        return torch.softmax(values / temperature, dim=-1)
    return values


def _bad_entries(values: torch.Tensor) -> torch.Tensor:
    """Entries that are not a valid probability: NaN, negative or +inf."""
    return ~((values >= 0) & (values < float("inf")))


def _undefined_rows(distribution: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [...]: a bad entry, or no mass at all."""
    return _bad_entries(distribution).any(-1) | (distribution.sum(-1) == 0)


def invalid_row_reasons(
    draft_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    draft_distribution: Optional[torch.Tensor],
    num_draft_tokens: torch.Tensor,
    *,
    target_read_whole: torch.Tensor,
    draft_read_whole: bool,
    stop: Optional[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Each reason a row can be invalid, mapped to a bool [B] mask of the rows it applies to.

    `target_probs` from `target_probs`; `draft_distribution` is the draft's q to check, or None
    when the call reads none (greedy mode, or drafts given without probabilities);
    `target_read_whole` [B] and `draft_read_whole` say which rows are read whole (see the module
    docstring). `stop` [B] is each row's stop position, or None for the rows that are invalid
    whatever their stop position might be (a description of a backend's verdict: its random
    numbers, and so its stop positions, are not the reference's)."""
    num_drafts = draft_tokens.shape[1]
    batch, positions, vocab_size = target_probs.shape
    device = draft_tokens.device
    used_drafts = torch.arange(num_drafts, device=device)[None, :] < num_draft_tokens[:, None]
    used_targets = torch.arange(positions, device=device)[None, :] <= num_draft_tokens[:, None]
    ids = draft_tokens.clamp(0, vocab_size - 1)
    undefined_targets = _undefined_rows(target_probs)
    drafted_bad = _bad_entries(target_probs[:, :num_drafts].gather(-1, ids[..., None]).squeeze(-1))
    reasons = {
        NUM_DRAFT_TOKENS_OUT_OF_RANGE: (num_draft_tokens < 0) | (num_draft_tokens > num_drafts),
        DRAFT_TOKEN_OUT_OF_RANGE: (used_drafts & ((draft_tokens < 0) | (draft_tokens >= vocab_size))).any(-1),
        TARGET_UNDEFINED: target_read_whole & (used_targets & undefined_targets).any(-1),
    }
    if draft_distribution is not None:
        drafted_bad |= _bad_entries(draft_distribution.gather(-1, ids[..., None]).squeeze(-1))
        if draft_read_whole:
            reasons[DRAFT_UNDEFINED] = (used_drafts & _undefined_rows(draft_distribution)).any(-1)
    reasons[DRAFTED_ENTRY_UNDEFINED] = (used_drafts & drafted_bad).any(-1)
    # The draft row counts at a stop position after a rejection (a position < n).
    draft_rows_bad = torch.zeros(batch, positions, dtype=torch.bool, device=device)
    if draft_distribution is not None and not draft_read_whole:
        draft_rows_bad[:, :num_drafts] = used_drafts & _bad_entries(draft_distribution).any(-1)
    # A target row read whole was checked above; the draft row counts wherever probabilities are used as given.
    stop_rows_bad = used_targets & ((~target_read_whole[:, None] & undefined_targets) | draft_rows_bad)
    if stop is None:
        reasons[STOP_ROW_UNDEFINED] = stop_rows_bad.any(-1)
    else:
        at_stop = stop.clamp(0, positions - 1)[:, None]
        reasons[STOP_ROW_UNDEFINED] = stop_rows_bad.gather(1, at_stop).squeeze(1)
    return reasons


def row_uniforms(seeds: list[int], count: int, device: torch.device) -> torch.Tensor:
    """[B, count] float64 uniforms in [0, 1), row b drawn from a CPU generator seeded with seeds[b]."""
    uniforms = torch.empty(len(seeds), count, dtype=torch.float64)
    generator = torch.Generator(device="cpu")
    for row, row_seed in enumerate(seeds):
        generator.manual_seed((row_seed ^ (row_seed >> 32)) & 0xFFFF_FFFF)
        uniforms[row] = torch.rand(count, generator=generator, dtype=torch.float64)
    return uniforms.to(device)


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


def reads_whole_rows(target_weights: torch.Tensor, batch: int, device: torch.device, inputs_are_logits: bool,
                     greedy: bool, draft_given: bool) -> tuple[torch.Tensor, bool]:
    """([B] bool: the row's target rows are read whole, whether the used draft rows are)."""
    plain, _ = plain_target_rows(target_weights, batch, device)
    target_read_whole = ~plain | greedy | inputs_are_logits
    return target_read_whole, inputs_are_logits and draft_given and not greedy


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
    counts = row_counts(num_draft_tokens, batch, device)

    target_distribution = target_probs(targets, target_weights, inputs_are_logits, temperature)
    q = None if greedy else draft_probs(draft, draft_tokens, vocab_size, inputs_are_logits, temperature)
    target_read_whole, draft_read_whole = reads_whole_rows(
        target_weights, batch, device, inputs_are_logits, greedy, draft is not None
    )

    # Invalid rows are computed with clamped values and blanked at the end.
    drafts_used = counts.clamp(0, num_drafts)
    ids = draft_tokens.clamp(0, vocab_size - 1)
    used = torch.arange(num_drafts, device=device)[None, :] < drafts_used[:, None]
    drafted_targets = target_distribution[:, :num_drafts]
    if greedy:
        accepted = ids == drafted_targets.argmax(-1)
    else:
        uniforms = row_uniforms(row_seeds(seed, batch), num_drafts + 1, device)
        p_of_draft = drafted_targets.gather(-1, ids[..., None]).squeeze(-1)
        q_of_draft = q.gather(-1, ids[..., None]).squeeze(-1)
        accepted = uniforms[:, :num_drafts] * q_of_draft < p_of_draft
    num_accepted = (accepted & used).long().cumprod(-1).sum(-1)
    reasons = invalid_row_reasons(
        draft_tokens,
        target_distribution,
        None if draft is None else q,
        counts,
        target_read_whole=target_read_whole,
        draft_read_whole=draft_read_whole,
        stop=num_accepted,
    )
    valid = ~torch.stack(list(reasons.values())).any(0)

    # The stop position is the first rejection, or the bonus position when every draft was accepted.
    stop_target = target_distribution[rows, num_accepted]
    if greedy:
        final_token = stop_target.argmax(-1)
    else:
        rejected = num_accepted < drafts_used
        # A zero draft row past the last draft makes the bonus residual p itself.
        q_with_bonus = torch.cat([q, q.new_zeros(batch, 1, vocab_size)], dim=1)
        # where, not a product: an unused draft row may hold NaN padding (NaN * 0 is NaN).
        stop_draft = torch.where(rejected[:, None], q_with_bonus[rows, num_accepted], 0.0)
        residual = (stop_target - stop_draft).clamp_min(0)
        residual_is_empty = residual.sum(-1) == 0
        final_distribution = torch.where(residual_is_empty[:, None], stop_target, residual)
        final_distribution = torch.where(valid[:, None], final_distribution, 1.0)  # invalid rows: anything
        final_token = sample_by_inverse_cdf(final_distribution, uniforms[:, num_drafts])

    positions = torch.arange(num_drafts + 1, device=device)[None, :]
    padded_drafts = torch.cat([draft_tokens, draft_tokens.new_full((batch, 1), -1)], dim=1)
    tokens = torch.where(positions < num_accepted[:, None], padded_drafts, -1)
    tokens = torch.where(positions == num_accepted[:, None], final_token[:, None], tokens)
    tokens = torch.where(valid[:, None], tokens, -1)
    num_accepted = torch.where(valid, num_accepted, 0)
    num_emitted = torch.where(valid, num_accepted + 1, 0)
    return tokens, num_emitted, num_accepted


def possible_invalid_row_reasons(
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
) -> dict[str, torch.Tensor]:
    """Every reason each row may be invalid for, whatever its stop position: what explains a
    backend's verdict, which came from its own random numbers. Takes the canonical arguments."""
    del seed  # the stop positions are left open
    batch = draft_tokens.shape[0]
    vocab_size = targets[0].shape[-1]
    device = draft_tokens.device
    target_read_whole, draft_read_whole = reads_whole_rows(
        target_weights, batch, device, inputs_are_logits, greedy, draft is not None
    )
    q = None
    if draft is not None and not greedy:
        q = draft_probs(draft, draft_tokens, vocab_size, inputs_are_logits, temperature)
    return invalid_row_reasons(
        draft_tokens,
        target_probs(targets, target_weights, inputs_are_logits, temperature),
        q,
        row_counts(num_draft_tokens, batch, device),
        target_read_whole=target_read_whole,
        draft_read_whole=draft_read_whole,
        stop=None,
    )
