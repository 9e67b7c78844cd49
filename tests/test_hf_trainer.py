"""collab_ops.hf.DistillationTrainer against the KD loss computed naively from both models' full
logits, under gradient accumulation and under a two-process torchrun (gloo, CPU)."""
import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (requirements-test.txt)")
from transformers import TrainingArguments  # noqa: E402

from collab_ops.hf import DistillationTrainer  # noqa: E402
from collab_ops.hf import trainer as trainer_module  # noqa: E402
from hf_trainer_ddp_worker import ONE_STEP_KD_OPTIONS, UNEVEN_LENGTHS  # noqa: E402
from tiny_models import VOCAB, pad_batch, tiny_llama, token_rows  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent


def training_args(tmp_path, **overrides):
    """One plain SGD step (lr 1, no clipping, no schedule) over the examples in order."""
    options = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
        logging_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, train_sampling_strategy="sequential", max_steps=1, per_device_train_batch_size=4,
        seed=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def naive_kd_loss(student, teacher, batch, *, vocab, divergence="forward_kl", beta=0.5, temperature=1.0,
                  scale_by_t2=False, soft_weight=1.0, hard_weight=0.0, **_):
    """The loss from both models' full logits: position t predicts label t+1, counted when that
    label is not -100 and both positions are attended; mean over the counted positions."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    student_logits = student(input_ids=ids, attention_mask=mask).logits[..., :vocab].double()
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits[..., :vocab].double()
    target = labels[:, 1:]
    counted = (mask[:, :-1] != 0) & (mask[:, 1:] != 0) & (target != -100)
    s, t, y = student_logits[:, :-1][counted], teacher_logits[:, :-1][counted], target[counted]
    log_ps, log_pt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    ps, pt = log_ps.exp(), log_pt.exp()
    if divergence == "forward_kl":
        soft = (pt * (log_pt - log_ps)).sum(-1)
    elif divergence == "reverse_kl":
        soft = (ps * (log_ps - log_pt)).sum(-1)
    elif divergence == "jsd":
        log_m = torch.log(beta * pt + (1 - beta) * ps)
        soft = beta * (pt * (log_pt - log_m)).sum(-1) + (1 - beta) * (ps * (log_ps - log_m)).sum(-1)
    else:
        raise AssertionError(divergence)
    if scale_by_t2:
        soft = soft * temperature**2
    hard = F.cross_entropy(s, y, reduction="none")
    return (soft_weight * soft + hard_weight * hard).sum() / counted.sum()


KD_CASES = {
    "forward_kl": (VOCAB, {"divergence": "forward_kl"}),
    "jsd+hard, padded teacher vocab": (
        VOCAB + 16,
        {"divergence": "jsd", "beta": 0.3, "temperature": 2.0, "scale_by_t2": True, "soft_weight": 0.7,
         "hard_weight": 0.5, "chunk_size": 5},
    ),
    "reverse_kl": (VOCAB, {"divergence": "reverse_kl", "temperature": 0.7}),
}


@pytest.mark.parametrize("case", KD_CASES)
def test_first_step_matches_loss_from_full_logits(tmp_path, case):
    teacher_vocab, kd_options = KD_CASES[case]
    student, teacher = tiny_llama(0), tiny_llama(1, vocab_size=teacher_vocab, hidden_size=48)
    rows = token_rows(0, (5, 9, 3, 7))

    def collate(rows):
        # Left padding, and labels even on the padding: the attention mask alone must exclude it.
        batch = pad_batch(rows, padding_side="left")
        return {**batch, "labels": batch["input_ids"].clone()}

    batch = collate(rows)
    naive_student = copy.deepcopy(student).train()
    expected = naive_kd_loss(naive_student, teacher, batch, vocab=VOCAB, **kd_options)
    expected.backward()
    before = parameters(student)

    head_output_shapes = []
    for model in (student, teacher):
        model.get_output_embeddings().register_forward_hook(
            lambda module, args, output: head_output_shapes.append(tuple(output.shape)))
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=training_args(tmp_path, per_device_eval_batch_size=4),
        train_dataset=rows, eval_dataset=rows, data_collator=collate, kd_options=kd_options,
    )
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)
    trainer.train()

    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected.item(), rel=1e-5)
    # SGD with lr 1: each parameter moved by minus its gradient.
    for name, p in student.named_parameters():
        naive_grad = dict(naive_student.named_parameters())[name].grad
        torch.testing.assert_close(before[name] - p.detach(), naive_grad, rtol=1e-4, atol=2e-6, msg=name)
    # Neither model computed logits for the batches: only the first step's check that each model's
    # logits are its head's output ran the heads, on at most 8 positions of one row per model.
    probes, batches = head_output_shapes[:2], head_output_shapes[2:]
    assert all(shape[0] == 1 and shape[1] <= 8 for shape in probes)
    assert batches and all(shape[1] == 0 for shape in batches)


def test_evaluation_without_labels_reports_the_kd_loss(tmp_path):
    """A label-less eval set: the input_ids are the targets, as in training, so eval_loss is the
    loss of the same batch with labels = input_ids, and no model computes full logits."""
    student, teacher = tiny_llama(0), tiny_llama(1, hidden_size=48)
    rows = token_rows(0, (5, 9, 3, 7))
    head_output_shapes = []
    for model in (student, teacher):
        model.get_output_embeddings().register_forward_hook(
            lambda module, args, output: head_output_shapes.append(tuple(output.shape)))

    def evaluate(collate):
        trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                      args=training_args(tmp_path, per_device_eval_batch_size=4),
                                      eval_dataset=rows, data_collator=collate, kd_options={"divergence": "jsd"})
        return trainer.evaluate().get("eval_loss")

    without_labels = evaluate(lambda rows: pad_batch(rows, padding_side="left"))
    with_labels = evaluate(lambda rows: {**(batch := pad_batch(rows, padding_side="left")),
                                         "labels": batch["input_ids"].clone()})
    assert without_labels is not None and without_labels == pytest.approx(with_labels, rel=1e-6)
    assert all(shape[1] <= 8 for shape in head_output_shapes)  # probes of <= 8 positions, then none


def test_bf16_mixed_precision_computes_the_heads_in_bf16(tmp_path, monkeypatch):
    student, teacher = tiny_llama(0), tiny_llama(1, hidden_size=48)
    rows = token_rows(0, (5, 9, 3, 7))
    batch = pad_batch(rows)
    expected = naive_kd_loss(copy.deepcopy(student), teacher, batch, vocab=VOCAB)
    operand_dtypes = []
    original = trainer_module.fused_linear_kd_loss

    def spy(student_hidden, student_weight, teacher_hidden, teacher_weight, *args, **kwargs):
        operand_dtypes.append({t.dtype for t in (student_hidden, student_weight, teacher_hidden, teacher_weight)})
        return original(student_hidden, student_weight, teacher_hidden, teacher_weight, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "fused_linear_kd_loss", spy)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path, bf16=True),
                                  train_dataset=rows, data_collator=pad_batch)
    trainer.train()
    assert operand_dtypes[-1] == {torch.bfloat16}
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected.item(), rel=0.05)


def test_gradient_accumulation_equals_one_double_batch(tmp_path):
    rows = token_rows(1, UNEVEN_LENGTHS)
    kd_options = {**ONE_STEP_KD_OPTIONS, "temperature": 2.0}
    trained = {}
    for micro_batch, accumulation in ((4, 1), (2, 2)):
        student, teacher = tiny_llama(0), tiny_llama(1, hidden_size=48)
        args = training_args(tmp_path / f"{micro_batch}x{accumulation}", per_device_train_batch_size=micro_batch,
                             gradient_accumulation_steps=accumulation)
        DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                            data_collator=pad_batch, kd_options=kd_options).train()
        trained[micro_batch, accumulation] = parameters(student)
    initial = parameters(tiny_llama(0))
    for name, p in trained[4, 1].items():
        torch.testing.assert_close(trained[2, 2][name] - initial[name], p - initial[name],
                                   rtol=1e-4, atol=1e-6, msg=name)


def test_a_few_hundred_steps_lower_the_loss(tmp_path):
    student, teacher = tiny_llama(0), tiny_llama(1, hidden_size=48)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(30)  # a confident teacher: far from the student at first
    rows = token_rows(2, [12] * 16)
    args = training_args(tmp_path, optim="adamw_torch", learning_rate=3e-3, max_steps=300,
                         per_device_train_batch_size=8, logging_steps=25, train_sampling_strategy="random")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                                  data_collator=pad_batch, kd_options={"divergence": "forward_kl"})
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12
    assert losses[-1] < 0.2 * losses[0], losses


def test_kd_options_are_checked_when_the_trainer_is_built(tmp_path):
    student, teacher = tiny_llama(0), tiny_llama(1, vocab_size=VOCAB + 16, hidden_size=48)
    args = training_args(tmp_path)

    def build(**kwargs):
        options = dict(model=student, teacher_model=teacher, args=args)
        options.update(kwargs)
        return DistillationTrainer(**options)

    with pytest.raises(ValueError, match="unknown option 'temprature'"):
        build(kd_options={"temprature": 2.0})
    with pytest.raises(ValueError, match=r"kd_options\['reduction'\] is set by DistillationTrainer"):
        build(kd_options={"reduction": "sum"})
    with pytest.raises(ValueError, match="kd_options: divergence must be one of"):
        build(kd_options={"divergence": "kl"})
    with pytest.raises(ValueError, match="kd_options: temperature must be"):
        build(kd_options={"temperature": 0.0})
    with pytest.raises(ValueError, match="kd_options: vocab_size=100 exceeds"):
        build(kd_options={"vocab_size": 100})
    with pytest.raises(TypeError, match="kd_options must be a mapping"):
        build(kd_options=["jsd"])
    with pytest.raises(TypeError, match="teacher_model must be a torch.nn.Module"):
        build(teacher_model="teacher")
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        build(args=training_args(tmp_path, label_smoothing_factor=0.1))
    # Heads of different widths are aligned to the narrower one.
    assert build().kd_options["vocab_size"] == VOCAB


def test_batches_that_do_not_match_their_mask_are_refused(tmp_path):
    trainer = DistillationTrainer(model=tiny_llama(0), teacher_model=tiny_llama(1), args=training_args(tmp_path))
    batch = pad_batch(token_rows(3, (4, 6)))
    batch["attention_mask"] = batch["attention_mask"][:, :-1]
    with pytest.raises(ValueError, match="attention_mask has shape"):
        trainer.compute_loss(trainer.model, batch)


def test_a_model_that_scales_its_logits_after_the_head_is_refused(tmp_path):
    """Granite divides its head's output by config.logits_scaling: the fused loss, which recomputes
    the logits from the hidden states and the head, would distil other logits than the model's."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, logits_scaling=8.0, pad_token_id=0)
    batch = pad_batch(token_rows(3, (4, 6)))
    trainer = DistillationTrainer(model=tiny_llama(0), teacher_model=GraniteForCausalLM(config),
                                  args=training_args(tmp_path))
    with pytest.raises(ValueError, match="teacher_model \\(GraniteForCausalLM\\) transforms its logits after the LM head"):
        trainer.compute_loss(trainer.model, batch)
    # without the scaling the same model distils
    config.logits_scaling = 1.0
    trainer = DistillationTrainer(model=tiny_llama(0), teacher_model=GraniteForCausalLM(config),
                                  args=training_args(tmp_path))
    assert torch.isfinite(trainer.compute_loss(trainer.model, batch))


