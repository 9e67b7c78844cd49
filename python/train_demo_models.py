"""Train the embedded demo model family (collab_ops/demo) from scratch and write its weights.

    python python/train_demo_models.py            # writes collab_ops/demo/weights/

What it does, all seeded and on the CPU by default (same weights on every run with the same torch
build and thread count):
1. builds the character tokenizer and saves it to <out>/tokenizer;
2. generates the pretraining corpus (`collab_ops.demo.task.pretraining_texts`) and pretrains
   large_base and small_base on it, in the same order, with next-token cross-entropy on every token;
3. fine-tunes a copy of small_base on the tuned answer format (`task.tuning_texts`) -> small_tuned;
4. saves each model in float16 with `save_pretrained`, reloads the saved files and evaluates them
   and their collaborations on held-out problems (`collab_ops.demo.evaluate_family`); the numbers
   and timings go to <out>/training_summary.json.

The shipped weights are this script's output with its defaults (one thread): 18.5 minutes on one
core of a 2-core AMD EPYC (large_base 890 s, small_base 126 s, small_tuned 92 s; the timings and
held-out evaluation are in training_summary.json).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collab_ops.demo import evaluate, models, task  # noqa: E402
from collab_ops.demo.tokenizer import build_tokenizer  # noqa: E402


def training_batches(texts, tokenizer, batch_size, pieces=4):
    """Consecutive batches of `texts`, each text followed by the end token, each batch as `pieces`
    padded pieces of (input_ids, attention_mask, labels).

    A batch is cut into pieces of similar length (its texts sorted by length) so that a few long
    documents do not pad the whole batch; `train` sums the pieces' losses into the batch's mean,
    so the gradient is the whole batch's, with about half the padded positions computed.
    """
    for start in range(0, len(texts) - batch_size + 1, batch_size):
        batch = sorted((t + tokenizer.eos_token for t in texts[start : start + batch_size]), key=len)
        size = -(-batch_size // pieces)
        batch_pieces = []
        for piece in (batch[i : i + size] for i in range(0, batch_size, size)):
            encoded = tokenizer(piece, return_tensors="pt", padding=True, padding_side="right")
            labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
            batch_pieces.append((encoded.input_ids, encoded.attention_mask, labels))
        yield batch_pieces


def train(model, texts, tokenizer, *, steps, batch_size, lr, warmup, device, log_every, evaluate_every=0, label=""):
    """AdamW with linear warm-up and cosine decay to lr/10, gradient clipping at 1, next-token
    cross-entropy averaged over the batch's tokens; returns the loss log."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)

    def schedule(step):
        progress = min(step, steps) / steps
        return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    log, running, start = [], 0.0, time.perf_counter()
    for step, pieces in enumerate(training_batches(texts, tokenizer, batch_size)):
        if step == steps:
            break
        # Each row's first token has no prediction; the rest of its text (and end token) counts.
        counted = sum(int((labels[:, 1:] != -100).sum()) for _, _, labels in pieces)
        batch_loss = 0.0
        for ids, mask, labels in pieces:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(device), reduction="sum"
            ) / counted
            loss.backward()
            batch_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running += batch_loss
        if (step + 1) % log_every == 0 or step + 1 == steps:
            entry = {"step": step + 1, "loss": round(running / ((step % log_every) + 1), 4),
                     "seconds": round(time.perf_counter() - start, 1)}
            if evaluate_every and ((step + 1) % evaluate_every == 0 or step + 1 == steps):
                model.eval()
                entry.update(evaluate.evaluate_addition(model, tokenizer, task.evaluation_problems(256)))
                entry.pop("seconds")
                model.train()
            log.append(entry)
            running = 0.0
            print(f"  {label} {entry}", flush=True)
    model.eval()
    return log


def save(model, tokenizer, path: Path):
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    copy.deepcopy(model).to("cpu", torch.float16).save_pretrained(str(path))


