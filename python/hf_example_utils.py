"""What the `generate` examples share: command-line options, loading checkpoints that share one
tokenizer, and printing the plain model's continuation next to the collaborative one.

The examples import this file as a sibling module (Python puts a script's folder on sys.path).
"""
from __future__ import annotations

import argparse
from typing import Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

DEFAULT_PROMPT = "The three most important ideas in statistics are"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompt",
        action="append",
        help="a prompt, used as given (apply a chat template yourself if the models expect one); "
        f"repeat the option for a left-padded batch (default: {DEFAULT_PROMPT!r})",
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both generations")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: the checkpoint's)")


def load_models(paths: Sequence[str], args: argparse.Namespace) -> list[torch.nn.Module]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    return [AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval() for path in paths]


def load_shared_tokenizer(paths: Sequence[str], parser: argparse.ArgumentParser):
    """The first checkpoint's tokenizer, set up for left padding, after checking that every
    checkpoint maps the same strings to the same ids (embedding widths may still differ: the
    processors align them)."""
    tokenizers = [AutoTokenizer.from_pretrained(path) for path in paths]
    reference = tokenizers[0].get_vocab()
    for path, tokenizer in zip(paths[1:], tokenizers[1:]):
        if tokenizer.get_vocab() != reference:
            parser.error(f"{path} has a different tokenizer vocabulary than {paths[0]}; the models must share one")
    tokenizer = tokenizers[0]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            parser.error(f"the tokenizer of {paths[0]} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def compare_generations(
    main_model: torch.nn.Module,
    tokenizer,
    args: argparse.Namespace,
    make_processor: Callable,
    labels: tuple[str, str],
) -> list[dict]:
    """Generate from the prompts with the main model alone and with `make_processor(attention_mask)`
    (a fresh processor: each serves one `generate` call), print both, and return
    [{"prompt", labels[0], labels[1]}] per prompt."""
    prompts = args.prompt or [DEFAULT_PROMPT]
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(main_model.device)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.do_sample else {"do_sample": False}
    results = [{"prompt": prompt} for prompt in prompts]
    for label, processor in ((labels[0], None), (labels[1], make_processor(batch["attention_mask"]))):
        # The same seed for both runs, so that with sampling only the scores differ.
        torch.manual_seed(args.seed)
        output = main_model.generate(
            **batch,
            logits_processor=LogitsProcessorList([processor] if processor is not None else []),
            max_new_tokens=args.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for result, text in zip(results, texts):
            result[label] = text
    width = max(len(label) for label in labels)
    for result in results:
        print(f"prompt: {result['prompt']}")
        for label in labels:
            print(f"  {label:<{width}} | {result[label]}")
        print()
    return results
