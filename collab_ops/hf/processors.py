"""Logits processors that fuse the main model's scores with auxiliary models run step by step.

`generate` runs the main model and hands its last-position scores to the processor; the processor
runs each auxiliary model itself, with its own KV cache, and replaces the scores by
`collab_ops.fuse_logits` of all models.
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch
from transformers import DynamicCache, LogitsProcessor

from .. import presets
from ..ops.fusion import fuse_logits


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class _AuxiliaryModelState:
    """One auxiliary model with the KV cache it keeps across decoding steps."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache = DynamicCache(config=model.config)
        # Only the last position is fused; asking for just that saves a [B, L, V] prompt logits tensor.
        self.forward_kwargs = (
            {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        )

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


class CollaborativeLogitsProcessor(LogitsProcessor):
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
    the main model's). The result is float32 of the main model's width; columns beyond the fused
    vocabulary are −inf so `generate` never picks them.

    Beam search is not supported: it reorders the batch between steps and this processor does
    not reorder the auxiliary caches. A batch size other than the prompt's raises, which also
    catches `num_beams > 1` when `attention_mask` is given. For sampling with
    `num_return_sequences = n`, pass `attention_mask.repeat_interleave(n, dim=0)`.
    """

    def __init__(
        self,
        models: Sequence[torch.nn.Module],
        weights: Sequence[float],
        *,
        main_weight: float = 1.0,
        attention_mask: Optional[torch.Tensor] = None,
        **fusion_options,
    ):
        if isinstance(models, torch.nn.Module):
            raise TypeError("models must be a sequence of models; wrap a single model in a list")
        models = list(models)
        weights = [float(w) for w in weights]
        if not models:
            raise ValueError("models must name at least one auxiliary model")
        if len(weights) != len(models):
            raise ValueError(f"got {len(weights)} weights for {len(models)} auxiliary models")
        if "output" in fusion_options:
            raise TypeError("output is fixed to 'logits': the result replaces the main model's scores")
        devices = [_model_device(m) for m in models]
        if any(d != devices[0] for d in devices):
            raise ValueError(f"auxiliary models must share one device, got {[str(d) for d in devices]}")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be [batch, prompt_length], got shape {tuple(attention_mask.shape)}")
        self.device = devices[0]
        self.weights = [float(main_weight), *weights]
        self.fusion_options = fusion_options
        self._auxiliary = [_AuxiliaryModelState(m) for m in models]
        self._prompt_mask = attention_mask
        self._attention_mask: Optional[torch.Tensor] = None
        self._seen_ids: Optional[torch.Tensor] = None  # input_ids of the previous call

    def _step_inputs(self, input_ids: torch.LongTensor):
        """The tokens, mask and positions the auxiliary models have not seen yet."""
        if input_ids.device != self.device:
            raise ValueError(f"input_ids are on {input_ids.device} but the auxiliary models on {self.device}")
        batch, length = input_ids.shape
        if self._attention_mask is None:
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
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            new_ids = input_ids
        else:
            mask = self._attention_mask
            if batch != mask.shape[0]:
                raise ValueError(
                    f"the batch changed from {mask.shape[0]} to {batch} rows between steps; beam search "
                    "is not supported (the auxiliary caches are not reordered)"
                )
            if length != self._seen_ids.shape[1] + 1:
                raise ValueError(
                    f"expected {self._seen_ids.shape[1] + 1} tokens (one new one) but got {length}; "
                    "use a fresh processor for each generate call"
                )
            # Beam search reorders rows between steps, which the auxiliary caches cannot follow:
            # refuse rather than fuse with another row's cache (one host synchronisation per step).
            if not torch.equal(input_ids[:, :-1], self._seen_ids):
                raise ValueError(
                    "the rows of input_ids were reordered or changed between steps (beam search?); "
                    "beam search is not supported (the auxiliary caches are not reordered)"
                )
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=-1)
            position_ids = mask.sum(-1, keepdim=True) - 1
            new_ids = input_ids[:, -1:]
        return new_ids, mask, position_ids

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        new_ids, mask, position_ids = self._step_inputs(input_ids)
        auxiliary_logits = [aux.next_token_logits(new_ids, mask, position_ids) for aux in self._auxiliary]
        self._attention_mask = mask
        self._seen_ids = input_ids
        fused = fuse_logits([scores, *auxiliary_logits], self.weights, output="logits", **self.fusion_options)
        if fused.shape[-1] == scores.shape[-1]:
            return fused
        padded = fused.new_full((fused.shape[0], scores.shape[-1]), float("-inf"))
        padded[:, : fused.shape[-1]] = fused
        return padded


def _preset_arguments(models, options: dict, attention_mask) -> dict:
    weights = options.pop("weights")
    return dict(models=models, weights=weights[1:], main_weight=weights[0], attention_mask=attention_mask, **options)


class ContrastiveDecodingLogitsProcessor(CollaborativeLogitsProcessor):
    """Contrastive decoding (Li et al., ACL 2023) with the main model as the expert.

    Score log p_exp − log p_ama(· / amateur_temperature) on the expert's plausible tokens
    {x : p_exp(x) ≥ alpha · max p_exp}, −inf elsewhere (`collab_ops.presets.contrastive_decoding`).
    Greedy decoding of this score is the paper's method.
    """

    def __init__(
        self,
        amateur: torch.nn.Module,
        *,
        alpha: float = 0.1,
        amateur_temperature: float = 1.0,
        attention_mask: Optional[torch.Tensor] = None,
    ):
        options = presets.contrastive_decoding(alpha=alpha, amateur_temperature=amateur_temperature)
        super().__init__(**_preset_arguments([amateur], options, attention_mask))


class ProxyTuningLogitsProcessor(CollaborativeLogitsProcessor):
    """Proxy-tuning (Liu et al., COLM 2024) with the main model as the large base model.

    Score log p_large + alpha · (log p_tuned_small − log p_base_small)
    (`collab_ops.presets.proxy_tuning`).
    """

    def __init__(
        self,
        tuned_small: torch.nn.Module,
        base_small: torch.nn.Module,
        *,
        alpha: float = 1.0,
        attention_mask: Optional[torch.Tensor] = None,
    ):
        options = presets.proxy_tuning(alpha=alpha)
        super().__init__(**_preset_arguments([tuned_small, base_small], options, attention_mask))
