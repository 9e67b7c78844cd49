r"""Knowledge distillation of a causal LM into a smaller one with collab_ops.hf.DistillationTrainer:
the KD loss is fused with both LM heads, so neither model's [tokens, vocab] logits are held.

    python python/distill.py --teacher Qwen/Qwen2.5-7B --student Qwen/Qwen2.5-0.5B \
        --dataset corpus.txt --output-dir distilled --max-steps 1000 --divergence jsd --beta 0.5 \
        --temperature 2.0 --bf16

    torchrun --nproc_per_node=8 python/distill.py ...   # one process per GPU (DDP)

Model arguments are anything `from_pretrained` takes (a local folder or a hub name); the two
models must share a tokenizer (their embedding widths may differ: the loss uses the narrower
vocabulary). --dataset is a text file: every non-empty line is one training example, truncated
to --max-length tokens. The student is trained on all of them and saved with the tokenizer to
--output-dir.
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, TrainingArguments

from collab_ops.hf import DistillationTrainer
from collab_ops.ops.distill import DIVERGENCES


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the model to distil from (frozen)")
    parser.add_argument("--student", required=True, help="the model to train")
    parser.add_argument("--dataset", required=True, help="a text file, one training example per non-empty line")
    parser.add_argument("--output-dir", required=True, help="where the trained student and its tokenizer are saved")
    parser.add_argument("--max-steps", type=positive_int, default=100, help="optimizer steps")
    parser.add_argument("--max-length", type=positive_int, default=512, help="tokens kept per example")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="examples per device and micro-batch")
    parser.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    kd = parser.add_argument_group("distillation loss (collab_ops.fused_linear_kd_loss)")
    kd.add_argument("--divergence", choices=DIVERGENCES, default="forward_kl")
    kd.add_argument("--beta", type=float, default=0.5, help="jsd / skew divergences' mixing weight")
    kd.add_argument("--temperature", type=float, default=1.0)
    kd.add_argument("--scale-by-t2", action="store_true", help="multiply the soft loss by temperature²")
    kd.add_argument("--soft-weight", type=float, default=1.0, help="weight of the divergence")
    kd.add_argument("--hard-weight", type=float, default=0.0, help="weight of the cross-entropy with the text")
    kd.add_argument("--chunk-size", type=positive_int, default=None, help="positions per chunk of the fused loss")
    kd.add_argument("--vocab-size", type=positive_int, default=None,
                    help="token ids compared (default: the narrower of the two LM heads)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    parser.add_argument("--use-cpu", action="store_true", help="train on the CPU even where a GPU is present")
    parser.add_argument("--logging-steps", type=positive_int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def load_tokenizer(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The student's tokenizer, after checking that the teacher's maps the same strings to the
    same ids, with a pad token (the eos token where the tokenizer has none)."""
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    if AutoTokenizer.from_pretrained(args.teacher).get_vocab() != tokenizer.get_vocab():
        parser.error(f"{args.teacher} has a different tokenizer vocabulary than {args.student}; they must share one")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            parser.error(f"the tokenizer of {args.student} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_examples(path: str, tokenizer, max_length: int) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        lines = [line.strip() for line in handle if line.strip()]
    if not lines:
        raise SystemExit(f"{path} holds no non-empty line to train on")
    encoded = tokenizer(lines, truncation=True, max_length=max_length)
    return [{"input_ids": ids} for ids in encoded["input_ids"]]


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args, parser)
    student = AutoModelForCausalLM.from_pretrained(args.student)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.bfloat16 if args.bf16 else None)
    kd_options = dict(divergence=args.divergence, beta=args.beta, temperature=args.temperature,
                      scale_by_t2=args.scale_by_t2, soft_weight=args.soft_weight, hard_weight=args.hard_weight)
    for name in ("chunk_size", "vocab_size"):
        if getattr(args, name) is not None:
            kd_options[name] = getattr(args, name)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        bf16=args.bf16, use_cpu=args.use_cpu, logging_steps=args.logging_steps, seed=args.seed,
        save_strategy="no", report_to=[],
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=training_args, kd_options=kd_options,
        train_dataset=load_examples(args.dataset, tokenizer, args.max_length),
        # labels = input_ids with -100 on padding; the trainer shifts them (position t predicts t+1)
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
    )
    result = trainer.train()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        print(f"trained {result.global_step} steps, mean loss {result.training_loss:.4f}; student saved to {args.output_dir}")
    return result


if __name__ == "__main__":
    main()
