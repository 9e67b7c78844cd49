"""DistillationTrainer: `transformers.Trainer` whose loss is `fused_linear_kd_loss` between a
student (the model being trained) and a frozen teacher, computed from their last hidden states
and LM heads so that neither model's [tokens, vocab] logits are ever materialised.

How the hidden states are obtained (and why this is right under DDP)
--------------------------------------------------------------------
Each forward runs the *whole* model, as Trainer hands it to `compute_loss` (for the student that
is the DistributedDataParallel wrapper under torchrun or accelerate), with a forward pre-hook on
its LM head (`get_output_embeddings()`). The hook records the hidden states the head receives
(the final, normed hidden states) and passes on an empty slice of them, so the head produces
[batch, 0, vocab] logits at no cost. The loss then applies the head's own `weight`/`bias`
parameters to the recorded hidden states inside the fused op.

Going through DDP's forward is what makes gradient synchronisation happen: DDP prepares its
reducer there (`prepare_for_backward`, unused-parameter search from the outputs), and
`accelerator.no_sync` between accumulation steps acts on that forward. Calling the inner module
or its decoder directly would leave the reducer unprepared, and the ranks would drift apart. The
head's parameters are the DDP module's own parameters, so the gradient the fused op gives them
lands in the same `.grad` through the same hooks; the empty logits keep the head in the forward
graph, so DDP's search for unused parameters counts it as used. Finally the loss adds 0 times the
sum of the (empty) logits DDP returned: backward then also passes DDP's output node, which
`static_graph=True` needs on its first iteration to schedule the gradient all-reduce.

Targets and normalisation
-------------------------
Causal LM: the hidden state at position t predicts the label at t+1 (labels from the batch, else
input_ids). A position counts when its target label is not -100 and the attention mask is set at
both t and t+1 (the padding side does not matter). The loss is "mean" over the counted
positions of the whole optimizer step: `get_batch_samples` counts them over all micro-batches of
a gradient-accumulation step (and over all processes when `average_tokens_across_devices`, the
default), `compute_loss` divides the micro-batch's sum by that count, and - as Trainer does for
models that take `num_items_in_batch` - multiplies by the number of processes when the count is
global, since DDP averages gradients over processes. So k accumulation steps, or k processes, give
the gradient of one batch k times larger. Evaluation batches are counted the same way, one batch
at a time.

Precision: the teacher runs under the same autocast as the student's forward (the accelerator's
mixed precision), and the heads are applied in the dtype a Linear would get there (bf16/fp16 under
mixed precision, else the weights'); the fused op accumulates in fp32 and returns an fp32 loss.
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn
from transformers import Trainer

from ..ops.distill import fused_linear_kd_loss

# Trainer, its data collators and the models' own losses mark positions without a target so.
IGNORE_INDEX = -100

KD_OPTION_NAMES = (
    "divergence", "beta", "temperature", "scale_by_t2", "soft_weight", "hard_weight", "chunk_size",
    "logit_softcap", "vocab_size", "backend",
)
_MIXED_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Arguments of fused_linear_kd_loss that the trainer itself supplies, with the reason.
_TRAINER_SUPPLIED = {
    "reduction": "the loss is a mean over the target tokens of the optimizer step",
    "num_items_in_batch": "it is counted over the accumulated batch by the trainer",
    "ignore_index": f"labels mark positions without a target with {IGNORE_INDEX}, as in transformers",
    "labels": "they come from the batch",
    "teacher_logits": "the teacher runs inside the trainer",
    "teacher_indices": "the teacher runs inside the trainer",
    "student_bias": "the LM heads' biases are taken from the models",
    "teacher_bias": "the LM heads' biases are taken from the models",
}


def causal_lm_targets(batch: Mapping[str, Any]) -> torch.Tensor:
    """int64 [batch, length]: at position t the token that position t predicts (the label at
    t+1; the last position has none), or -100 where there is no target: the label is -100, or the
    attention mask is 0 at t or at t+1."""
    labels = batch.get("labels")
    source_name = "labels" if labels is not None else "input_ids"
    source = labels if labels is not None else batch.get("input_ids")
    if source is None:
        raise ValueError("the batch needs labels or input_ids: position t is trained to predict the token at t+1")
    if not isinstance(source, torch.Tensor) or source.dim() != 2:
        shape = tuple(source.shape) if isinstance(source, torch.Tensor) else type(source).__name__
        raise ValueError(f"{source_name} must be a [batch, length] tensor of token ids, got {shape}")
    targets = torch.full(source.shape, IGNORE_INDEX, dtype=torch.int64, device=source.device)
    targets[:, :-1] = source[:, 1:]
    mask = batch.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != source.shape:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"attention_mask has shape {shape} but {source_name} has {tuple(source.shape)}; "
                "DistillationTrainer takes a 2-D padding mask"
            )
        attended = mask != 0
        targets[:, :-1].masked_fill_(~(attended[:, :-1] & attended[:, 1:]), IGNORE_INDEX)
    return targets


def _lm_head(model: nn.Module, name: str) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(
            f"{name} must be a causal LM whose get_output_embeddings() is its linear LM head (a module "
            f"with a [vocab, hidden] weight), got {type(model).__name__}"
        )
    return head


def _final_logit_softcap(model: nn.Module, name: str) -> Optional[float]:
    """The model's own transformation of its head's output: c·tanh(z/c) (Gemma 2/3) or nothing.
    Other scalings would make the fused loss differ from the model's logits, so they are refused:
    Cohere's logit_scale here, any other by the first step's check (_logits_beyond_the_head)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    logit_scale = getattr(config, "logit_scale", None)
    if logit_scale not in (None, 1, 1.0):
        raise ValueError(
            f"{name} scales its logits after the LM head (config.logit_scale={logit_scale}), which the fused "
            "loss does not reproduce"
        )
    return getattr(config, "final_logit_softcapping", None)


