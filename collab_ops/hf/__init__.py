"""Hugging Face hooks: `generate` logits processors that run auxiliary models next to the main
one, and DistillationTrainer (a `transformers.Trainer` with the fused KD loss).

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
from .trainer import DistillationTrainer

__all__ = [
    "CollaborativeLogitsProcessor",
    "ContrastiveDecodingLogitsProcessor",
    "DistillationTrainer",
    "DynamicFusionLogitsProcessor",
    "EFTLogitsProcessor",
    "ProxyTuningLogitsProcessor",
]