DDP_WORKER = TESTS_DIR / "hf_trainer_ddp_worker.py"


def test_torchrun_two_processes_train_in_sync(tmp_path):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed with the gloo backend")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS_DIR.parent), str(TESTS_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(DDP_WORKER), str(tmp_path)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"torchrun did not finish in 240 s:\n{expired.stderr}")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]

    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    # One SGD step of 2 processes x 2 examples equals one step of one process over all 4.
    student = tiny_llama(0)
    DistillationTrainer(model=student, teacher_model=tiny_llama(1, hidden_size=48), args=training_args(tmp_path),
                        train_dataset=token_rows(1, UNEVEN_LENGTHS), data_collator=pad_batch,
                        kd_options=ONE_STEP_KD_OPTIONS).train()
    for name, p in student.named_parameters():
        for rank in ranks:
            torch.testing.assert_close(rank["one_step"][name], p.detach(), rtol=1e-4, atol=1e-6, msg=name)
    # Several AdamW steps, with gradient accumulation or a static graph: the processes stay identical.
    initial = parameters(tiny_llama(0))
    for run in ("trained", "static_graph"):
        for name, p in ranks[0][run].items():
            assert torch.equal(p, ranks[1][run][name]), (run, name)
        assert any(not torch.equal(p, initial[name]) for name, p in ranks[0][run].items()), run
    for rank in ranks:
        assert rank["losses"][-1] < rank["losses"][0]