@contextlib.contextmanager
def _head_inputs_recorded(model: nn.Module, head: nn.Module):
    """While open, a forward of `model` gives `head` zero positions of its input (so no logits are
    computed) and appends the full input to the yielded list."""
    recorded = []

    def hand_on_no_positions(module, args):
        if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2:
            raise RuntimeError(
                f"{type(model).__name__} called its LM head without a [..., positions, hidden] tensor as first "
                "positional argument; DistillationTrainer cannot take the hidden states from it"
            )
        recorded.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(hand_on_no_positions)
    try:
        yield recorded
    finally:
        handle.remove()


def _final_hidden_states(model: nn.Module, head: nn.Module, inputs: dict, name: str):
    """(the hidden states entering `head` during model(**inputs), the model's outputs)."""
    with _head_inputs_recorded(model, head) as recorded:
        outputs = model(**inputs)
    if len(recorded) != 1:
        raise RuntimeError(f"the LM head of the {name} ran {len(recorded)} times in one forward; expected once")
    return recorded[0], outputs


def _logits_beyond_the_head(model: nn.Module, head: nn.Module, inputs: dict, softcap: Optional[float]) -> Optional[str]:
    """How the model's logits differ from its head's output, soft-capped as the fused loss will,
    on the first row's first positions of `inputs`; None when they agree to rounding. Catches the
    scalings some models apply after the head (Granite's logits_scaling, Falcon-H1's
    lm_head_multiplier, ...) whatever their configuration calls them."""
    probe = {"input_ids": inputs["input_ids"][:1, :8], "use_cache": False}
    if inputs.get("attention_mask") is not None:
        probe["attention_mask"] = inputs["attention_mask"][:1, :8]
    produced = []
    handle = head.register_forward_hook(lambda module, args, output: produced.append(output))
    try:
        with torch.no_grad():
            logits = model(**probe).logits
    finally:
        handle.remove()
    if len(produced) != 1 or produced[0].shape != logits.shape:
        return f"its LM head ran {len(produced)} times or gave another shape than its logits"
    head_logits = produced[0].float()
    if softcap is not None:
        head_logits = softcap * torch.tanh(head_logits / softcap)
    scale = head_logits.abs().max().clamp(min=1.0)
    difference = (logits.float() - head_logits).abs().max() / scale
    tolerance = max(4 * torch.finfo(produced[0].dtype).eps, 1e-5)
    return None if difference <= tolerance else f"its logits differ from its LM head's output by {difference:.3g} of their scale"


