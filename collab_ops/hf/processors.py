"""Logits processors that fuse the main model's scores with auxiliary models run step by step.

`generate` runs the main model and hands its last-position scores to the processor; the processor
runs each auxiliary model itself, with its own KV cache, and replaces the scores by
`collab_ops.fuse_logits` of all models (with per-row weights from `collab_ops.dynamic_fusion_weights`
in dynamic fusion).
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence, Union

import torch
from transformers import DynamicCache, LogitsProcessor

from .. import presets
from .._validation import check_bool, check_positive
from ..ops.fusion import PreparedFuseLogits, _canonical_grid, dynamic_fusion_weights, fuse_logits

# fuse_logits options a processor passes through (output is fixed to "logits").
FUSION_OPTIONS = ("temperatures", "normalize", "plausibility_alpha", "plausibility_ref", "vocab_size", "backend")


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _score_width(model: torch.nn.Module) -> int:
    """Columns of the model's scores: its LM head's rows (padded embeddings included)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.shape[0]
    return model.config.get_text_config().vocab_size


def _last_positions_kwargs(model: torch.nn.Module, count: int) -> dict:
    """Forward kwargs that make a causal LM compute logits for its last `count` positions only
    (saving a [B, L, V] tensor over a prompt), for models whose forward takes `logits_to_keep`."""
    return {"logits_to_keep": count} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