def pretrain(size, corpus, tokenizer, *, seed, steps, lr, label, **train_options):
    """A fresh model of architecture `size`, seeded, trained on `corpus` from its first document."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(models.model_config(size, tokenizer))
    log = train(model, corpus, tokenizer, steps=steps, lr=lr, warmup=100, label=label, **train_options)
    return model, log


def fine_tune(base, tuning, tokenizer, *, seed, steps, lr, label="small_tuned", **train_options):
    """A copy of `base` fine-tuned on `tuning` (the base itself is left as it was)."""
    torch.manual_seed(seed)
    tuned = copy.deepcopy(base)
    log = train(tuned, tuning, tokenizer, steps=steps, lr=lr, warmup=20, label=label, **train_options)
    return tuned, log


def load_saved_family(out: Path, tokenizer, device):
    from transformers import LlamaForCausalLM

    family = {"tokenizer": tokenizer}
    for name in models.FAMILY:
        family[name] = LlamaForCausalLM.from_pretrained(str(out / name), dtype=torch.float32).to(device).eval()
    return family


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=models.WEIGHTS_DIR)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--large-steps", type=int, default=3000)
    parser.add_argument("--small-steps", type=int, default=3000)
    parser.add_argument("--tune-steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--tune-lr", type=float, default=2e-3)
    defaults = task.CorpusOptions()
    parser.add_argument("--tuned-format-rate", type=float, default=defaults.tuned_format_rate)
    parser.add_argument("--forum-rate", type=float, default=defaults.forum_rate)
    parser.add_argument("--forum-slip-rate", type=float, default=defaults.forum_slip_rate)
    parser.add_argument("--eval-problems", type=int, default=512)
    parser.add_argument("--evaluate-every", type=int, default=500, help="held-out accuracy every N steps (0: never)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    started = time.perf_counter()
    timings = {}
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(args.out / "tokenizer"))

    options = task.CorpusOptions(
        tuned_format_rate=args.tuned_format_rate, forum_rate=args.forum_rate, forum_slip_rate=args.forum_slip_rate
    )
    corpus = task.pretraining_texts(max(args.large_steps, args.small_steps) * args.batch_size, args.seed, options)
    tuning = task.tuning_texts(args.tune_steps * args.batch_size, args.seed + 1)
    common = dict(batch_size=args.batch_size, device=args.device, log_every=100, evaluate_every=args.evaluate_every)
    logs = {}
    trained = {}
    for name, size, steps in (("large_base", "large", args.large_steps), ("small_base", "small", args.small_steps)):
        print(f"pretraining {name} ({steps} steps)", flush=True)
        t0 = time.perf_counter()
        trained[name], logs[name] = pretrain(
            size, corpus, tokenizer, seed=args.seed, steps=steps, lr=args.lr, label=name, **common
        )
        timings[f"train_{name}_s"] = round(time.perf_counter() - t0, 1)
        save(trained[name], tokenizer, args.out / name)

    print(f"fine-tuning small_tuned ({args.tune_steps} steps)", flush=True)
    t0 = time.perf_counter()
    tuned, logs["small_tuned"] = fine_tune(
        trained["small_base"], tuning, tokenizer, seed=args.seed, steps=args.tune_steps, lr=args.tune_lr, **common
    )
    timings["train_small_tuned_s"] = round(time.perf_counter() - t0, 1)
    save(tuned, tokenizer, args.out / "small_tuned")
    timings["total_training_s"] = round(time.perf_counter() - started, 1)

    print("evaluating the saved family", flush=True)
    t0 = time.perf_counter()
    family = load_saved_family(args.out, tokenizer, args.device)
    results = evaluate.evaluate_family(family, args.eval_problems)
    timings["evaluate_s"] = round(time.perf_counter() - t0, 1)
    for style in ("worksheet", "forum"):
        for name, row in results[style].items():
            print(f"  {style:9s} {name:16s} " + " ".join(f"{k}={v:.3f}" for k, v in row.items() if k != "n"))
    print(f"  speculative_agreement {results['speculative_agreement']:.3f}")
    summary = {
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__,
        "architectures": models.ARCHITECTURES,
        "timings": timings,
        "evaluation": results,
        "training_logs": logs,
    }
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(timings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
