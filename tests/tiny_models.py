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
