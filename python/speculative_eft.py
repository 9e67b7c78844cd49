r"""Speculative decoding with `collab_ops.hf.speculative_generate`: a small draft model proposes
tokens that a large target verifies, batched, with the target's output distribution unchanged.
The target is one model, or an EFT up-scaled one (Mitchell et al., ICLR 2024): the large
pretrained model steered by a small fine-tuned model and its pretrained reference,
log p_large + beta (log p_ft - log p_ref), verified as one fused distribution. The small
fine-tuned model is the natural draft there (it is run anyway).

    python python/speculative_eft.py --target meta-llama/Llama-2-13b-hf \
        --target-ft meta-llama/Llama-2-7b-chat-hf --target-ref meta-llama/Llama-2-7b-hf \
        --draft meta-llama/Llama-2-7b-chat-hf --prompt "Explain why the sky is blue." \
        --max-new-tokens 64 --num-draft-tokens 4

    python python/speculative_eft.py --target Qwen/Qwen2.5-7B --draft Qwen/Qwen2.5-0.5B

Model arguments are anything `from_pretrained` takes (a local folder or a hub name); all models
must share a tokenizer (embedding widths may differ), and a path given twice is loaded once.
Prints, per prompt, the baseline continuation (`target.generate`; with EFT, `generate` with
`EFTLogitsProcessor`) next to the speculative one, then the acceptance rate and the wall-clock
time of both. Greedy decoding gives the same text up to floating-point ties. With --sample both
sample the target at --temperature without top-k/top-p; with EFT the baseline applies the
temperature after fusing, speculative decoding to each model before fusing (they agree at 1).
"""
from __future__ import annotations

import argparse
import time

import torch
from hf_example_utils import DEFAULT_PROMPT, add_generation_arguments, load_models, load_shared_tokenizer
from transformers import LogitsProcessorList

from collab_ops import presets
from collab_ops.hf import EFTLogitsProcessor, speculative_generate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="the target model (with EFT: the large pretrained model)")
    parser.add_argument("--target-ft", help="EFT up-scaling: the small fine-tuned model (needs --target-ref)")
    parser.add_argument("--target-ref", help="EFT up-scaling: the small pretrained model --target-ft was tuned from")
    parser.add_argument(
        "--beta", type=float, default=1.0, help="EFT strength: log p_target + beta (log p_ft - log p_ref)"
    )
    parser.add_argument("--draft", required=True, help="the draft model that proposes tokens")
    parser.add_argument("--num-draft-tokens", type=int, default=4, help="drafts per verification round")
    add_generation_arguments(parser)
    parser.add_argument("--sample", dest="do_sample", action="store_true", help="the same as --do-sample")
    return parser


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, run):
    synchronize(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    return result, time.perf_counter() - start


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.target_ft is None) != (args.target_ref is None):
        parser.error("EFT up-scaling needs both --target-ft and --target-ref")
    if args.num_draft_tokens < 1:
        parser.error(f"--num-draft-tokens must be at least 1, got {args.num_draft_tokens}")
    eft = args.target_ft is not None
    paths = [args.target, *([args.target_ft, args.target_ref] if eft else []), args.draft]
    unique_paths = list(dict.fromkeys(paths))
    tokenizer = load_shared_tokenizer(unique_paths, parser)
    loaded = dict(zip(unique_paths, load_models(unique_paths, args)))
    target = loaded[args.target]
    draft = loaded[args.draft]
    targets = [loaded[path] for path in paths[:-1]]
    target_weights = presets.eft(beta=args.beta)["weights"] if eft else None

    prompts = args.prompt or [DEFAULT_PROMPT]
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(target.device)
    sampling = dict(do_sample=args.do_sample, temperature=args.temperature)

    def baseline(max_new_tokens):
        torch.manual_seed(args.seed)
        processors = []
        if eft:
            processors.append(
                EFTLogitsProcessor(targets[1], targets[2], beta=args.beta, attention_mask=batch["attention_mask"])
            )
        sample_options = {"temperature": args.temperature, "top_k": 0, "top_p": 1.0} if args.do_sample else {}
        return target.generate(
            **batch,
            logits_processor=LogitsProcessorList(processors),
            do_sample=args.do_sample,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **sample_options,
        )

    def speculative(max_new_tokens):
        return speculative_generate(
            targets if eft else target,
            draft,
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            num_draft_tokens=args.num_draft_tokens,
            target_weights=target_weights,
            seed=args.seed,
            pad_token_id=tokenizer.pad_token_id,
            return_stats=True,
            **sampling,
        )

    # A short untimed run of each first, so that neither time includes one-off start-up costs.
    baseline(2)
    speculative(2)
    baseline_output, baseline_seconds = timed(target.device, lambda: baseline(args.max_new_tokens))
    (speculative_output, stats), speculative_seconds = timed(target.device, lambda: speculative(args.max_new_tokens))

    prompt_length = batch["input_ids"].shape[1]
    baseline_label = "generate + EFTLogitsProcessor" if eft else "target.generate"
    speculative_label = "speculative_generate"
    texts = {
        label: tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
        for label, output in ((baseline_label, baseline_output), (speculative_label, speculative_output))
    }
    width = max(len(baseline_label), len(speculative_label))
    for row, prompt in enumerate(prompts):
        print(f"prompt: {prompt}")
        for label in (baseline_label, speculative_label):
            print(f"  {label:<{width}} | {texts[label][row]}")
        print()
    print(
        f"acceptance rate: {stats.acceptance_rate:.3f} ({int(stats.accepted.sum())} of {int(stats.drafted.sum())} "
        f"drafts accepted, {stats.rounds} target passes, {args.num_draft_tokens} drafts per round)"
    )
    print(
        f"wall-clock: {baseline_label} {baseline_seconds:.3f} s, {speculative_label} {speculative_seconds:.3f} s "
        f"(speed-up {baseline_seconds / speculative_seconds:.2f}x)"
    )
    return dict(
        prompts=prompts,
        texts=texts,
        stats=stats,
        seconds={baseline_label: baseline_seconds, speculative_label: speculative_seconds},
    )


if __name__ == "__main__":
    main()
