"""`python -m collab_ops demo`: every collaboration method on the embedded model family, each with
the metric its paper reports against the natural baselines, then our kernels against eager PyTorch.

The family (`collab_ops.demo.models`) was trained on a synthetic addition task (`collab_ops.demo.task`):
the large base adds well, the small base less well, the small tuned model answers in a format the
bases rarely use ("the answer is 168."). Every number below is measured when the demo runs; the
demo loads the shipped weights and trains only the distillation students and the weak-to-strong
probes, which take seconds.
"""
from __future__ import annotations

import copy
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import evaluate, task
from .evaluate import _batches
from .models import ARCHITECTURES, WEIGHTS_DIR, load_model_family

@dataclass
class DemoSettings:
    device: torch.device
    quick: bool
    num_problems: int
    batch_size: int
    distill_steps: int
    probe_examples: int
    out_dir: Path

    @classmethod
    def make(cls, device: Optional[str], quick: bool, out_dir: Path) -> "DemoSettings":
        resolved = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(
            device=resolved,
            quick=quick,
            num_problems=48 if quick else 256,
            batch_size=64,
            distill_steps=60 if quick else 600,
            probe_examples=400 if quick else 1000,
            out_dir=out_dir,
        )


@dataclass
class Progress:
    started: float = field(default_factory=time.perf_counter)

    def say(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f}s] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# Generation on the evaluation problems


def _encode(tokenizer, texts: Sequence[str], device: torch.device):
    encoded = tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="left")
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def _decode_new(tokenizer, sequences: torch.Tensor, prompt_length: int) -> list[str]:
    return tokenizer.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)


def _completions(model, tokenizer, problems, settings, **options) -> list[str]:
    return evaluate.generate_completions(model, tokenizer, [p.prompt for p in problems],
                                         batch_size=settings.batch_size, **options)


def _scored(name: str, problems, completions, **extra) -> dict:
    return dict(method=name, **task.score_completions(problems, completions), **extra)


# ----------------------------------------------------------------------------------------------
# The methods


def behaviour_transfer(family, problems, settings, progress) -> list[dict]:
    """Proxy-tuning, EFT up-scaling and dynamic logits fusion: does the large base pick up the small
    tuned model's answer format while keeping its own accuracy?"""
    from ..hf import DynamicFusionLogitsProcessor, EFTLogitsProcessor, ProxyTuningLogitsProcessor

    tokenizer, large, small, tuned = (family[k] for k in ("tokenizer", "large_base", "small_base", "small_tuned"))
    runs = [
        ("large base", large, None),
        ("small base", small, None),
        ("small tuned", tuned, None),
        ("proxy-tuning α=1: large + (tuned − base)", large,
         lambda mask: ProxyTuningLogitsProcessor(tuned, small, alpha=1.0, attention_mask=mask)),
        ("EFT up-scaling β=0.5", large, lambda mask: EFTLogitsProcessor(tuned, small, beta=0.5, attention_mask=mask)),
        ("dynamic logits fusion (per-step α)", large,
         lambda mask: DynamicFusionLogitsProcessor([tuned], small, attention_mask=mask)),
    ]
    rows = []
    for name, model, processor in runs:
        progress.say(f"behaviour transfer: {name}")
        completions = _completions(model, tokenizer, problems, settings, processor=processor)
        rows.append(_scored(name, problems, completions, example=completions[0]))
    return rows


def contrastive_decoding(family, problems, settings, progress) -> list[dict]:
    """Contrastive decoding with the large model as expert and the small base as amateur, against
    the expert's greedy and sampled outputs, on forum prompts, where most replies in the corpus drop
    the carries: accuracy, and how often a problem with a carry gets that amateur slip."""
    from ..hf import ContrastiveDecodingLogitsProcessor

    tokenizer, large, small = family["tokenizer"], family["large_base"], family["small_base"]
    runs = [
        ("large greedy", None, False),
        ("large sampling (T=1)", None, True),
        ("CD (Li et al.), α=0.1", lambda mask: ContrastiveDecodingLogitsProcessor(small, alpha=0.1, attention_mask=mask), False),
        ("CD for reasoning (O'Brien & Lewis), β=0.5", lambda mask: ContrastiveDecodingLogitsProcessor(
            small, alpha=0.1, beta=0.5, attention_mask=mask), False),
    ]
    rows = []
    for name, processor, do_sample in runs:
        progress.say(f"contrastive decoding: {name}")
        completions = _completions(large, tokenizer, problems, settings, processor=processor, do_sample=do_sample)
        rows.append(_scored(name, problems, completions))
    return rows


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - began


