"""The Hugging Face hooks on one device: each logits processor's own cost per decoding step, and a
DistillationTrainer step against the same Trainer computing the KD loss from full logits.

    python bench/hf_bench.py OUT.json [--device cuda] [--quick]

Processor cost per step. The auxiliary models are replaced by replay models that return fixed
logits [B, V] (a dict lookup, no compute), so what is timed is everything the processor adds to a
decoding step beyond the auxiliary models' forward passes: the mask and position bookkeeping, the
row-order check (one host synchronisation) and the fusion arithmetic, plus the replay calls, whose
own cost is timed alone (`replay`) and subtracted in `overhead`. Three implementations run with the
same bookkeeping: collab_ops (the shipped processor), eager (the same arithmetic as a user writes it
in PyTorch: one pass over [B, V] per op) and bookkeeping (no arithmetic at all: the floor any
processor of this design pays). Each is timed as wall clock over `steps` consecutive calls after
the prompt call (the device synchronised at both ends), repeated, median per step.

Trainer step. Two random-weight Llama models (student and a wider teacher, same vocabulary)
trained with bf16 mixed precision on the GPU (fp32 on the CPU): DistillationTrainer
(fused_linear_kd_loss on hidden states) against FullLogitsKDTrainer (the models' logits, then
kd_loss on them; the same divergence and normalisation). Step time: wall clock per optimizer step
(forward, backward, AdamW), median over the steps after a warm-up; peak memory: the allocator's
peak above what was allocated before training (models included in neither).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import environment, synchronize  # noqa: E402
from collab_ops.baselines import eager_dynamic_fusion_weights, eager_fused_score  # noqa: E402

QWEN25_VOCAB = 152064


# ----------------------------------------------------------------------------------------------
# Processors


class ReplayCausalLM(torch.nn.Module):
    """Stands in for an auxiliary causal LM: returns the same next-token logits every call."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        from transformers import LlamaConfig

        # DynamicCache(config=...) reads the layer layout; nothing else uses the config.
        self.config = LlamaConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=1, vocab_size=logits.shape[-1])
        self.anchor = torch.nn.Parameter(torch.zeros(1, device=logits.device), requires_grad=False)
        self.logits = logits

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        # What the processors read of a causal LM's output; a ModelOutput would add ~25 µs of
        # dataclass machinery per call that belongs to the model, not to the processor.
        return SimpleNamespace(logits=self.logits[: input_ids.shape[0], None], past_key_values=past_key_values)


def eager_contrastive(scores, auxiliary, alpha=0.1):
    expert = torch.log_softmax(scores.float(), dim=-1)
    score = expert - torch.log_softmax(auxiliary[0].float(), dim=-1)
    implausible = expert < expert.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(alpha))
    return score.masked_fill(implausible, float("-inf"))


def eager_dynamic_fusion(scores, auxiliary):
    expert, base = auxiliary
    grid = tuple(round(0.1 * step, 1) for step in range(21))
    alpha = eager_dynamic_fusion_weights(scores, expert, base, grid)
    return scores.float() + alpha * (expert.float() - base.float())


def processor_presets():
    """name -> (number of auxiliary models, shipped processor factory, eager arithmetic)."""
    from collab_ops.hf import ContrastiveDecodingLogitsProcessor, DynamicFusionLogitsProcessor, ProxyTuningLogitsProcessor

    return {
        "proxy_tuning": (2, lambda models, mask, **kw: ProxyTuningLogitsProcessor(*models, attention_mask=mask, **kw),
                         lambda scores, aux: eager_fused_score([scores, *aux], (1.0, 1.0, -1.0))),
        "contrastive_decoding": (1, lambda models, mask, **kw: ContrastiveDecodingLogitsProcessor(
            *models, attention_mask=mask, **kw), eager_contrastive),
        "dynamic_fusion": (2, lambda models, mask, **kw: DynamicFusionLogitsProcessor(*models, attention_mask=mask, **kw),
                           eager_dynamic_fusion),
    }


