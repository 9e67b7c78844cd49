"""DistillationTrainer on CUDA (the fused loss's GPU backend): the first step against the loss from
full logits in fp32 and under bf16 mixed precision, gradient accumulation, and the peak memory of
a training step against the size of one model's logits (skipped without a GPU)."""
import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (requirements-test.txt)")

from collab_ops.hf import DistillationTrainer  # noqa: E402
from hf_trainer_ddp_worker import ONE_STEP_KD_OPTIONS, UNEVEN_LENGTHS  # noqa: E402
from test_hf_trainer import naive_kd_loss, parameters, training_args  # noqa: E402
from tiny_models import VOCAB, pad_batch, tiny_llama, token_rows  # noqa: E402

KD_OPTIONS = {"divergence": "jsd", "beta": 0.3, "temperature": 2.0, "hard_weight": 0.5}


def train(tmp_path, student, teacher, rows, kd_options, **overrides):
    args = training_args(tmp_path, use_cpu=False, **overrides)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                                  data_collator=pad_batch, kd_options=kd_options)
    trainer.train()
    return trainer


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16 mixed precision"])
def test_first_step_matches_loss_from_full_logits_on_cuda(tmp_path, bf16):
    student, teacher = tiny_llama(0).cuda(), tiny_llama(1, vocab_size=VOCAB + 16, hidden_size=48).cuda()
    rows = token_rows(0, (5, 9, 3, 7))
    batch = {key: value.cuda() for key, value in pad_batch(rows).items()}
    naive_student = copy.deepcopy(student).train()
    expected = naive_kd_loss(naive_student, teacher, batch, vocab=VOCAB, **KD_OPTIONS)
    expected.backward()
    before = parameters(student)

    trainer = train(tmp_path, student, teacher, rows, KD_OPTIONS, bf16=bf16)
    assert next(student.parameters()).device.type == "cuda"
    # fp32: the Triton kernels may multiply in TF32 (10-bit mantissa); bf16 keeps 8 bits.
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected.item(), rel=3e-2 if bf16 else 2e-3)
    if not bf16:
        naive_grads = {name: p.grad for name, p in naive_student.named_parameters()}
        for name, p in student.named_parameters():
            torch.testing.assert_close(before[name] - p.detach(), naive_grads[name], rtol=2e-2, atol=1e-4, msg=name)


def test_gradient_accumulation_equals_one_double_batch_on_cuda(tmp_path):
    rows = token_rows(1, UNEVEN_LENGTHS)
    trained = {}
    for micro_batch, accumulation in ((4, 1), (2, 2)):
        student = tiny_llama(0).cuda()
        train(tmp_path / f"{micro_batch}x{accumulation}", student, tiny_llama(1, hidden_size=48).cuda(), rows,
              ONE_STEP_KD_OPTIONS, per_device_train_batch_size=micro_batch, gradient_accumulation_steps=accumulation)
        trained[micro_batch, accumulation] = parameters(student)
    initial = {name: p.cuda() for name, p in parameters(tiny_llama(0)).items()}
    for name, p in trained[4, 1].items():
        torch.testing.assert_close(trained[2, 2][name] - initial[name], p - initial[name], rtol=1e-2, atol=1e-5, msg=name)


def largest_allocations(snapshot, count=6):
    """The biggest allocations the memory history recorded, each with its Python frames in
    collab_ops, transformers or torch's optimizers: what to look at when the peak is too high."""
    allocations = sorted((event for trace in snapshot["device_traces"] for event in trace if event["action"] == "alloc"),
                         key=lambda event: -event["size"])[:count]
    return [(f"{event['size'] / 2**20:.0f} MiB", [f"{Path(frame['filename']).name}:{frame['line']} {frame['name']}"
                                                   for frame in event["frames"]
                                                   if any(part in frame["filename"] for part in ("collab_ops", "transformers", "optim"))][:5])
            for event in allocations]


def test_training_step_never_holds_a_models_logits(tmp_path):
    # Short rows: the tiny models' SDPA runs its math path here ([rows, heads, length, length] fp32
    # scores, 128 MiB per layer at 8 x 1024 tokens), which would dwarf the loss's own memory.
    vocab, tokens_per_row, rows_per_batch = 32000, 128, 64
    student, teacher = tiny_llama(0, vocab_size=vocab).cuda(), tiny_llama(1, vocab_size=vocab, hidden_size=48).cuda()
    rows = token_rows(2, [tokens_per_row] * rows_per_batch, vocab_size=vocab)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=100_000)
    try:
        train(tmp_path, student, teacher, rows, {"divergence": "forward_kl", "chunk_size": 256}, optim="adamw_torch",
              max_steps=2, learning_rate=1e-3, per_device_train_batch_size=rows_per_batch)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    peak_extra = torch.cuda.max_memory_allocated() - resident
    one_logits_tensor = rows_per_batch * tokens_per_row * vocab * 4  # fp32 [N, V] of one model
    # What a step holds: two chunks' logits (2 x 256 x V fp32, 65 MB), gradients and AdamW state of
    # ~2 M parameters, the tiny models' activations. A loss from full logits holds several [N, V].
    assert peak_extra < 0.25 * one_logits_tensor, (peak_extra, one_logits_tensor, largest_allocations(snapshot))