@torch.no_grad()
def speculative_decoding(family, problems, settings, progress) -> list[dict]:
    """Speculative decoding, small base drafting for the large base (and for a proxy-tuned target):
    the output must equal the target's own greedy output; acceptance rate and wall-clock speed-up."""
    from transformers import LogitsProcessorList

    from ..hf import ProxyTuningLogitsProcessor, speculative_generate

    tokenizer, large, small, tuned = (family[k] for k in ("tokenizer", "large_base", "small_base", "small_tuned"))
    options = dict(max_new_tokens=evaluate.MAX_NEW_TOKENS, pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    targets = [
        ("large base", large, None, lambda mask: None),
        ("proxy-tuned large (fused target)", [large, tuned, small], [1.0, 1.0, -1.0],
         lambda mask: LogitsProcessorList([ProxyTuningLogitsProcessor(tuned, small, alpha=1.0, attention_mask=mask)])),
    ]
    rows = []
    for name, target, weights, processors in targets:
        progress.say(f"speculative decoding: {name}")
        plain_time = speculative_time = 0.0
        identical = drafted = accepted = 0
        completions = []
        for batch in _batches(problems, settings.batch_size):
            ids, mask = _encode(tokenizer, [p.prompt for p in batch], settings.device)
            main = target[0] if isinstance(target, list) else target
            reference, seconds = _timed(lambda: main.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, logits_processor=processors(mask), **options),
                settings.device)
            plain_time += seconds
            (ours, stats), seconds = _timed(lambda: speculative_generate(
                target, small, ids, attention_mask=mask, max_new_tokens=evaluate.MAX_NEW_TOKENS, num_draft_tokens=4,
                target_weights=weights, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                return_stats=True), settings.device)
            speculative_time += seconds
            new_reference = _decode_new(tokenizer, reference, ids.shape[1])
            new_ours = _decode_new(tokenizer, ours, ids.shape[1])
            identical += sum(a == b for a, b in zip(new_reference, new_ours))
            drafted += int(stats.drafted.sum())
            accepted += int(stats.accepted.sum())
            completions += new_ours
        row = _scored(name, problems, completions)
        row.update(identical_to_target_greedy=identical / len(problems), acceptance_rate=accepted / max(drafted, 1),
                   target_generate_s=plain_time, speculative_s=speculative_time,
                   speedup=plain_time / speculative_time)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Training methods: distillation and weak-to-strong


class _TextDataset(torch.utils.data.Dataset):
    def __init__(self, texts: Sequence[str]):
        self.texts = list(texts)

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, index):
        return self.texts[index]


def _lm_collator(tokenizer):
    def collate(texts):
        encoded = tokenizer([t + tokenizer.eos_token for t in texts], return_tensors="pt", padding=True,
                            padding_side="right")
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        return dict(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], labels=labels)

    return collate


@torch.no_grad()
def _heldout_loss(model, tokenizer, problems, settings) -> float:
    """Mean next-token cross-entropy of the correct plain answers (and end token) given the prompts."""
    total, count = 0.0, 0
    for batch in _batches(problems, settings.batch_size):
        texts = [p.prompt + p.completion() + tokenizer.eos_token for p in batch]
        ids, mask = _encode(tokenizer, texts, settings.device)
        prompt_lengths = [len(tokenizer(p.prompt)["input_ids"]) for p in batch]
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        for row, prompt_length in enumerate(prompt_lengths):
            pad = int((mask[row] == 0).sum())
            answer = log_probs[row, pad + prompt_length - 1 :]
            total -= float(answer.sum())
            count += answer.numel()
    return total / count


# Share of the distillation set's answers that are wrong (plausible slips, each problem its own):
# annotation noise that training on labels learns and a teacher that adds well does not pass on.
LABEL_NOISE = 0.5


