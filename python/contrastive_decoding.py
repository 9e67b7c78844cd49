r"""Contrastive decoding: prefer tokens a large expert model likes much more than a small amateur
does, within the expert's plausible tokens.

    python python/contrastive_decoding.py --expert facebook/opt-13b --amateur facebook/opt-125m \
        --alpha 0.1 --prompt "Barack Obama was born in Honolulu, Hawaii. He was born in"

Without --beta: Li et al. (ACL 2023), score log p_exp - log p_ama (amateur at
--amateur-temperature). With --beta b: O'Brien & Lewis (2023), score (1 + b) l_exp - b l_ama on raw
logits (e.g. --beta 0.5 for reasoning); --amateur-temperature must then stay 1. Both keep only
tokens with p_exp >= alpha * max p_exp. Greedy decoding is the papers' method (--do-sample to
sample). Model arguments are anything `from_pretrained` takes; the two models must share a
tokenizer. Prints the expert's own continuation next to the contrastive one.
"""
from __future__ import annotations

import argparse

from hf_example_utils import add_generation_arguments, compare_generations, load_models, load_shared_tokenizer

from collab_ops.hf import ContrastiveDecodingLogitsProcessor


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expert", required=True, help="the large expert model (the one generate runs)")
    parser.add_argument("--amateur", required=True, help="the small amateur model")
    parser.add_argument("--alpha", type=float, default=0.1, help="plausibility threshold in (0, 1]")
    parser.add_argument("--beta", type=float, default=None, help="O'Brien & Lewis's beta (default: Li et al.'s form)")
    parser.add_argument(
        "--amateur-temperature", type=float, default=1.0, help="the amateur's temperature (Li et al.'s form only)"
    )
    add_generation_arguments(parser)
    return parser


def main(argv=None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    paths = [args.expert, args.amateur]
    tokenizer = load_shared_tokenizer(paths, parser)

    def make_processor(mask):
        return ContrastiveDecodingLogitsProcessor(
            amateur, alpha=args.alpha, beta=args.beta, amateur_temperature=args.amateur_temperature, attention_mask=mask
        )

    # The small amateur first: a bad option value is reported before the large expert loads.
    (amateur,) = load_models([args.amateur], args)
    try:
        make_processor(None)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    (expert,) = load_models([args.expert], args)
    method = "contrastive" if args.beta is None else f"contrastive (beta={args.beta:g})"
    return compare_generations(expert, tokenizer, args, make_processor, ("expert", method))


if __name__ == "__main__":
    main()
