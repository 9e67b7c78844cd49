"""Tiny random-weight transformers models built from configs (nothing is downloaded), shared by
the collab_ops.hf tests."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64


def tiny_llama(seed, vocab_size=VOCAB, hidden_size=32):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    # Without an eos token `generate` runs every row for exactly max_new_tokens, as naive loops do.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def token_rows(seed, lengths, vocab_size=VOCAB):
    """A dataset of random token sequences of the given lengths (ids from 1: 0 is the pad id)."""
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, vocab_size, (length,), generator=generator)} for length in lengths]


def pad_batch(rows, padding_side="right"):
    """Data collator: pads with id 0, attention mask, labels = input_ids with -100 on padding."""
    length = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[i, span] = row["input_ids"]
        attention_mask[i, span] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