def arithmetic_processor(models, arithmetic: Callable, mask, check_row_order=True):
    """A processor with the shipped bookkeeping and `arithmetic(scores, auxiliary_logits)`."""
    from collab_ops.hf.processors import _AuxiliaryModelsProcessor

    class ArithmeticProcessor(_AuxiliaryModelsProcessor):
        @torch.no_grad()
        def __call__(self, input_ids, scores):
            fused = arithmetic(scores, self._auxiliary_logits(input_ids))
            self._finish_step(input_ids)
            return fused

    return ArithmeticProcessor(models, mask, check_row_order)


def _same_distribution(ours: torch.Tensor, eager: torch.Tensor) -> bool:
    """Both score rows give the same next-token distribution (scores agree up to a row constant)."""
    ours_lp, eager_lp = torch.log_softmax(ours.float(), -1), torch.log_softmax(eager.float(), -1)
    finite = torch.isfinite(ours_lp)
    if not torch.equal(finite, torch.isfinite(eager_lp)):
        return False
    return torch.allclose(ours_lp[finite], eager_lp[finite], rtol=1e-3, atol=1e-3)


def time_processor_steps(make_processor, scores, prompt_ids, steps: int, repeats: int, device) -> list[float]:
    """Per-step seconds of each repeat: a fresh processor, the prompt call, then `steps` calls."""
    per_step = []
    token = torch.ones(prompt_ids.shape[0], 1, dtype=prompt_ids.dtype, device=device)
    sequences = [prompt_ids]
    for _ in range(steps):
        sequences.append(torch.cat([sequences[-1], token], dim=1))
    for _ in range(repeats):
        processor = make_processor()
        processor(sequences[0], scores)
        synchronize(device)
        start = time.perf_counter()
        for ids in sequences[1:]:
            processor(ids, scores)
        synchronize(device)
        per_step.append((time.perf_counter() - start) / steps)
    return per_step


def time_replay_steps(models, prompt_ids, steps: int, repeats: int, device) -> list[float]:
    """Per-step seconds of calling the replay models as a processor does, without the processor."""
    ids, mask, positions = prompt_ids[:, -1:], torch.ones_like(prompt_ids), prompt_ids[:, -1:]
    per_step = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            for model in models:
                model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=None, use_cache=True,
                      logits_to_keep=1).logits[:, -1]
        synchronize(device)
        per_step.append((time.perf_counter() - start) / steps)
    return per_step


def bench_processors(device, batches, vocab, steps, repeats, prompt_length=16) -> list[dict]:
    records = []
    generator = torch.Generator(device=device).manual_seed(0)
    for name, (num_auxiliary, shipped, eager) in processor_presets().items():
        for batch in batches:
            # generate hands processors fp32 scores; bf16 models' logits stay bf16.
            scores = 3 * torch.randn(batch, vocab, generator=generator, device=device)
            models = [ReplayCausalLM((3 * torch.randn(batch, vocab, generator=generator, device=device)).bfloat16())
                      for _ in range(num_auxiliary)]
            prompt_ids = torch.ones(batch, prompt_length, dtype=torch.long, device=device)
            mask = torch.ones_like(prompt_ids)
            implementations = {
                "collab_ops": lambda: shipped(models, mask),
                "eager": lambda: arithmetic_processor(models, eager, mask),
                "bookkeeping": lambda: arithmetic_processor(models, lambda s, aux: s, mask),
                # check_row_order=False: no per-step comparison of the rows, hence no host synchronisation
                "collab_ops, no row check": lambda: shipped(models, mask, check_row_order=False),
                "eager, no row check": lambda: arithmetic_processor(models, eager, mask, check_row_order=False),
                "bookkeeping, no row check": lambda: arithmetic_processor(models, lambda s, aux: s, mask,
                                                                          check_row_order=False),
            }
            first_outputs = {impl: make()(prompt_ids, scores) for impl, make in list(implementations.items())[:2]}
            agree = _same_distribution(first_outputs["collab_ops"], first_outputs["eager"])
            timings = {impl: time_processor_steps(make, scores, prompt_ids, steps, repeats, device)
                       for impl, make in implementations.items()}
            timings["replay"] = time_replay_steps(models, prompt_ids, steps, repeats, device)
            for impl, per_step in timings.items():
                ordered = sorted(per_step)
                records.append({
                    "preset": name, "B": batch, "V": vocab, "implementation": impl,
                    "median_us": statistics.median(ordered) * 1e6, "min_us": ordered[0] * 1e6,
                    "max_us": ordered[-1] * 1e6, "repeats": repeats, "steps_per_repeat": steps,
                    "matches_eager": agree,
                    "overhead_us": (statistics.median(ordered) - statistics.median(timings["replay"])) * 1e6,
                })
            summary = " ".join(f"{impl} {statistics.median(t) * 1e6:.1f} us" for impl, t in timings.items())
            print(f"processor {name} B={batch} V={vocab}: {summary}" + ("" if agree else "  (OUTPUTS DIFFER)"), flush=True)
    return records


