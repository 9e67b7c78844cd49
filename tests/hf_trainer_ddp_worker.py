"""One process of test_hf_trainer.py's torchrun test: `torchrun --nproc_per_node=2 THIS OUT_DIR`.

Each rank trains twice and saves OUT_DIR/rank<r>.pt with
  one_step  the student after one SGD step (lr 1) over UNEVEN_LENGTHS, 2 examples per process;
  trained   the student after 6 AdamW steps with gradient accumulation;
  losses    the losses logged by that second run;
  static_graph  the student after 3 AdamW steps under DDP's static_graph (which torch does not
            combine with the no_sync of gradient accumulation, even for a plain Trainer).
"""
import sys

import torch
from transformers import TrainingArguments

from collab_ops.hf import DistillationTrainer
from tiny_models import pad_batch, tiny_llama, token_rows

# Batches of 2 over these lengths hold 1 + 2 and 11 + 13 targets: averaging each micro-batch (or
# each process's batch) on its own would weight them very differently from one batch of 4.
UNEVEN_LENGTHS = (2, 3, 12, 14)
ONE_STEP_KD_OPTIONS = {"divergence": "jsd", "hard_weight": 0.3}


def run(out_dir, rows, kd_options, **overrides):
    options = dict(
        output_dir=out_dir, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=1,
        optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        train_sampling_strategy="sequential", max_steps=1, per_device_train_batch_size=2, seed=0,
        ddp_backend="gloo",
    )
    options.update(overrides)
    student, teacher = tiny_llama(0), tiny_llama(1, hidden_size=48)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(**options),
                                  train_dataset=rows, data_collator=pad_batch, kd_options=kd_options)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {name: p.detach().clone() for name, p in student.named_parameters()}, losses, trainer.args.process_index


def main(out_dir):
    one_step, _, rank = run(out_dir, token_rows(1, UNEVEN_LENGTHS), ONE_STEP_KD_OPTIONS)
    lengths = [3 + (5 * i) % 11 for i in range(16)]
    kd_options = {"divergence": "forward_kl", "temperature": 2.0}
    trained, losses, _ = run(out_dir, token_rows(4, lengths), kd_options, optim="adamw_torch", learning_rate=1e-2,
                             max_steps=6, gradient_accumulation_steps=2)
    static_graph, _, _ = run(out_dir, token_rows(4, lengths), kd_options, optim="adamw_torch", learning_rate=1e-2,
                             max_steps=3, ddp_static_graph=True)
    torch.save({"one_step": one_step, "trained": trained, "losses": losses, "static_graph": static_graph},
               f"{out_dir}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
