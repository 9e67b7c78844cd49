"""The embedded model family: tiny Llama causal LMs trained on the demo task, shipped in the package.

    family = load_model_family()
    family["large_base"], family["small_base"], family["small_tuned"], family["tokenizer"]

- large_base:  the larger architecture, pretrained on the task corpus (`task.pretraining_texts`);
- small_base:  the smaller architecture, pretrained on the same corpus in the same order;
- small_tuned: small_base fine-tuned on the tuned answer format (`task.tuning_texts`).

All share one tokenizer and vocabulary, so every collaboration method can combine them. The weights
are stored in float16 under `weights/<name>/` and were made by `python/train_demo_models.py`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TOKENIZER_DIR = WEIGHTS_DIR / "tokenizer"

# Architecture of each size; the training script builds its configs from here.
ARCHITECTURES = {
    "large": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
    "small": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4),
}
FAMILY = {"large_base": "large", "small_base": "small", "small_tuned": "small"}
MAX_POSITIONS = 128


def model_config(size: str, tokenizer):
    """The `LlamaConfig` of architecture `size` ("large" or "small") for the family's tokenizer."""
    from transformers import LlamaConfig

    if size not in ARCHITECTURES:
        raise ValueError(f"size must be one of {sorted(ARCHITECTURES)}, got {size!r}")
    architecture = ARCHITECTURES[size]
    return LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=architecture["num_attention_heads"],
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **architecture,
    )


def load_tokenizer():
    """The family's shipped tokenizer (`tokenizer.build_tokenizer`, as saved with the weights)."""
    from transformers import PreTrainedTokenizerFast

    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{TOKENIZER_DIR} has no tokenizer.json; run python/train_demo_models.py")
    return PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR))


def _resolve(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cpu" if device is None else device)
    dtype = torch.float32 if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    return device, dtype


def load_model(name: str, device: Union[None, str, torch.device] = None, dtype: Optional[torch.dtype] = None):
    """One model of the family (a `LlamaForCausalLM` in eval mode) by name, e.g. "large_base"."""
    from transformers import LlamaForCausalLM

    if name not in FAMILY:
        raise ValueError(f"name must be one of {sorted(FAMILY)}, got {name!r}")
    device, dtype = _resolve(device, dtype)
    path = WEIGHTS_DIR / name
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors; run python/train_demo_models.py")
    model = LlamaForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()


def load_model_family(device: Union[None, str, torch.device] = None, dtype: Optional[torch.dtype] = None) -> dict:
    """{"tokenizer": ..., "large_base": ..., "small_base": ..., "small_tuned": ...} from the package.

    device: where the models go (default CPU). dtype: their parameter dtype (default float32: the
    models are small enough that float32 costs nothing, and CPUs run it fastest).
    """
    device, dtype = _resolve(device, dtype)
    family = {"tokenizer": load_tokenizer()}
    for name in FAMILY:
        family[name] = load_model(name, device, dtype)
    return family
