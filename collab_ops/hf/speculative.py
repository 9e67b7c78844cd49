"""Batched speculative decoding with Hugging Face causal LMs: a draft model proposes, a target
(one model, or several fused as `fuse_logits` fuses them) verifies through
`collab_ops.speculative_verify`.

Batch layout. Every model keeps one `DynamicCache` for the whole batch, so all rows share one
column layout: `tokens[B, S]` and `mask[B, S]`, where column j of every cache holds column j of
`tokens`. Rows accept different numbers of drafts in a round. Cropping every cache to the row
that accepted the fewest would make the other rows feed their extra accepted tokens again next
round, a different number per row, so the fed block would need padding in the mask anyway, and
those tokens would go through every model twice. Instead each cache is cropped to the row that
accepted the most (among rows still generating), and the rejected drafts of the other rows stay in
the cache as holes: their mask entries become 0, so no later token attends to them, and position
ids come from the mask's cumulative sum, so the real tokens of a row carry consecutive positions
whatever holes lie between them. A left-padded prompt is the same thing (holes at the start). This
costs no forward pass beyond one per draft step and one per target per round; the price is cache
columns: a round adds (max accepted + 1) columns to every row, of which a row that accepted fewer
uses (its accepted + 1). Rows that finish (EOS or `max_new_tokens`) are removed from the batch
and from every cache, so they neither cost compute nor widen the layout. Models with
sliding-window or recurrent cache layers are refused: a window would count the holes as tokens,
and recurrent states cannot be cropped back.

Per round, with S the layout width and k <= num_draft_tokens the drafts needed this round:
  * the draft model runs k times, first on the columns it has not cached yet (the whole prompt in
    the first round, then one or two columns), then on each new draft;
  * each target runs once on columns S-1 .. S+k-1 (its cache always holds all but the last
    committed column), giving the k+1 score rows that verification needs. A draft that is also
    one of the targets (EFT with the small fine-tuned model drafting) is not run again: one more
    draft step on the last draft completes its k+1 score rows;
  * `speculative_verify` accepts a_b drafts in row b and emits a_b + 1 tokens;
  * with A = max a_b over the rows that continue: targets are cropped to S+A columns, the draft to
    at most S+A, row b's columns S+a_b .. S+A-1 become holes, and every row's corrected or bonus
    token goes to column S+A, which the models see at the start of the next round.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from transformers import DynamicCache

from .._validation import INDEX_DTYPES, canonical_seed, check_bool, check_int, check_positive, check_seed, check_tensor
from ..ops.fusion import fused_sample
from ..ops.speculative import _as_int64, _spread_row_seeds, speculative_verify
from .processors import _last_positions_kwargs, _model_device, _score_width

# Odd 64-bit constant (the splitmix64 multiplier) that spaces the random streams of successive
# sampling calls. It differs from the row stride of speculative_verify's seed spreading, so that
# row b's stream of call c never coincides with row b+1's stream of call c-1.
_CALL_SEED_STRIDE = 0xBF58476D1CE4E5B9


@dataclass
class SpeculativeStats:
    """Acceptance statistics of one `speculative_generate` call (CPU tensors, one entry per row).

    drafted: drafts the target verified for each row (a row near `max_new_tokens` uses fewer
        than `num_draft_tokens` per round).
    accepted: drafts the target accepted for each row (tokens after an EOS count as accepted if
        they were, even though they are not part of the output).
    rounds: target forward passes (verification rounds) for the whole batch.
    """

    drafted: torch.Tensor
    accepted: torch.Tensor
    rounds: int

    @property
    def acceptance_rate(self) -> float:
        """Accepted over drafted, summed over all rows; NaN when nothing was drafted."""
        drafted = int(self.drafted.sum())
        return int(self.accepted.sum()) / drafted if drafted else float("nan")


class _CachedModel:
    """One causal LM with the KV cache it keeps across rounds, aligned to the shared column layout:
    its cache holds columns 0 .. `length`-1 of `tokens`."""

    def __init__(self, model: torch.nn.Module, name: str):
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"{name} is an encoder-decoder model; speculative_generate needs causal LMs")
        self.model = model
        self.cache = DynamicCache(config=model.config)
        # Rejected drafts stay as masked holes in the cache; a sliding window would count them as
        # tokens, and recurrent (linear-attention) states cannot be cropped back.
        if any(self.cache.is_sliding) or not self.cache.is_croppable:
            raise ValueError(
                f"{name} has sliding-window or recurrent cache layers, which speculative_generate "
                "cannot crop back after rejected drafts"
            )
        self.length = 0

    def logits(self, tokens: torch.Tensor, mask: Optional[torch.Tensor], end: int, keep: int) -> torch.Tensor:
        """Scores [B, keep, V] at columns end-keep .. end-1, running the model on the columns
        `length` .. end-1 that its cache lacks. `mask` None: no column is masked, so the model's
        own positions (its cache length onwards) are right and it needs no mask."""
        position_ids = None
        if mask is not None:
            mask = mask[:, :end]
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, self.length : end]
        outputs = self.model(
            input_ids=tokens[:, self.length : end],
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
            **_last_positions_kwargs(self.model, keep),
        )
        self.cache = outputs.past_key_values
        self.length = end
        return outputs.logits[:, -keep:]

    def crop(self, length: int) -> None:
        if self.length > length:
            self.cache.crop(length - self.length)  # a negative count removes that many columns
            self.length = length

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)


def _token_ids(name: str, value) -> list[int]:
    if value is None:
        return []
    values = [value] if isinstance(value, int) else list(value)
    for token in values:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"{name} must be a non-negative token id or a list of them, got {value!r}")
    return values


# GenerationConfig settings for which `generate` adds a logits processor in greedy and sampled
# decoding alike (transformers' GenerationMixin._get_logits_processor), each with the test that it
# is on. min_length and min_new_tokens act only with an EOS id.
_LOGITS_PROCESSOR_SETTINGS = {
    "repetition_penalty": lambda value, eos: value is not None and value != 1.0,
    "no_repeat_ngram_size": lambda value, eos: value is not None and value > 0,
    "bad_words_ids": lambda value, eos: value is not None,
    "sequence_bias": lambda value, eos: value is not None,
    "suppress_tokens": lambda value, eos: value is not None,
    "begin_suppress_tokens": lambda value, eos: value is not None,
    "forced_bos_token_id": lambda value, eos: value is not None,
    "forced_eos_token_id": lambda value, eos: value is not None,
    "exponential_decay_length_penalty": lambda value, eos: value is not None,
    "guidance_scale": lambda value, eos: value is not None and value != 1,
    "watermarking_config": lambda value, eos: value is not None,
    "min_length": lambda value, eos: eos and value is not None and value > 0,
    "min_new_tokens": lambda value, eos: eos and value is not None and value > 0,
}


def _refuse_logits_processor_settings(generation_config, has_eos: bool) -> None:
    """speculative_generate scores with the models' logits alone: a target whose generation_config
    makes `generate` change them (a repetition penalty, banned words, ...) would decode differently
    here, so it is refused rather than silently ignored."""
    if generation_config is None:
        return
    active = [f"{name}={getattr(generation_config, name)!r}" for name, is_on in _LOGITS_PROCESSOR_SETTINGS.items()
              if is_on(getattr(generation_config, name, None), has_eos)]
    if active:
        raise ValueError(
            f"the target's generation_config sets {', '.join(active)}: generate applies logits processors for "
            "these, speculative_generate applies none, so its output would differ from the target's own generate. "
            "Reset them on target.generation_config (e.g. repetition_penalty = 1.0, suppress_tokens = None) to "
            "decode without them"
        )


def _check_models(target, draft) -> tuple[list[torch.nn.Module], torch.device]:
    targets = [target] if isinstance(target, torch.nn.Module) else target
    if not isinstance(targets, (list, tuple)) or not all(isinstance(m, torch.nn.Module) for m in targets):
        raise TypeError("target must be a model or a list of models")
    if not targets:
        raise ValueError("target is an empty list; give at least one target model")
    if not isinstance(draft, torch.nn.Module):
        raise TypeError(f"draft must be a model, got {type(draft).__name__}")
    named = [*zip(_target_names(len(targets)), targets), ("draft", draft)]
    devices = [(name, _model_device(model)) for name, model in named]
    for name, device in devices[1:]:
        if device != devices[0][1]:
            raise ValueError(
                f"{name} is on {device} but {devices[0][0]} is on {devices[0][1]}; all models must share one device"
            )
    return list(targets), devices[0][1]


def _check_target_weights(target_weights, num_targets: int, batch: int):
    """Python floats, or a float tensor [T] or [B, T] (per-row weights); None only for one target."""
    if target_weights is None:
        if num_targets > 1:
            raise ValueError(f"target_weights is required to fuse {num_targets} target models")
        return None
    if isinstance(target_weights, torch.Tensor):
        if target_weights.dim() not in (1, 2) or target_weights.shape[-1] != num_targets:
            raise ValueError(
                f"target_weights must have shape [{num_targets}] or [batch, {num_targets}] for "
                f"{num_targets} target model(s), got {tuple(target_weights.shape)}"
            )
        if target_weights.dim() == 2 and target_weights.shape[0] != batch:
            raise ValueError(f"target_weights has {target_weights.shape[0]} rows but input_ids has {batch}")
        return target_weights
    weights = list(target_weights)
    if len(weights) != num_targets:
        raise ValueError(f"target_weights has {len(weights)} weights but there are {num_targets} target model(s)")
    return weights


def _check_prompt(input_ids, attention_mask, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor("input_ids", input_ids, ndim=2, dtypes=INDEX_DTYPES)
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have at least one row and one column, got shape {tuple(input_ids.shape)}")
    if input_ids.device != device:
        raise ValueError(f"input_ids are on {input_ids.device} but the models are on {device}")
    if attention_mask is None:
        return input_ids.long(), torch.ones_like(input_ids, dtype=torch.long)
    check_tensor("attention_mask", attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}"
        )
    if attention_mask.device != device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but the models are on {device}")
    mask = attention_mask.long()
    if not bool(((mask == 0) | (mask == 1)).all()) or not bool((mask[:, -1] == 1).all()):
        raise ValueError(
            "attention_mask must hold 0/1 and be left-padded (its last column 1 in every row); "
            "right padding would put pad tokens before the generated ones"
        )
    return input_ids.long(), mask


def _seed_offset(call: int) -> int:
    return _as_int64(call * _CALL_SEED_STRIDE)


@torch.no_grad()
def speculative_generate(
    target: Union[torch.nn.Module, Sequence[torch.nn.Module]],
    draft: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    max_new_tokens: int = 32,
    num_draft_tokens: int = 4,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: Union[None, int, torch.Tensor] = None,
    target_weights: Union[None, Sequence[float], torch.Tensor] = None,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    vocab_size: Optional[int] = None,
    return_stats: bool = False,
):
    """Generate with speculative decoding: greedy or sampled output of the target, batched.

    Args:
        target: the model whose distribution the output follows, or a list of models fused as
            `fuse_logits(normalize=True)` fuses them, p = softmax(sum_k w_k log_softmax(l_k / T))
            (EFT up-scaling: [base_large, ft_small, ref_small] with weights [1, b, -b]; proxy-tuned
            targets likewise).
        draft: the small model that proposes tokens. All models share the target's tokenizer and
            one device; vocabularies may differ in width only (padded embeddings).
        input_ids: [B, L] prompts, left-padded when their lengths differ.
        attention_mask: [B, L] 0/1 mask of the prompts (left padding); None means no padding.
        max_new_tokens: exactly this many new tokens per row, unless the row emits an EOS first.
        num_draft_tokens: drafts per round (K >= 1). A row with fewer than K + 1 tokens left uses
            only that many drafts minus one (ragged `num_draft_tokens` in verification).
        do_sample: False: greedy (the draft proposes its argmax, verification accepts drafts equal
            to the target's argmax, ties to the smallest id); the output equals the target's own
            greedy `generate` up to floating-point differences between scoring a block of tokens
            and scoring them one at a time. True: the draft samples from softmax(d / T) and
            verification rejection-samples, so each row follows the target's distribution at
            temperature T exactly (no top-k/top-p: unlike `generate`'s default top_k=50).
        temperature: T > 0, sampling only (greedy decoding ignores it, as `generate` does).
            With several targets it applies to each model before fusion, as in `fuse_logits`'s
            `temperatures`.
        seed: used in sampling only (greedy decoding checks it and draws nothing). None (draws
            from torch's default generator, so `torch.manual_seed` makes a call repeatable), an
            int (spread over the rows), or an int64 tensor [B] of per-row seeds on the models'
            device. Row b's random numbers come from its row seed and the round alone, so the
            same seed gives the same output (on the same backend).
        target_weights: one weight per target model (floats, a tensor [T], or per-row [B, T]);
            required for several targets.
        eos_token_id: an id or a list of ids that end a row; None takes the first target's
            `generation_config.eos_token_id` (as `generate` does); [] disables EOS.
        pad_token_id: fills a row after its EOS; None takes the first target's
            `generation_config.pad_token_id`, else the first EOS id.
        vocab_size: the shared tokenizer length; scores beyond it are ignored. Default: the
            smallest score width among the models.
        return_stats: also return a `SpeculativeStats` (drafted and accepted counts per row,
            rounds, acceptance rate).

    Returns:
        LongTensor [B, L + N]: the prompts followed by the new tokens, N the longest row's count
        (max_new_tokens unless every row stopped at an EOS earlier); shorter rows are padded with
        `pad_token_id` after their EOS, as `generate` pads them. With `return_stats`, a tuple
        (sequences, stats).

    The first target's `generation_config` may not ask for logits processors that `generate` would
    apply (repetition_penalty, no_repeat_ngram_size, bad_words_ids, suppress_tokens, min_new_tokens,
    ...; some instruct checkpoints ship repetition_penalty = 1.05): speculative_generate applies
    none, so it raises ValueError naming them instead of decoding differently from `generate`.

    Each round reads a few scalars on the host (how many drafts, how far to crop the caches,
    which rows are done). The batched cache keeps rejected drafts as masked holes, cropped to the
    longest accepted prefix (the module docstring says why). The models must be causal LMs with
    full-attention caches (`DynamicCache`); in training mode (dropout) the result is not lossless.
    """
    targets, device = _check_models(target, draft)
    num_draft_tokens = check_int("num_draft_tokens", num_draft_tokens, minimum=1)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=1)
    do_sample = check_bool("do_sample", do_sample)
    # greedy decoding ignores the temperature, as generate does (which accepts 0 there)
    temperature = check_positive("temperature", temperature) if do_sample else 1.0
    return_stats = check_bool("return_stats", return_stats)
    if vocab_size is not None:
        vocab_size = check_int("vocab_size", vocab_size, minimum=1)
    tokens, mask = _check_prompt(input_ids, attention_mask, device)
    batch, prompt_length = tokens.shape
    weights = _check_target_weights(target_weights, len(targets), batch)
    row_seeds = None
    if do_sample:
        row_seeds = _spread_row_seeds(canonical_seed("seed", seed, device=device, batch=batch), batch, device)
    else:  # ignored, but a malformed seed is refused as in sampling (and as speculative_verify does)
        check_seed("seed", seed, device=device, batch=batch)

    generation_config = getattr(targets[0], "generation_config", None)
    if eos_token_id is None and generation_config is not None:
        eos_token_id = generation_config.eos_token_id
    eos_ids = _token_ids("eos_token_id", eos_token_id)
    if pad_token_id is None and generation_config is not None:
        pad_token_id = generation_config.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0  # without an EOS no row is ever padded
    pad_token_id = check_int("pad_token_id", pad_token_id, minimum=0)
    _refuse_logits_processor_settings(generation_config, bool(eos_ids))
    eos_tensor = torch.tensor(eos_ids, dtype=torch.long, device=device)

    draft_model = _CachedModel(draft, "draft")
    # A draft that is also a target (EFT with the small fine-tuned model drafting) runs once: its
    # draft-step scores, plus one more step on the last draft, are its target scores.
    target_models = [
        None if m is draft else _CachedModel(m, name) for name, m in zip(_target_names(len(targets)), targets)
    ]
    draft_is_a_target = any(m is None for m in target_models)
    shared_vocab = _shared_vocab_size(vocab_size, targets, draft)

    rows = torch.arange(batch, device=device)  # original row of each row still generating
    new_tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    num_new = torch.zeros(batch, dtype=torch.long, device=device)
    drafted = torch.zeros(batch, dtype=torch.long, device=device)
    accepted = torch.zeros(batch, dtype=torch.long, device=device)
    rounds = 0
    # While no column is masked (no left padding, every row accepting alike), the models get no
    # mask: a given one costs the mask's cumulative sum and, for one-token draft steps,
    # transformers' test of it for padding (a host synchronisation per step on a GPU).
    masked = not bool(mask.all())
    while True:
        width = tokens.shape[1]
        # A round emits at most n + 1 tokens, so a row with r tokens left drafts at most r - 1.
        row_drafts = (max_new_tokens - num_new[rows] - 1).clamp(max=num_draft_tokens)
        drafts_needed = int(row_drafts.max())
        tokens = torch.cat([tokens, tokens.new_zeros(rows.numel(), drafts_needed)], dim=1)
        mask = torch.cat([mask, mask.new_ones(rows.numel(), drafts_needed)], dim=1)
        round_mask = mask if masked else None
        draft_scores = []
        for step in range(drafts_needed + draft_is_a_target):
            scores = draft_model.logits(tokens, round_mask, width + step, 1)[:, 0, :shared_vocab]
            draft_scores.append(scores)
            if step == drafts_needed:  # the extra step that only scores the last draft
                break
            if do_sample:
                step_seeds = row_seeds[rows] + _seed_offset(rounds * (num_draft_tokens + 1) + step + 1)
                proposal = fused_sample([scores], [1.0], temperature=temperature, seed=step_seeds)
            else:
                proposal = scores.argmax(-1)
            tokens[:, width + step] = proposal

        target_scores = [
            torch.stack(draft_scores, dim=1)
            if m is None
            else m.logits(tokens, round_mask, width + drafts_needed, drafts_needed + 1)[..., :shared_vocab]
            for m in target_models
        ]
        round_weights = weights[rows] if isinstance(weights, torch.Tensor) and weights.dim() == 2 else weights
        verify_seeds = row_seeds[rows] + _seed_offset(rounds * (num_draft_tokens + 1)) if do_sample else None
        emitted, num_emitted, num_accepted = speculative_verify(
            tokens[:, width:],
            target_scores if len(targets) > 1 else target_scores[0],
            torch.stack(draft_scores[:drafts_needed], dim=1) if do_sample and drafts_needed else None,
            inputs="logits",
            num_draft_tokens=row_drafts,
            target_weights=round_weights,
            temperature=temperature if do_sample else 1.0,
            mode="sample" if do_sample else "greedy",
            seed=verify_seeds,
            strict=True,  # a NaN score must raise, not leave a row that never advances
            return_accepted=True,
        )
        rounds += 1

        # Keep each row's tokens up to and including its first EOS.
        positions = torch.arange(drafts_needed + 1, device=device)
        emitted_mask = positions < num_emitted[:, None]
        hit_eos = torch.isin(emitted, eos_tensor) & emitted_mask
        stopped = hit_eos.any(-1)
        num_kept = torch.where(stopped, hit_eos.long().argmax(-1) + 1, num_emitted)
        kept_mask = positions < num_kept[:, None]
        columns = num_new[rows][:, None] + positions
        new_tokens[rows[:, None].expand_as(columns)[kept_mask], columns[kept_mask]] = emitted[kept_mask]
        num_new[rows] += num_kept
        drafted[rows] += row_drafts
        accepted[rows] += num_accepted

        continuing = ~stopped & (num_new[rows] < max_new_tokens)
        if not bool(continuing.any()):
            break
        keep = continuing.nonzero().flatten()
        num_accepted, emitted = num_accepted[keep], emitted[keep]
        fewest_accepted, most_accepted = torch.stack(torch.aminmax(num_accepted)).tolist()  # one synchronisation
        masked |= fewest_accepted < most_accepted
        committed = width + most_accepted  # columns that stay: prompt, earlier rounds, accepted drafts
        holes = positions[:most_accepted] >= num_accepted[:, None]
        correction = emitted.gather(1, num_accepted[:, None])
        tokens = torch.cat([tokens[keep, :committed], correction], dim=1)
        mask = torch.cat([mask[keep, :committed], mask.new_ones(keep.numel(), 1)], dim=1)
        mask[:, width:committed].masked_fill_(holes, 0)
        for model in (draft_model, *(m for m in target_models if m is not None)):
            model.crop(committed)
            if keep.numel() != rows.numel():
                model.keep_rows(keep)
        rows = rows[keep]

    sequences = torch.cat([input_ids.long(), new_tokens[:, : int(num_new.max())]], dim=1)
    if return_stats:
        return sequences, SpeculativeStats(drafted=drafted.cpu(), accepted=accepted.cpu(), rounds=rounds)
    return sequences


def _shared_vocab_size(vocab_size: Optional[int], targets: list[torch.nn.Module], draft: torch.nn.Module) -> int:
    named = [(name, _score_width(m)) for name, m in zip(_target_names(len(targets)), targets)]
    named.append(("draft", _score_width(draft)))
    if vocab_size is None:
        return min(width for _, width in named)
    for name, width in named:
        if width < vocab_size:
            raise ValueError(f"vocab_size={vocab_size} but {name} scores only {width} tokens")
    return vocab_size


def _target_names(count: int) -> list[str]:
    return ["target"] if count == 1 else [f"target[{i}]" for i in range(count)]