class DistillationTrainer(Trainer):
    """`transformers.Trainer` that distils `teacher_model` into `model` (the student) with
    `collab_ops.fused_linear_kd_loss`.

        DistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                            kd_options={"divergence": "jsd", "beta": 0.5, "temperature": 2.0}, ...)

    Both models are causal LMs over the same tokenizer (vocabulary padding may differ); their
    hidden sizes may differ. kd_options are fused_linear_kd_loss's options: divergence, beta,
    temperature, scale_by_t2, soft_weight, hard_weight (cross-entropy against the labels),
    chunk_size, logit_softcap, vocab_size and backend; they are checked when the trainer is
    built. Defaults: vocab_size is the smaller head's width (DESIGN.md: vocabularies are aligned
    to the smallest model), logit_softcap the models' `final_logit_softcapping` when they agree.
    The teacher is moved to the student's device, put in eval mode and run under no_grad; it is
    not saved with the student.

    Every other argument is Trainer's, except compute_loss_func and label smoothing (the loss is
    this trainer's). Batches hold input_ids, attention_mask and optionally labels (-100: no
    target; without labels the input_ids are the targets); see the module docstring for the
    targets, the normalisation under gradient accumulation and DDP, and how the hidden states
    are taken without computing logits. The outputs this trainer returns from compute_loss
    (evaluation) hold empty [batch, 0, vocab] logits; evaluation reports eval_loss for batches
    without labels too (their input_ids are the targets, and the labels passed to
    compute_metrics). torch.nn.DataParallel (several GPUs in one
    process) is not supported: launch one process per GPU (torchrun, accelerate).
    """

    def __init__(self, model=None, teacher_model=None, args=None, *trainer_args, kd_options=None, **trainer_kwargs):
        if not isinstance(teacher_model, nn.Module):
            raise TypeError(f"teacher_model must be a torch.nn.Module (a causal LM), got {type(teacher_model).__name__}")
        if kd_options is None:
            kd_options = {}
        if not isinstance(kd_options, Mapping):
            raise TypeError(f"kd_options must be a mapping of fused_linear_kd_loss options, got {type(kd_options).__name__}")
        for key in kd_options:
            if key in _TRAINER_SUPPLIED:
                raise ValueError(f"kd_options[{key!r}] is set by DistillationTrainer: {_TRAINER_SUPPLIED[key]}")
            if key not in KD_OPTION_NAMES:
                raise ValueError(f"kd_options has an unknown option {key!r}; expected some of {KD_OPTION_NAMES}")
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if self.compute_loss_func is not None:
            raise ValueError("compute_loss_func cannot be used with DistillationTrainer, whose loss is the KD loss")
        if self.args.label_smoothing_factor != 0:
            raise ValueError(
                "label_smoothing_factor must be 0 with DistillationTrainer: the teacher's distribution is the soft "
                "target (use kd_options hard_weight/soft_weight to mix in the labels)"
            )
        if self.args.n_gpu > 1:
            raise ValueError(
                f"DistillationTrainer does not support torch.nn.DataParallel ({self.args.n_gpu} GPUs in one process); "
                "launch one process per GPU with torchrun or accelerate"
            )
        # compute_loss always divides by num_items_in_batch (counted by get_batch_samples), so
        # Trainer must neither divide the loss by the accumulation steps again nor skip the count.
        self.model_accepts_loss_kwargs = True

        self.teacher_model = teacher_model
        student_head = _lm_head(self.model, "model")
        teacher_head = _lm_head(teacher_model, "teacher_model")
        if not hasattr(teacher_model, "hf_device_map"):  # a model dispatched over devices stays where it is
            teacher_model.to(student_head.weight.device)
        teacher_model.eval()
        self.kd_options = self._resolved_kd_options(dict(kd_options), student_head, teacher_head)
        self._heads_checked = False

    def _check_logits_come_from_the_heads(self, student: nn.Module, student_head: nn.Module, inputs: dict) -> None:
        """Once, on the first batch: each model's logits are its head's output (after its own
        final_logit_softcapping), which is what the fused loss recomputes from the hidden states."""
        teacher_head = self.teacher_model.get_output_embeddings()
        for name, model, head in (("model", student, student_head), ("teacher_model", self.teacher_model, teacher_head)):
            with self.accelerator.autocast():
                problem = _logits_beyond_the_head(model, head, inputs, _final_logit_softcap(model, name))
            if problem is not None:
                raise ValueError(
                    f"{name} ({type(model).__name__}) transforms its logits after the LM head ({problem}), e.g. a "
                    "logits_scaling or lm_head_multiplier; the fused loss, computed from the hidden states and the "
                    "head, cannot reproduce them"
                )
        self._heads_checked = True

    def _resolved_kd_options(self, options: dict, student_head: nn.Module, teacher_head: nn.Module) -> dict:
        """kd_options with the defaults that depend on the models, checked by running the loss on
        zero positions with the real heads (so errors are the op's own, raised now)."""
        student_vocab, teacher_vocab = student_head.weight.shape[0], teacher_head.weight.shape[0]
        if "vocab_size" not in options and student_vocab != teacher_vocab:
            options["vocab_size"] = min(student_vocab, teacher_vocab)
        if "logit_softcap" not in options:
            caps = (_final_logit_softcap(self.model, "model"), _final_logit_softcap(self.teacher_model, "teacher_model"))
            if caps[0] != caps[1]:
                raise ValueError(
                    f"the student's final_logit_softcapping is {caps[0]} but the teacher's is {caps[1]}; the fused loss "
                    "applies one logit_softcap to both sides: set kd_options['logit_softcap'] to choose it"
                )
            options["logit_softcap"] = caps[0]
        student_weight, teacher_weight = student_head.weight, teacher_head.weight
        try:
            with torch.no_grad():
                fused_linear_kd_loss(
                    student_weight.new_empty((0, student_weight.shape[1])), student_weight,
                    teacher_weight.new_empty((0, teacher_weight.shape[1])), teacher_weight,
                    torch.empty(0, dtype=torch.int64, device=student_weight.device),
                    student_bias=getattr(student_head, "bias", None), teacher_bias=getattr(teacher_head, "bias", None),
                    ignore_index=IGNORE_INDEX, **options,
                )
        except (TypeError, ValueError) as error:
            raise type(error)(f"kd_options: {error}") from error
        return options

    def _head_operands(self, hidden, head: nn.Module, device: torch.device):
        """hidden, weight, bias on `device` in the dtype the head itself would compute in: that of
        autocast when it is on, or of the mixed precision the Trainer's accelerator runs the model's
        forward in (what a Linear gets there), else the weight's."""
        weight, bias = head.weight, getattr(head, "bias", None)
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        else:
            dtype = _MIXED_PRECISION_DTYPES.get(self.accelerator.mixed_precision, weight.dtype)
        return tuple(None if t is None else t.to(device=device, dtype=dtype) for t in (hidden, weight, bias))

    def _counts_are_global(self) -> bool:
        return self.args.average_tokens_across_devices and self.accelerator.num_processes > 1

    def _count_targets(self, batches: list, device: torch.device) -> Optional[torch.Tensor]:
        """The number of counted target positions in `batches`, summed over processes when
        average_tokens_across_devices is set (the default)."""
        if not batches:
            return None
        count = sum(causal_lm_targets(batch).ne(IGNORE_INDEX).sum().to(device) for batch in batches)
        if self._counts_are_global():
            count = self.accelerator.gather(count).sum()
        return count

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The next `num_batches` micro-batches (one optimizer step) and their number of targets
        (see causal_lm_targets), which compute_loss divides each micro-batch's sum by."""
        batch_samples = list(itertools.islice(epoch_iterator, num_batches))
        return batch_samples, self._count_targets(batch_samples, device)

    def prediction_step(self, model: nn.Module, inputs: dict[str, torch.Tensor | Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """Trainer's step, with the input_ids standing in for absent labels (they are the targets
        then, as in training): Trainer computes a loss only when the batch holds `labels`, and
        would otherwise run the student for its full [batch, length, vocab] logits and report no
        eval_loss."""
        if inputs.get("labels") is None and inputs.get("input_ids") is not None:
            inputs = {**inputs, "labels": inputs["input_ids"]}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """The KD loss of this micro-batch: its per-position losses summed and divided by
        num_items_in_batch (the targets of the whole optimizer step, from get_batch_samples),
        or averaged over the micro-batch's own targets when it is None. In evaluation the count
        is made here, with this trainer's rule, rather than taken from Trainer."""
        if not model.training:
            num_items_in_batch = self._count_targets([inputs], self.args.device)
        targets = causal_lm_targets(inputs)
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        model_inputs["use_cache"] = False

        student = self.accelerator.unwrap_model(model)
        student_head = student.get_output_embeddings()
        if not self._heads_checked:
            self._check_logits_come_from_the_heads(student, student_head, model_inputs)
        student_hidden, outputs = _final_hidden_states(model, student_head, model_inputs, "student")
        teacher_head = self.teacher_model.get_output_embeddings()
        # the same autocast as the student's forward, which the accelerator wraps in it
        with torch.no_grad(), self.accelerator.autocast():
            teacher_hidden, _ = _final_hidden_states(self.teacher_model, teacher_head, model_inputs, "teacher")

        device = student_hidden.device
        student_operands = self._head_operands(student_hidden, student_head, device)
        # (a teacher dispatched over devices with hf_device_map may end elsewhere than the student)
        teacher_operands = self._head_operands(teacher_hidden, teacher_head, device)
        denominator = None
        if num_items_in_batch is not None:
            # all targets ignored: the sum is 0, and 0/1 keeps the loss and gradients finite
            denominator = torch.as_tensor(num_items_in_batch).clamp(min=1)
        # (the fused op ignores autocast: its GEMMs run in the operands' dtype chosen above)
        loss = fused_linear_kd_loss(
            student_operands[0], student_operands[1], teacher_operands[0], teacher_operands[1],
            targets.to(device), student_bias=student_operands[2], teacher_bias=teacher_operands[2],
            ignore_index=IGNORE_INDEX, reduction="mean", num_items_in_batch=denominator, **self.kd_options,
        )
        if num_items_in_batch is not None and self._counts_are_global():
            loss = loss * self.accelerator.num_processes
        logits = getattr(outputs, "logits", None)
        if isinstance(logits, torch.Tensor) and logits.requires_grad:
            loss = loss + 0 * logits.sum()  # through DDP's output node; see the module docstring
        return (loss, outputs) if return_outputs else loss
