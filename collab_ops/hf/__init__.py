"""Hugging Face `generate` hooks: logits processors that run auxiliary models next to the main one.

Import this subpackage explicitly (`import collab_ops.hf`); it needs `transformers`, which the
core ops do not.
"""
from .processors import (
    CollaborativeLogitsProcessor,
    ContrastiveDecodingLogitsProcessor,
    DynamicFusionLogitsProcessor,
    EFTLogitsProcessor,
    ProxyTuningLogitsProcessor,
)

__all__ = [
    "CollaborativeLogitsProcessor",
    "ContrastiveDecodingLogitsProcessor",
    "DynamicFusionLogitsProcessor",
    "EFTLogitsProcessor",
    "ProxyTuningLogitsProcessor",
]
