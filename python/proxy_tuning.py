r"""Proxy-tuning (Liu et al., COLM 2024): steer a large base model with the difference between a
small tuned model and its small base, at decoding time.

    python python/proxy_tuning.py --large-base meta-llama/Llama-2-13b-hf \
        --small-tuned meta-llama/Llama-2-7b-chat-hf --small-base meta-llama/Llama-2-7b-hf \
        --prompt "Explain why the sky is blue." --max-new-tokens 64

Model arguments are anything `from_pretrained` takes (a local folder or a hub name). The three
models must share a tokenizer; their embedding widths may differ. Prints the large base model's
own continuation next to the proxy-tuned one.
"""
from __future__ import annotations

import argparse

from hf_example_utils import add_generation_arguments, compare_generations, load_models, load_shared_tokenizer

from collab_ops.hf import ProxyTuningLogitsProcessor


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large-base", required=True, help="the large pretrained model (the one generate runs)")
    parser.add_argument("--small-tuned", required=True, help="the small tuned model (the expert)")
    parser.add_argument("--small-base", required=True, help="the small pretrained model it was tuned from")
    parser.add_argument(
        "--alpha", type=float, default=1.0, help="strength of the tuning offset: log p_L + alpha (log p_tuned - log p_base)"
    )
    add_generation_arguments(parser)
    return parser


def main(argv=None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    paths = [args.large_base, args.small_tuned, args.small_base]
    tokenizer = load_shared_tokenizer(paths, parser)
    large_base, small_tuned, small_base = load_models(paths, args)
    return compare_generations(
        large_base,
        tokenizer,
        args,
        lambda mask: ProxyTuningLogitsProcessor(small_tuned, small_base, alpha=args.alpha, attention_mask=mask),
        ("large base", f"proxy-tuned (alpha={args.alpha:g})"),
    )


if __name__ == "__main__":
    main()