def distillation(family, problems, settings, progress) -> list[dict]:
    """The small base trained for a few hundred more steps on a labelled set with annotation noise
    (half the answers a plausible wrong sum): on the labels alone (plain `Trainer`), and by
    `DistillationTrainer` from the large base (forward KL to the teacher's next-token distribution,
    Hinton et al.'s soft targets, no labels). Held-out accuracy and cross-entropy of the correct answers."""
    from transformers import Trainer, TrainingArguments

    from ..hf import DistillationTrainer

    tokenizer, teacher = family["tokenizer"], family["large_base"]
    texts = task.noisy_label_texts(settings.distill_steps * 32, seed=2024, noise_rate=LABEL_NOISE)
    rows = []
    for name in ("labels only (Trainer)", "distilled from the large base (DistillationTrainer)"):
        progress.say(f"distillation: {name}, {settings.distill_steps} steps")
        # Both students start from the small base and continue on the same corpus, same steps.
        student = copy.deepcopy(family["small_base"]).train()
        args = TrainingArguments(
            output_dir=str(settings.out_dir / "trainer"), max_steps=settings.distill_steps,
            per_device_train_batch_size=32, learning_rate=1e-3, warmup_steps=settings.distill_steps // 10,
            lr_scheduler_type="cosine", logging_strategy="no", save_strategy="no",
            report_to=[], use_cpu=settings.device.type == "cpu", remove_unused_columns=False, seed=0,
            disable_tqdm=True, dataloader_num_workers=0,
        )
        common = dict(model=student, args=args, train_dataset=_TextDataset(texts), data_collator=_lm_collator(tokenizer))
        if name.startswith("labels"):
            trainer = Trainer(**common)
        else:
            trainer = DistillationTrainer(teacher_model=teacher, kd_options=dict(
                divergence="forward_kl", soft_weight=1.0, hard_weight=0.0), **common)
        output, seconds = _timed(trainer.train, settings.device)
        student.eval()
        completions = _completions(student, tokenizer, problems, settings)
        row = _scored(name, problems, completions)
        row.update(heldout_answer_loss=_heldout_loss(student, tokenizer, problems, settings), train_s=seconds,
                   train_loss=output.training_loss, steps=settings.distill_steps)
        rows.append(row)
    teacher_completions = _completions(teacher, tokenizer, problems, settings)
    teacher_row = _scored("teacher (large base)", problems, teacher_completions)
    teacher_row.update(heldout_answer_loss=_heldout_loss(teacher, tokenizer, problems, settings))
    return [teacher_row] + rows


