"""The embedded demo: a tiny Llama model family trained on synthetic addition, shipped with the package.

- `task`: the problems, corpora (seeded), held-out split, classification view and metrics;
- `tokenizer`: the character-level tokenizer;
- `models`: `load_model_family()` and the architectures;
- `evaluate`: batched greedy evaluation of the models and their collaborations.

Needs `transformers` (imported when a model or tokenizer is built or loaded).
"""
from .evaluate import evaluate_addition, evaluate_family, generate_completions, greedy_agreement
from .models import FAMILY, load_model, load_model_family, load_tokenizer
from .task import (
    AdditionProblem,
    CorpusOptions,
    classification_examples,
    evaluation_problems,
    parse_completion,
    pretraining_texts,
    sample_problems,
    score_completions,
    tuning_texts,
)
from .tokenizer import build_tokenizer

__all__ = [
    "AdditionProblem",
    "CorpusOptions",
    "FAMILY",
    "build_tokenizer",
    "classification_examples",
    "evaluate_addition",
    "evaluate_family",
    "evaluation_problems",
    "generate_completions",
    "greedy_agreement",
    "load_model",
    "load_model_family",
    "load_tokenizer",
    "parse_completion",
    "pretraining_texts",
    "sample_problems",
    "score_completions",
    "tuning_texts",
]
