"""Quick measurements of the model family on held-out problems: batched greedy `generate` (left
padding), alone or with a collaboration processor, scored by `task.score_completions`."""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch

from .task import AdditionProblem, evaluation_problems, score_completions

# Longest completion: "the answer is 1998." (19 characters) and the end token.
MAX_NEW_TOKENS = 20

# attention_mask of the batch -> a fresh logits processor for one `generate` call.
ProcessorFactory = Callable[[torch.Tensor], object]


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _batches(items: Sequence, size: int):
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    processor: Optional[ProcessorFactory] = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 256,
    do_sample: bool = False,
    seed: int = 0,
) -> list[str]:
    """Greedy completions of `prompts` (special tokens removed), `batch_size` prompts per call;
    with `do_sample`, samples at temperature 1 without top-k/top-p, seeded.

    processor: builds the collaboration processor of one batch from that batch's attention mask
    (processors keep per-call caches, so each `generate` call needs its own).
    """
    from transformers import LogitsProcessorList

    device = _device_of(model)
    sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
    if do_sample:
        torch.manual_seed(seed)
    completions = []
    for batch in _batches(list(prompts), batch_size):
        encoded = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left").to(device)
        processors = LogitsProcessorList([processor(encoded.attention_mask)] if processor else [])
        output = model.generate(
            **encoded,
            logits_processor=processors,
            max_new_tokens=max_new_tokens,
            **sampling,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        completions += tokenizer.batch_decode(output[:, encoded.input_ids.shape[1] :], skip_special_tokens=True)
    return completions


def evaluate_addition(
    model,
    tokenizer,
    problems: Sequence[AdditionProblem],
    *,
    processor: Optional[ProcessorFactory] = None,
    batch_size: int = 256,
) -> dict:
    """{"n", "accuracy", "format_rate", "seconds"} of greedy answers to `problems`."""
    start = time.perf_counter()
    completions = generate_completions(
        model, tokenizer, [p.prompt for p in problems], processor=processor, batch_size=batch_size
    )
    return {**score_completions(problems, completions), "seconds": time.perf_counter() - start}


@torch.no_grad()
def greedy_agreement(target, draft, tokenizer, problems: Sequence[AdditionProblem], *, batch_size: int = 256) -> float:
    """Share of the target's greedy answer tokens (end token included) that are also the draft's
    argmax after the same prefix: the per-token acceptance rate of greedy speculative decoding."""
    device = _device_of(target)
    agreed = counted = 0
    for batch in _batches([p.prompt for p in problems], batch_size):
        encoded = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left").to(device)
        sequences = target.generate(
            **encoded,
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        prompt_length = encoded.input_ids.shape[1]
        generated = sequences[:, prompt_length:]
        ended = generated == tokenizer.eos_token_id
        answer_mask = (ended.cumsum(1) - ended.long()) == 0  # up to and including the first end token
        mask = torch.cat([encoded.attention_mask, answer_mask.long()], dim=1)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = draft(input_ids=sequences, attention_mask=mask, position_ids=position_ids).logits
        # Position i predicts token i + 1: the last prompt position predicts the first answer token.
        draft_next = logits[:, prompt_length - 1 : -1].argmax(-1)
        agreed += int(((draft_next == generated) & answer_mask).sum())
        counted += int(answer_mask.sum())
    return agreed / counted


def evaluate_family(
    family: dict,
    num_problems: int = 512,
    *,
    seed: int = 1234,
    proxy_alpha: float = 1.0,
    cd_alpha: float = 0.1,
    cd_beta: float = 0.5,
    batch_size: int = 256,
) -> dict:
    """The family's key measurements on `num_problems` held-out problems of each prompt style.

    Returns {"worksheet": rows, "forum": rows, "speculative_agreement": float}, each row the
    `evaluate_addition` metrics of one decoding:
    - worksheet: each model alone; proxy_tuning (large_base + proxy_alpha·(small_tuned −
      small_base)); dynamic_fusion (the same with α picked per step and row, Fan et al.);
    - forum: large_base and small_base alone; contrastive (Li et al., expert large_base, amateur
      small_base, plausibility `cd_alpha`); cd_reasoning (O'Brien & Lewis with `cd_beta`);
    - speculative_agreement: `greedy_agreement(large_base, small_base)` on the worksheet problems.
    """
    from ..hf import ContrastiveDecodingLogitsProcessor, DynamicFusionLogitsProcessor, ProxyTuningLogitsProcessor

    tokenizer = family["tokenizer"]
    large, small, tuned = family["large_base"], family["small_base"], family["small_tuned"]
    worksheet = evaluation_problems(num_problems, seed, style="worksheet")
    forum = evaluation_problems(num_problems, seed, style="forum")

    def run(problems, model, processor=None):
        return evaluate_addition(model, tokenizer, problems, processor=processor, batch_size=batch_size)

    rows = {name: run(worksheet, family[name]) for name in ("large_base", "small_base", "small_tuned")}
    rows["proxy_tuning"] = run(
        worksheet, large, lambda mask: ProxyTuningLogitsProcessor(tuned, small, alpha=proxy_alpha, attention_mask=mask)
    )
    rows["dynamic_fusion"] = run(
        worksheet, large, lambda mask: DynamicFusionLogitsProcessor(tuned, small, attention_mask=mask)
    )
    forum_rows = {name: run(forum, family[name]) for name in ("large_base", "small_base")}
    forum_rows["contrastive"] = run(
        forum, large, lambda mask: ContrastiveDecodingLogitsProcessor(small, alpha=cd_alpha, attention_mask=mask)
    )
    forum_rows["cd_reasoning"] = run(
        forum,
        large,
        lambda mask: ContrastiveDecodingLogitsProcessor(small, alpha=cd_alpha, beta=cd_beta, attention_mask=mask),
    )
    return {
        "worksheet": rows,
        "forum": forum_rows,
        "speculative_agreement": greedy_agreement(large, small, tokenizer, worksheet, batch_size=batch_size),
    }