@torch.no_grad()
def _answer_features(model, tokenizer, examples, settings) -> torch.Tensor:
    """What the model makes of each document's written answer: the log-probabilities it gives the
    answer tokens (mean, minimum, first) and its mean last-layer hidden state over them."""
    features = []
    for batch in _batches(examples, 256):
        texts = [text for text, _ in batch]
        ids, mask = _encode(tokenizer, texts, settings.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        outputs = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True)
        hidden = outputs.hidden_states[-1].float()
        token_log_probs = torch.log_softmax(outputs.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        for row, text in enumerate(texts):
            prompt_length = len(tokenizer(text[: text.index("A:") + 2])["input_ids"])
            first = int((mask[row] == 0).sum()) + prompt_length  # the first answer token
            answer = token_log_probs[row, first - 1 :]
            features.append(torch.cat([answer.mean()[None], answer.min()[None], answer[:1], hidden[row, first:].mean(0)]))
    return torch.stack(features)


def _train_probe(features, targets, *, aux_coef: Optional[float] = None, epochs: int = 30, seed: int = 0):
    """A linear probe on frozen features: soft-target cross-entropy, or `weak_to_strong_loss`."""
    from ..ops.distill import weak_to_strong_loss

    generator = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(features.shape[1], 2).to(features.device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    rows = features.shape[0]
    batch = 128
    steps = epochs * ((rows + batch - 1) // batch)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(rows, generator=generator).to(features.device)
        for index in order.split(batch):
            logits = probe(features[index])
            if aux_coef is None:
                loss = -(targets[index] * torch.log_softmax(logits, -1)).sum(-1).mean()
            else:
                loss = weak_to_strong_loss(logits, targets[index], aux_coef=aux_coef, warmup_frac=0.2,
                                           step_frac=step / steps)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return probe


def weak_to_strong(family, settings, progress) -> list[dict]:
    """Burns et al.'s setup with linear probes on frozen features ("is this sum correct?"): a weak
    supervisor (small base + probe trained on ground truth) labels a second set; the strong model
    (large base + probe) learns from those weak labels with plain cross-entropy and with the
    auxiliary confidence loss; the ceiling is the strong probe trained on ground truth.
    PGR = (weak-to-strong − weak) / (ceiling − weak)."""
    tokenizer, small, large = family["tokenizer"], family["small_base"], family["large_base"]
    n = settings.probe_examples
    supervisor_set = task.classification_examples(n, seed=11)
    student_set = task.classification_examples(n, seed=12)
    test_set = task.classification_examples(n, seed=13, held_out=True)
    progress.say(f"weak-to-strong: features of {3 * n} documents from both models")

    def labels(examples):
        return torch.tensor([label for _, label in examples], device=settings.device)

    def one_hot(values):
        return torch.nn.functional.one_hot(values, 2).float()

    def standardised(model):
        feats = [_answer_features(model, tokenizer, s, settings) for s in (supervisor_set, student_set, test_set)]
        mean, std = feats[0].mean(0), feats[0].std(0).clamp_min(1e-6)
        return [(f - mean) / std for f in feats]

    weak_sup, weak_student, weak_test = standardised(small)
    strong_sup, strong_student, strong_test = standardised(large)

    def accuracy(probe, feats, examples):
        with torch.no_grad():
            return float((probe(feats).argmax(-1) == labels(examples)).float().mean())

    progress.say("weak-to-strong: training the probes")
    weak_probe = _train_probe(weak_sup, one_hot(labels(supervisor_set)))
    with torch.no_grad():
        weak_labels = torch.softmax(weak_probe(weak_student), -1)
    runs = {
        "weak supervisor (small base, ground truth)": (weak_probe, weak_test),
        "strong on weak labels (cross-entropy)": (_train_probe(strong_student, weak_labels), strong_test),
        "strong on weak labels + aux confidence loss": (_train_probe(strong_student, weak_labels, aux_coef=0.75), strong_test),
        "strong ceiling (large base, ground truth)": (_train_probe(strong_student, one_hot(labels(student_set))), strong_test),
    }
    scores = {name: accuracy(probe, feats, test_set) for name, (probe, feats) in runs.items()}
    weak, ceiling = scores["weak supervisor (small base, ground truth)"], scores["strong ceiling (large base, ground truth)"]
    rows = []
    for name, value in scores.items():
        row = dict(method=name, accuracy=value, n=len(test_set))
        if name.startswith("strong on weak"):
            row["performance_gap_recovered"] = (value - weak) / (ceiling - weak) if ceiling > weak else None
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Reporting


def _format_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table: columns are (key, header, format)."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, fmt in columns:
            value = row.get(key)
            line.append("–" if value is None else (fmt.format(value) if fmt else str(value)))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = [f"\n{title}"]
    for i, line in enumerate(cells):
        out.append("  " + "  ".join(c.ljust(w) for c, w in zip(line, widths)))
        if i == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(out)


PERCENT = "{:.1%}"
TABLES = {
    "behaviour_transfer": ("Proxy-tuning, EFT up-scaling, dynamic logits fusion: the large model gains the tuned format",
                           [("method", "method", ""), ("accuracy", "accuracy", PERCENT),
                            ("format_rate", "tuned format", PERCENT), ("example", "first completion", "{!r}")]),
    "contrastive_decoding": ("Contrastive decoding on forum prompts: expert = large base, amateur = small base",
                             [("method", "method", ""), ("accuracy", "accuracy", PERCENT),
                              ("slip_rate", "carry dropped (of problems with a carry)", PERCENT)]),
    "speculative_decoding": ("Speculative decoding: small base drafts 4 tokens per round",
                             [("method", "target", ""), ("identical_to_target_greedy", "same as target greedy", PERCENT),
                              ("acceptance_rate", "drafts accepted", PERCENT), ("target_generate_s", "target alone s", "{:.2f}"),
                              ("speculative_s", "speculative s", "{:.2f}"), ("speedup", "speed-up", "{:.2f}×")]),
    "distillation": ("Distillation: the small base trained further, on labels or from the large teacher",
                     [("method", "model", ""), ("accuracy", "accuracy", PERCENT),
                      ("heldout_answer_loss", "held-out answer CE", "{:.3f}"), ("train_s", "train s", "{:.1f}")]),
    "weak_to_strong": ("Weak-to-strong (linear probes, 'is this sum correct?')",
                       [("method", "model", ""), ("accuracy", "test accuracy", PERCENT),
                        ("performance_gap_recovered", "PGR", "{:.2f}")]),
    "kernels": ("Kernels on this machine: collab_ops against eager PyTorch",
                [("op", "op", ""), ("shape", "shape", ""), ("backend", "backend", ""), ("eager_ms", "eager ms", "{:.2f}"),
                 ("ours_ms", "collab_ops ms", "{:.2f}"), ("speedup", "speed-up", "{:.1f}×")]),
}


def _save_figure(results: dict, path: Path) -> Optional[str]:
    """A PNG with one panel per method family; None when matplotlib is missing (the reason printed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no figure"
    panels = [
        ("behaviour_transfer", ["accuracy", "format_rate"], "proxy-tuning / EFT / dynamic fusion"),
        ("contrastive_decoding", ["accuracy", "slip_rate"], "contrastive decoding (forum prompts)"),
        ("speculative_decoding", ["acceptance_rate", "speedup"], "speculative decoding"),
        ("distillation", ["accuracy", "heldout_answer_loss"], "distillation"),
        ("weak_to_strong", ["accuracy"], "weak-to-strong"),
        ("kernels", ["speedup"], "kernel speed-up over eager"),
    ]
    panels = [p for p in panels if results.get(p[0])]
    figure, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)))
    for axis, (key, metrics, title) in zip(list(axes) if len(panels) > 1 else [axes], panels):
        rows = results[key]
        labels = [row.get("method") or row.get("op") for row in rows]
        width = 0.8 / len(metrics)
        for i, metric in enumerate(metrics):
            values = [row.get(metric) or 0.0 for row in rows]
            axis.barh([y + i * width for y in range(len(rows))], values, height=width, label=metric)
        axis.set_yticks([y + width * (len(metrics) - 1) / 2 for y in range(len(rows))], labels, fontsize=7)
        axis.invert_yaxis()
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def run(quick: bool = False, device: Optional[str] = None, out_dir: Path = Path("demo_results")) -> dict:
    from .. import backend_status
    from .kernel_table import kernel_table

    out_dir.mkdir(parents=True, exist_ok=True)
    settings = DemoSettings.make(device, quick, out_dir)
    progress = Progress()
    torch.manual_seed(0)
    progress.say(f"loading the model family from {WEIGHTS_DIR} on {settings.device} "
                 f"(large: {ARCHITECTURES['large']}, small: {ARCHITECTURES['small']})")
    family = load_model_family(settings.device)
    problems = task.evaluation_problems(settings.num_problems)
    forum_problems = task.evaluation_problems(settings.num_problems, style="forum")
    results = dict(
        settings=dict(device=str(settings.device), quick=quick, held_out_problems=len(problems),
                      distill_steps=settings.distill_steps, probe_examples=settings.probe_examples),
        versions=dict(python=platform.python_version(), torch=torch.__version__),
        backends=backend_status(),
    )
    sections = [
        ("behaviour_transfer", lambda: behaviour_transfer(family, problems, settings, progress)),
        ("contrastive_decoding", lambda: contrastive_decoding(family, forum_problems, settings, progress)),
        ("speculative_decoding", lambda: speculative_decoding(family, problems, settings, progress)),
        ("distillation", lambda: distillation(family, problems, settings, progress)),
        ("weak_to_strong", lambda: weak_to_strong(family, settings, progress)),
        ("kernels", lambda: (progress.say("kernel table"), kernel_table(settings.device, quick=quick))[1]),
    ]
    for key, section in sections:
        results[key] = section()
        title, columns = TABLES[key]
        print(_format_table(title, results[key], columns), flush=True)
    results["wall_s"] = time.perf_counter() - progress.started
    json_path, png_path = out_dir / "demo.json", out_dir / "demo.png"
    json_path.write_text(json.dumps(results, indent=1, default=str))
    figure_problem = _save_figure(results, png_path)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if figure_problem is None else f" ({figure_problem})"))
    progress.say("demo done")
    return results
