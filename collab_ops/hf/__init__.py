"""Hugging Face hooks: `generate` logits processors that run auxiliary models next to the main
one, batched speculative generation with a draft model and a (possibly fused) target, and
DistillationTrainer (a `transformers.Trainer` with the fused KD loss).

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
from .speculative import SpeculativeStats, speculative_generate
from .trainer import DistillationTrainer

__all__ = [
    "CollaborativeLogitsProcessor",
    "ContrastiveDecodingLogitsProcessor",
    "DistillationTrainer",
    "DynamicFusionLogitsProcessor",
    "EFTLogitsProcessor",
    "ProxyTuningLogitsProcessor",
    "SpeculativeStats",
    "speculative_generate",
]