class _AuxiliaryModelState:
    """One auxiliary model with the KV cache it keeps across decoding steps."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.forward_kwargs = _last_positions_kwargs(model, 1)  # only the last position is fused

    def next_token_logits(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
            **self.forward_kwargs,
        )
        self.cache = outputs.past_key_values
        return outputs.logits[:, -1]


class _AuxiliaryModelsProcessor(LogitsProcessor):
    """The state every processor here shares: auxiliary models, their caches, mask and positions.

    Subclasses call `_auxiliary_logits(input_ids)` once per step and fuse the result with the
    main model's scores; `_to_main_width` pads the fused scores back to the main model's width.
    The rules (first call = whole prompt, then one token per call; left padding; batch and
    beam-search checks) are documented on `CollaborativeLogitsProcessor`.
    """

    def __init__(self, models: Sequence[torch.nn.Module], attention_mask: Optional[torch.Tensor],
                 check_row_order: bool = True):
        if not models:
            raise ValueError("models must name at least one auxiliary model")
        devices = [_model_device(m) for m in models]
        if any(d != devices[0] for d in devices):
            raise ValueError(f"auxiliary models must share one device, got {[str(d) for d in devices]}")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be [batch, prompt_length], got shape {tuple(attention_mask.shape)}")
        self.device = devices[0]
        self.check_row_order = check_bool("check_row_order", check_row_order)
        self._auxiliary = [_AuxiliaryModelState(m) for m in models]
        self._prompt_mask = attention_mask
        # The mask and the position ids of every step are views of two buffers: the prompt's mask
        # then ones for the tokens to come, and the positions of the tokens to come (both grown by
        # doubling), so a step launches no kernel for them.
        self._mask_buffer: Optional[torch.Tensor] = None
        self._position_buffer: Optional[torch.Tensor] = None  # [B, n]: positions of new tokens 1..n
        self._prompt_length = 0
        self._length = 0  # columns of _mask_buffer seen by the auxiliary models
        # Without padding the mask is all ones for good (generate keeps finished rows unmasked), and
        # the steps pass none: transformers' SDPA mask logic tests a given mask for all ones, a host
        # synchronisation per auxiliary model and step; with none it builds the same causal attention.
        self._padded = True
        self._seen_ids: Optional[torch.Tensor] = None  # input_ids of the previous call

    def _step_inputs(self, input_ids: torch.LongTensor):
        """The tokens, mask and positions the auxiliary models have not seen yet."""
        if input_ids.device != self.device:
            raise ValueError(f"input_ids are on {input_ids.device} but the auxiliary models on {self.device}")
        batch, length = input_ids.shape
        if length == 0:
            raise ValueError(
                "the processor got no prompt tokens: give generate the prompt as input_ids (with inputs_embeds "
                "the auxiliary models, which run on token ids, never see the prompt)"
            )
        if self._mask_buffer is None:
            mask = self._prompt_mask
            if mask is None:
                mask = torch.ones_like(input_ids)
            if mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(mask.shape)} but the prompt input_ids {tuple(input_ids.shape)}; "
                    "beam search (num_beams > 1) is not supported, and for num_return_sequences = n "
                    "pass attention_mask.repeat_interleave(n, dim=0)"
                )
            mask = mask.to(device=self.device, dtype=torch.long)
            capacity = max(length, 64)
            self._mask_buffer = torch.cat([mask, mask.new_ones(batch, capacity)], dim=-1)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            # The new tokens are attended (generate keeps feeding finished rows, unmasked), so the
            # n-th one sits n places after the prompt's last position, as mask.sum(-1) - 1 gives.
            self._position_buffer = position_ids[:, -1:] + torch.arange(1, capacity + 1, device=self.device)
            self._prompt_length = self._length = length
            self._padded = self._prompt_mask is not None and not bool(mask.all())  # once per generate call
            return input_ids, mask, position_ids
        if batch != self._mask_buffer.shape[0]:
            raise ValueError(
                f"the batch changed from {self._mask_buffer.shape[0]} to {batch} rows between steps; beam search "
                "is not supported (the auxiliary caches are not reordered)"
            )
        if length != self._length + 1:
            raise ValueError(
                f"expected {self._length + 1} tokens (one new one) but got {length}; use a fresh processor for each "
                "generate call (assisted generation and prompt lookup decoding, which call processors on candidate "
                "prefixes, are not supported)"
            )
        if length > self._mask_buffer.shape[1]:
            self._mask_buffer = torch.cat([self._mask_buffer, torch.ones_like(self._mask_buffer)], dim=-1)
        new_token = length - self._prompt_length  # 1 for the first generated token
        if new_token > self._position_buffer.shape[1]:
            grown = self._position_buffer + self._position_buffer.shape[1]
            self._position_buffer = torch.cat([self._position_buffer, grown], dim=-1)
        self._length = length
        mask = self._mask_buffer[:, :length] if self._padded else None
        return input_ids[:, -1:], mask, self._position_buffer[:, new_token - 1 : new_token]

    def _auxiliary_logits(self, input_ids: torch.LongTensor) -> list[torch.Tensor]:
        """Each auxiliary model's next-token logits `[B, V_k]` after `input_ids`, in model order."""
        new_ids, mask, position_ids = self._step_inputs(input_ids)
        return [aux.next_token_logits(new_ids, mask, position_ids) for aux in self._auxiliary]

    def _finish_step(self, input_ids: torch.LongTensor) -> None:
        """Refuse rows that changed since the previous call (with check_row_order): beam search
        reorders rows between steps, which the auxiliary caches cannot follow. Subclasses call
        this after queuing the step's work and before returning its scores: the check
        synchronises with the device (once per step), and by then the host has queued the
        auxiliary forwards and the fusion behind the main model's forward instead of waiting for
        it first."""
        if not self.check_row_order:
            return
        previous, self._seen_ids = self._seen_ids, input_ids
        if previous is not None and not torch.equal(input_ids[:, :-1], previous):
            raise ValueError(
                "the rows of input_ids were reordered or changed between steps (beam search?); "
                "beam search is not supported (the auxiliary caches are not reordered)"
            )

    @staticmethod
    def _to_main_width(fused: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """`fused` with −inf columns appended up to the main model's width, so `generate` never
        picks a token outside the shared vocabulary."""
        if fused.shape[-1] == scores.shape[-1]:
            return fused
        padded = fused.new_full((fused.shape[0], scores.shape[-1]), float("-inf"))
        padded[:, : fused.shape[-1]] = fused
        return padded


class CollaborativeLogitsProcessor(_AuxiliaryModelsProcessor):
    """Replace the main model's scores by `fuse_logits([main, *auxiliary], [main_weight, *weights])`.

    Args:
        models: the auxiliary causal LMs (one device, the one `generate` runs on). They must use the
            main model's tokenizer; vocabularies may differ in width only (padding), and are aligned
            to the smallest width or to `vocab_size` in `fusion_options`.
        weights: one fusion weight per auxiliary model.
        main_weight: the main model's weight.
        attention_mask: the prompt's attention mask, the one given to `generate`. `generate` does
            not pass its mask to processors, so a left-padded batch needs it here; None means no
            padding.
        fusion_options: further `fuse_logits` options (temperatures, normalize,
            plausibility_alpha, plausibility_ref, vocab_size, backend). Model 0 is the main model.
            `output` is always "logits": the result replaces raw scores, so later warpers
            (temperature, top-k, ...) see scores on the scale they expect from the fusion.

    Each processor serves one `generate` call: the first call runs the auxiliary models on the whole
    prompt (position ids from the mask's cumulative sum, so left padding is right), later calls
    run only the newest token against the cached prefix, extending the mask by one column, as
    `generate` does for the main model (finished rows keep receiving pad tokens, unmasked, like
    the main model's); a prompt without padding needs no mask at all, and its steps pass none,
    which spares each auxiliary model transformers' per-step test of the mask for padding (a host
    synchronisation on a GPU). The result is float32 of the main model's width; columns beyond
    the fused vocabulary are −inf so `generate` never picks them.

    Sampling with `num_return_sequences = n` works: `generate` repeats every prompt row n times
    (`repeat_interleave`), so pass `attention_mask.repeat_interleave(n, dim=0)` (or no mask when
    nothing is padded). Beam search is not supported: it reorders the batch between steps and
    this processor does not reorder the auxiliary caches. A batch size other than the prompt's
    raises, which also catches `num_beams > 1` when `attention_mask` is given; rows whose
    earlier tokens changed between steps raise too, so a cache is never used for another row.

    check_row_order: that last check compares every row with the previous call's, which costs
    one host synchronisation per step (the processor waits for the step's device work). Greedy
    search and sampling never reorder rows: `check_row_order=False` drops the check and the
    synchronisation, and is safe whenever no generation mode that reorders rows (beam search)
    runs with this processor; with it, only the batch-size check above guards against beam search.
    """

    def __init__(
        self,
        models: Sequence[torch.nn.Module],
        weights: Sequence[float],
        *,
        main_weight: float = 1.0,
        attention_mask: Optional[torch.Tensor] = None,
        check_row_order: bool = True,
        **fusion_options,
    ):
        if isinstance(models, torch.nn.Module):
            raise TypeError("models must be a sequence of models; wrap a single model in a list")
        models = list(models)
        weights = [float(w) for w in weights]
        if models and len(weights) != len(models):
            raise ValueError(f"got {len(weights)} weights for {len(models)} auxiliary models")
        if "output" in fusion_options:
            raise TypeError("output is fixed to 'logits': the result replaces the main model's scores")
        super().__init__(models, attention_mask, check_row_order)
        self.weights = [float(main_weight), *weights]
        self.fusion_options = fusion_options
        self._fuse = PreparedFuseLogits(output="logits", **fusion_options)
        self._check_fusion_options(models)

    def _check_fusion_options(self, models: list) -> None:
        """Raise now, not at the first decoding step, for options fuse_logits would refuse: a fusion
        of empty batches of the models' widths (the main model's taken as the narrowest's)."""
        unknown = sorted(set(self.fusion_options) - set(FUSION_OPTIONS))
        if unknown:
            raise TypeError(f"unknown fusion option(s) {unknown}; expected some of {FUSION_OPTIONS}")
        widths = [_score_width(model) for model in models]
        empty = [torch.zeros(0, width, device=self.device) for width in (min(widths), *widths)]
        try:
            fuse_logits(empty, self.weights, output="logits", **self.fusion_options)
        except (TypeError, ValueError) as error:
            raise type(error)(f"fusion_options: {error}") from error

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        auxiliary_logits = self._auxiliary_logits(input_ids)
        fused = self._fuse([scores, *auxiliary_logits], self.weights)
        self._finish_step(input_ids)
        return self._to_main_width(fused, scores)


def _preset_arguments(models, options: dict, attention_mask, check_row_order) -> dict:
    weights = options.pop("weights")
    return dict(models=models, weights=weights[1:], main_weight=weights[0], attention_mask=attention_mask,
                check_row_order=check_row_order, **options)


class ContrastiveDecodingLogitsProcessor(CollaborativeLogitsProcessor):
    """Contrastive decoding with the main model as the expert.

    beta=None: Li et al. (ACL 2023), `collab_ops.presets.contrastive_decoding`: score
    log p_exp − log p_ama(· / amateur_temperature), in log-probability space.
    beta=b: O'Brien & Lewis (2023), `collab_ops.presets.cd_reasoning`: score
    (1 + b) · l_exp − b · l_ama on raw logits.

    Both keep only the expert's plausible tokens {x : p_exp(x) ≥ alpha · max p_exp} (−inf
    elsewhere). Greedy decoding of the score is the papers' method. `amateur_temperature` belongs
    to Li et al.'s formulation only: with `beta` the amateur's strength is set by b alone (an
    amateur temperature τ would only rescale its weight to b/τ, a parameterisation neither paper
    uses), so a `beta` together with an `amateur_temperature` other than 1 raises ValueError.
    Batching, padding and generation-mode rules: see `CollaborativeLogitsProcessor`.
    """

    def __init__(
        self,
        amateur: torch.nn.Module,
        *,
        alpha: float = 0.1,
        beta: Optional[float] = None,
        amateur_temperature: float = 1.0,
        attention_mask: Optional[torch.Tensor] = None,
        check_row_order: bool = True,
    ):
        if beta is None:
            options = presets.contrastive_decoding(alpha=alpha, amateur_temperature=amateur_temperature)
        else:
            if check_positive("amateur_temperature", amateur_temperature) != 1.0:
                raise ValueError(
                    f"amateur_temperature={amateur_temperature} applies to Li et al.'s contrastive decoding "
                    "(beta=None) only; with beta the amateur's weight is beta itself: leave "
                    "amateur_temperature at 1.0 or set beta=None"
                )
            options = presets.cd_reasoning(beta=beta, alpha=alpha)
        super().__init__(**_preset_arguments([amateur], options, attention_mask, check_row_order))


class ProxyTuningLogitsProcessor(CollaborativeLogitsProcessor):
    """Proxy-tuning (Liu et al., COLM 2024) with the main model as the large base model.

    Score log p_large + alpha · (log p_tuned_small − log p_base_small)
    (`collab_ops.presets.proxy_tuning`). Batching, padding and generation-mode rules: see
    `CollaborativeLogitsProcessor`.
    """

    def __init__(
        self,
        tuned_small: torch.nn.Module,
        base_small: torch.nn.Module,
        *,
        alpha: float = 1.0,
        attention_mask: Optional[torch.Tensor] = None,
        check_row_order: bool = True,
    ):
        options = presets.proxy_tuning(alpha=alpha)
        super().__init__(**_preset_arguments([tuned_small, base_small], options, attention_mask, check_row_order))


class EFTLogitsProcessor(CollaborativeLogitsProcessor):
    """Emulated fine-tuning (Mitchell et al., ICLR 2024) with the main model as the pretrained
    model of the other scale.

    Score log p_main + beta · (log p_ft − log p_ref) (`collab_ops.presets.eft`), where `ft_model`
    is a fine-tuned model and `ref_model` the pretrained model it was fine-tuned from. Up-scaling
    (emulate fine-tuning a large model): main = large pretrained, ft/ref = small; down-scaling:
    main = small pretrained, ft/ref = large. The arithmetic is the same, so the models passed
    decide the direction. beta scales the fine-tuning behaviour (beta = 1 is plain EFT).
    Batching, padding and generation-mode rules: see `CollaborativeLogitsProcessor`.
    """

    def __init__(
        self,
        ft_model: torch.nn.Module,
        ref_model: torch.nn.Module,
        *,
        beta: float = 1.0,
        attention_mask: Optional[torch.Tensor] = None,
        check_row_order: bool = True,
    ):
        options = presets.eft(beta=beta)
        super().__init__(**_preset_arguments([ft_model, ref_model], options, attention_mask, check_row_order))


class DynamicFusionLogitsProcessor(_AuxiliaryModelsProcessor):
    """Dynamic logits fusion (Fan et al., NeurIPS 2024) with the main model as the large model.

    Every step, for every row, `collab_ops.dynamic_fusion_weights` picks each expert's α_t in
    `grid` (default 0, 0.1, ..., 2.0), the per-expert search of the paper's KL objective, and
    the scores become the raw logits l_large + Σ_t α_t (l_expert_t − l_base), fused by
    `collab_ops.fuse_logits` with per-row weights.

    Args:
        experts: one tuned small model, or a sequence of them (each tuned from `base_small`).
        base_small: the small model the experts were tuned from.
        grid: the candidate weights: a sequence of finite floats or a 1-D tensor on the models'
            device (see `collab_ops.dynamic_fusion_weights`).
        attention_mask: the prompt's attention mask, as for `CollaborativeLogitsProcessor`.

    Vocabularies are aligned to the narrowest model; columns of the main model beyond it are
    −inf. Batching, padding and generation-mode rules: see `CollaborativeLogitsProcessor`.
    """

    def __init__(
        self,
        experts: Union[torch.nn.Module, Sequence[torch.nn.Module]],
        base_small: torch.nn.Module,
        *,
        grid: Union[None, Sequence[float], torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        check_row_order: bool = True,
    ):
        experts = [experts] if isinstance(experts, torch.nn.Module) else list(experts)
        if not experts:
            raise ValueError("experts must name at least one tuned small model")
        if not isinstance(base_small, torch.nn.Module):
            raise TypeError(f"base_small must be a model (torch.nn.Module), got {type(base_small).__name__}")
        super().__init__([*experts, base_small], attention_mask, check_row_order)
        self.num_experts = len(experts)
        # Canonical once, on the models' device: a list grid would otherwise cost a host-to-device
        # copy every step.
        self.grid = _canonical_grid(grid, self.device)
        self._fuse = PreparedFuseLogits(normalize=False, output="logits")

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        *expert_logits, base_logits = self._auxiliary_logits(input_ids)
        alpha = dynamic_fusion_weights(scores, expert_logits, base_logits, grid=self.grid)
        # Model order [large, experts..., base]: l_large + Σ α_t l_t − (Σ α_t) l_base.
        weights = torch.cat([torch.ones_like(alpha[:, :1]), alpha, -alpha.sum(dim=1, keepdim=True)], dim=1)
        fused = self._fuse([scores, *expert_logits, base_logits], weights)
        self._finish_step(input_ids)
        return self._to_main_width(fused, scores)