def load_example(name):
    path = TESTS_DIR.parent / "python" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the main guard keeps it from running
    return module


def word_level_tokenizer(num_words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"w{i}": 3 + i for i in range(num_words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def test_distill_example_trains_saved_models(tmp_path, capsys):
    distill = load_example("distill")
    tokenizer = word_level_tokenizer(VOCAB - 3)
    folders = {"student": tiny_llama(0), "teacher": tiny_llama(1, vocab_size=VOCAB + 16, hidden_size=48)}
    for name, model in folders.items():
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    generator = torch.Generator().manual_seed(5)
    lines = [" ".join(f"w{i}" for i in torch.randint(0, VOCAB - 3, (int(n),), generator=generator))
             for n in torch.randint(3, 12, (12,), generator=generator)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n\n")

    result = distill.main([
        "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"),
        "--dataset", str(tmp_path / "corpus.txt"), "--output-dir", str(tmp_path / "out"), "--use-cpu",
        "--max-steps", "3", "--batch-size", "4", "--divergence", "jsd", "--temperature", "2", "--hard-weight", "0.5",
        "--learning-rate", "1e-2",
    ])
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert "trained 3 steps" in capsys.readouterr().out
    trained = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    initial = parameters(folders["student"])
    assert any(not torch.equal(p, initial[name]) for name, p in parameters(trained).items())
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab() == tokenizer.get_vocab()


def test_distill_example_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_example("distill").main(["--help"])
    assert exit_info.value.code == 0
    assert "--divergence" in capsys.readouterr().out