# ----------------------------------------------------------------------------------------------
# Trainer


def llama(hidden: int, layers: int, vocab: int, seed: int, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)
    with torch.device(device):
        return LlamaForCausalLM(config)


def full_logits_trainer_class():
    from collab_ops.hf import DistillationTrainer
    from collab_ops.hf.trainer import IGNORE_INDEX, causal_lm_targets
    from collab_ops.ops.distill import kd_loss

    class FullLogitsKDTrainer(DistillationTrainer):
        """DistillationTrainer's targets and normalisation, with the loss from both models' full
        [tokens, vocab] logits (kd_loss on them), as a Trainer without the fused loss computes it."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            targets = causal_lm_targets(inputs)
            model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
            model_inputs["use_cache"] = False
            outputs = model(**model_inputs)
            with torch.no_grad(), self.accelerator.autocast():
                teacher_logits = self.teacher_model(**model_inputs).logits
            vocab = self.kd_options.get("vocab_size") or outputs.logits.shape[-1]
            options = {k: v for k, v in self.kd_options.items() if k not in ("chunk_size", "logit_softcap", "vocab_size")}
            loss = kd_loss(outputs.logits[..., :vocab].float(), teacher_logits[..., :vocab].float(), targets,
                           ignore_index=IGNORE_INDEX, reduction="sum", **options)
            loss = loss / torch.as_tensor(num_items_in_batch if num_items_in_batch is not None
                                          else targets.ne(IGNORE_INDEX).sum()).clamp(min=1)
            return (loss, outputs) if return_outputs else loss

    return FullLogitsKDTrainer


def bench_trainers(device, student_size, teacher_size, vocab, batch, length, steps, warmup) -> list[dict]:
    from transformers import TrainerCallback, TrainingArguments

    from collab_ops.hf import DistillationTrainer

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.seconds = []

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize(device)
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            self.seconds.append(time.perf_counter() - self._start)

    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, vocab, (length,), generator=generator)} for _ in range(batch * (steps + warmup))]

    def collate(items):
        ids = torch.stack([item["input_ids"] for item in items])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    kd_options = {"divergence": "forward_kl", "temperature": 1.0}
    records = []
    for name, trainer_class in (("DistillationTrainer", DistillationTrainer), ("full-logits Trainer", full_logits_trainer_class())):
        student = llama(*student_size, vocab, seed=0, device=device)
        teacher = llama(*teacher_size, vocab, seed=1, device=device)
        timer = StepTimes()
        with tempfile.TemporaryDirectory() as output_dir:
            args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=batch, max_steps=steps + warmup,
                                     learning_rate=1e-4, optim="adamw_torch", bf16=device.type == "cuda",
                                     use_cpu=device.type == "cpu", report_to=[], save_strategy="no", logging_steps=10**6,
                                     dataloader_pin_memory=False, disable_tqdm=True)
            trainer = trainer_class(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                                    data_collator=collate, kd_options=kd_options, callbacks=[timer])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            trainer.train()
            peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
        measured = sorted(timer.seconds[warmup:])
        record = {
            "trainer": name, "tokens_per_step": batch * length, "vocab": vocab,
            "student": {"hidden": student_size[0], "layers": student_size[1]},
            "teacher": {"hidden": teacher_size[0], "layers": teacher_size[1]},
            "precision": "bf16 mixed" if device.type == "cuda" else "fp32",
            "median_step_ms": statistics.median(measured) * 1e3, "steps_timed": len(measured),
            "peak_extra_gib": None if peak is None else peak / 2**30,
            "final_loss": trainer.state.log_history[-1].get("train_loss"),
        }
        records.append(record)
        print(f"trainer {name}: {record['median_step_ms']:.1f} ms/step, peak extra "
              f"{'n/a' if peak is None else f'{peak / 2**30:.2f} GiB'}", flush=True)
        del trainer, student, teacher
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


# ----------------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# Hugging Face hooks on {env['device']} ({env['date']}, torch {env['torch']}, "
             f"transformers {env['transformers']})", "",
             "Processor overhead per decoding step beyond the auxiliary models' forward passes (µs, median per "
             "step minus the replayed forwards' own time), with the per-step row-order check (default) and "
             "without it (`check_row_order=False`: no host synchronisation):", "",
             "| preset | B | V | collab_ops | eager | bookkeeping only | collab_ops, no row check | eager, no row check "
             "| bookkeeping only, no row check | replay calls | same distribution |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = {}
    for r in results["processors"]:
        rows.setdefault((r["preset"], r["B"], r["V"]), {})[r["implementation"]] = r
    for (preset, batch, vocab), impls in rows.items():
        overheads = " | ".join(f"{impls[name]['overhead_us']:.1f}" for name in (
            "collab_ops", "eager", "bookkeeping", "collab_ops, no row check", "eager, no row check",
            "bookkeeping, no row check"))
        lines.append(f"| {preset} | {batch} | {vocab} | {overheads} | {impls['replay']['median_us']:.1f} | "
                     f"{'yes' if impls['collab_ops']['matches_eager'] else 'NO'} |")
    lines += ["", "Distillation training step (forward, backward, AdamW):", "",
              "| trainer | tokens/step | V | student (h, layers) | teacher (h, layers) | precision | ms/step | peak extra GiB |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results["trainers"]:
        peak = "n/a" if r["peak_extra_gib"] is None else f"{r['peak_extra_gib']:.2f}"
        lines.append(f"| {r['trainer']} | {r['tokens_per_step']} | {r['vocab']} | {r['student']['hidden']}, "
                     f"{r['student']['layers']} | {r['teacher']['hidden']}, {r['teacher']['layers']} | {r['precision']} | "
                     f"{r['median_step_ms']:.1f} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="results JSON (a .md table is written next to it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes: checks the script, measures little")
    parser.add_argument("--skip-trainer", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        processor_shapes = dict(batches=(1, 4), vocab=4096, steps=4, repeats=2)
        trainer_shapes = dict(student_size=(32, 1), teacher_size=(64, 1), vocab=512, batch=2, length=32, steps=2, warmup=1)
    else:
        processor_shapes = dict(batches=(1, 8, 32), vocab=QWEN25_VOCAB, steps=20, repeats=15)
        trainer_shapes = dict(student_size=(512, 4), teacher_size=(1024, 4), vocab=151936, batch=8, length=512,
                              steps=6, warmup=2)
    results = {"environment": environment(device), "processors": bench_processors(device, **processor_shapes),
               "trainers": [] if args.skip_trainer else bench_trainers(device, **trainer_shapes)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
