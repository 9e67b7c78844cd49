"""The demo family's character-level tokenizer: one token per character of a small fixed alphabet.

Built with `tokenizers` (a WordLevel model over single characters) and wrapped as a
`transformers` fast tokenizer, so `generate`, batching with left padding and `save_pretrained`
work as for any Hugging Face model. The shipped copy lives next to the weights; `build_tokenizer`
is how it was made.
"""
from __future__ import annotations

import string

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
ALPHABET = string.digits + "+-*=:.,?!' \n" + string.ascii_lowercase + string.ascii_uppercase


def build_tokenizer():
    """A fresh `PreTrainedTokenizerFast`: ids 0..2 are pad, eos, unk, then ALPHABET in order.

    Left padding (what batched generation with decoder-only models needs); no token is added
    around the text, so a prompt encodes to exactly its characters.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *ALPHABET))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    # Every character is its own piece ("[\s\S]" also matches the newline, which "." does not).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        model_max_length=128,
    )
