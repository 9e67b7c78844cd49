"""The embedded demo model family: the task generator, the tokenizer, the shipped weights (loaded
from the package, never downloaded) and the behaviour the demo relies on, measured on held-out
problems. These fail if the weights are missing, broken or retrained into a family that no longer
shows the orderings the demo's methods need."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from collab_ops.demo import (  # noqa: E402
    AdditionProblem,
    CorpusOptions,
    build_tokenizer,
    classification_examples,
    evaluate_addition,
    evaluation_problems,
    generate_completions,
    greedy_agreement,
    load_model,
    load_model_family,
    load_tokenizer,
    parse_completion,
    pretraining_texts,
    sample_problems,
    score_completions,
    tuning_texts,
)
from collab_ops.demo import task  # noqa: E402
from collab_ops.demo.models import ARCHITECTURES, FAMILY, model_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = 96  # problems per behaviour check: enough for the margins below, a few seconds on 2 cores


@pytest.fixture(scope="module")
def family():
    return load_model_family()


def binomial_slack(rate, n):
    """Five standard deviations of a binomial share: a bound no correct generator crosses by chance."""
    return 5 * math.sqrt(rate * (1 - rate) / n)


# ----------------------------------------------------------------------------------- task


def test_corpus_is_deterministic_under_a_seed():
    assert pretraining_texts(300, seed=5) == pretraining_texts(300, seed=5)
    assert pretraining_texts(300, seed=5) != pretraining_texts(300, seed=6)
    assert tuning_texts(50, seed=1) == tuning_texts(50, seed=1)
    assert classification_examples(80, seed=3) == classification_examples(80, seed=3)
    assert evaluation_problems(40, seed=2) == evaluation_problems(40, seed=2)


def test_corpus_mix_follows_its_options():
    n = 8000
    options = CorpusOptions(tuned_format_rate=0.1, forum_rate=0.3, forum_slip_rate=0.7)
    texts = pretraining_texts(n, seed=0, options=options)
    forum = [t for t in texts if t.startswith("q:")]
    worksheet = [t for t in texts if t.startswith("Q:")]
    assert len(forum) + len(worksheet) == n
    assert abs(len(forum) / n - 0.3) < binomial_slack(0.3, n)
    formatted = sum("the answer is" in t for t in worksheet)
    assert abs(formatted / len(worksheet) - 0.1) < binomial_slack(0.1, len(worksheet))
    assert not any("the answer is" in t for t in forum)
    # Forum replies: the sum, or (only where there is a carry to drop) the slip at the given rate.
    slips = []
    for text in forum:
        question, answer = text.split("\nA:")
        problem = AdditionProblem(*(int(x) for x in question[2:].split("+")), style="forum")
        if problem.no_carry_sum() == problem.total:
            assert answer == str(problem.total)
        else:
            assert answer in (str(problem.total), str(problem.no_carry_sum()))
            slips.append(answer == str(problem.no_carry_sum()))
    assert abs(sum(slips) / len(slips) - 0.7) < binomial_slack(0.7, len(slips))


def test_worksheet_answers_are_correct_and_formats_exact():
    for text in pretraining_texts(500, seed=1, options=CorpusOptions(forum_rate=0.0)) + tuning_texts(100, seed=2):
        question, answer = text.split("\nA:")
        a, b = (int(x) for x in question[2:].split("+"))
        value, tuned = parse_completion(answer)
        assert value == a + b
        assert tuned == answer.startswith("the answer is ")
    assert all(parse_completion(t.split("\nA:")[1])[1] for t in tuning_texts(100, seed=2))


def test_training_corpora_never_contain_held_out_problems():
    for text in pretraining_texts(3000, seed=0) + tuning_texts(1000, seed=1):
        a, b = (int(x) for x in text[2:].split("\nA:")[0].split("+"))
        assert not task.is_held_out(a, b)
    problems = evaluation_problems(300)
    assert all(task.is_held_out(p.a, p.b) for p in problems)
    assert len({(p.a, p.b) for p in problems}) == 300
    # The split is a small share of all pairs, so the training distribution is hardly changed.
    pairs = [(p.a, p.b) for p in sample_problems(4000, seed=9, held_out=False)]
    assert all(not task.is_held_out(a, b) for a, b in pairs)
    share = sum(task.is_held_out(a, b) for a in range(1000) for b in range(0, 1000, 7)) / (1000 * 143)
    assert 0.03 < share < 0.1


def test_operand_lengths_are_uniform():
    problems = sample_problems(9000, seed=4)
    for digits in (1, 2, 3):
        share = sum(len(str(p.a)) == digits for p in problems) / len(problems)
        assert abs(share - 1 / 3) < binomial_slack(1 / 3, len(problems)) + 0.01


def test_classification_view_labels_are_right_and_balanced():
    examples = classification_examples(2000, seed=7)
    positives = 0
    for text, label in examples:
        question, answer = text.split("\nA:")
        a, b = (int(x) for x in question[2:].split("+"))
        assert label == int(int(answer) == a + b)
        positives += label
    assert abs(positives / len(examples) - 0.5) < binomial_slack(0.5, len(examples))
    held_out = classification_examples(200, seed=7, held_out=True)
    for text, _ in held_out:
        a, b = (int(x) for x in text[2:].split("\nA:")[0].split("+"))
        assert task.is_held_out(a, b)


def test_no_carry_sum_drops_every_carry():
    assert AdditionProblem(123, 45).no_carry_sum() == 168
    assert AdditionProblem(58, 67).no_carry_sum() == 15
    assert AdditionProblem(999, 1).no_carry_sum() == 990
    assert AdditionProblem(0, 0).no_carry_sum() == 0


def test_parse_and_score_completions():
    assert parse_completion("the answer is 168.") == (168, True)
    assert parse_completion("168") == (168, False)
    assert parse_completion("the answer is 168") == (168, False)
    assert parse_completion("the answer is 16 8.") == (None, False)
    assert parse_completion("") == (None, False)
    problems = [AdditionProblem(123, 45), AdditionProblem(5, 5), AdditionProblem(7, 0), AdditionProblem(1, 2)]
    # 5+5 has a carry (slip 0); 123+45, 7+0 and 1+2 have none.
    scores = score_completions(problems, ["the answer is 168.", "0", "7", " no idea"])
    assert scores == {"n": 4, "accuracy": 0.5, "format_rate": 0.25, "slip_rate": 1.0}
    assert score_completions(problems[:1], ["168"])["slip_rate"] == 0.0
    with pytest.raises(ValueError, match="completions"):
        score_completions(problems, ["1"])


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="style"):
        AdditionProblem(1, 2, style="chat")
    with pytest.raises(ValueError, match="forum_rate"):
        CorpusOptions(forum_rate=1.5)
    with pytest.raises(ValueError, match="count"):
        sample_problems(-1, seed=0)
    with pytest.raises(ValueError, match="name"):
        load_model("medium_base")
    with pytest.raises(TypeError, match="dtype"):
        load_model("small_base", dtype=torch.int8)
    with pytest.raises(ValueError, match="size"):
        model_config("medium", build_tokenizer())


# ------------------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trips_one_token_per_character():
    tokenizer = build_tokenizer()
    texts = pretraining_texts(200, seed=3) + tuning_texts(20, seed=3) + [t for t, _ in classification_examples(20, seed=3)]
    for text in texts:
        ids = tokenizer(text).input_ids
        assert len(ids) == len(text)
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    ids = tokenizer("12" + tokenizer.eos_token).input_ids
    assert ids[-1] == tokenizer.eos_token_id and len(ids) == 3
    assert tokenizer.decode(ids, skip_special_tokens=True) == "12"


def test_shipped_tokenizer_is_the_built_one():
    shipped, built = load_tokenizer(), build_tokenizer()
    assert shipped.get_vocab() == built.get_vocab()
    assert (shipped.pad_token_id, shipped.eos_token_id) == (built.pad_token_id, built.eos_token_id)
    assert shipped.padding_side == "left"
    text = "Q:123+45\nA:the answer is 168."
    assert shipped(text).input_ids == built(text).input_ids


# -------------------------------------------------------------------------- shipped family


def test_family_loads_with_consistent_shapes(family):
    tokenizer = family["tokenizer"]
    assert set(family) == {"tokenizer", *FAMILY}
    for name, size in FAMILY.items():
        model = family[name]
        config = model.config
        assert not model.training
        assert config.vocab_size == len(tokenizer)
        assert model.get_output_embeddings().weight.shape == (len(tokenizer), ARCHITECTURES[size]["hidden_size"])
        for key, value in ARCHITECTURES[size].items():
            assert getattr(config, key) == value, (name, key)
        assert config.eos_token_id == tokenizer.eos_token_id
        assert model.generation_config.pad_token_id == tokenizer.pad_token_id
        assert all(p.dtype == torch.float32 for p in model.parameters())
    count = {name: sum(p.numel() for p in family[name].parameters()) for name in FAMILY}
    assert count["large_base"] > 5 * count["small_base"]
    assert count["small_base"] == count["small_tuned"]
    # small_tuned was fine-tuned from small_base: same shapes, different weights.
    assert any(
        not torch.equal(p, q) for p, q in zip(family["small_base"].parameters(), family["small_tuned"].parameters())
    )


def test_family_loads_in_another_dtype():
    model = load_model("small_base", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_shipped_weights_are_small():
    weights = ROOT / "collab_ops" / "demo" / "weights"
    total = sum(f.stat().st_size for f in weights.rglob("*") if f.is_file())
    assert total < 8 * 2**20


def test_batched_generation_does_not_depend_on_padding(family):
    tokenizer, model = family["tokenizer"], family["large_base"]
    prompts = [p.prompt for p in evaluation_problems(24, seed=8)]
    one_batch = generate_completions(model, tokenizer, prompts, batch_size=24)
    many_batches = generate_completions(model, tokenizer, prompts, batch_size=5)
    alone = [generate_completions(model, tokenizer, [p])[0] for p in prompts[:4]]
    assert one_batch == many_batches
    assert one_batch[:4] == alone


def test_large_base_adds_better_than_small_base(family):
    tokenizer = family["tokenizer"]
    problems = evaluation_problems(HELD_OUT)
    large = evaluate_addition(family["large_base"], tokenizer, problems)
    small = evaluate_addition(family["small_base"], tokenizer, problems)
    assert large["accuracy"] >= 0.8
    assert small["accuracy"] <= 0.65
    assert large["accuracy"] >= small["accuracy"] + 0.25
    assert large["format_rate"] <= 0.05 and small["format_rate"] <= 0.05


def test_small_tuned_answers_in_the_tuned_format(family):
    tuned = evaluate_addition(family["small_tuned"], family["tokenizer"], evaluation_problems(HELD_OUT))
    assert tuned["format_rate"] >= 0.9


def test_proxy_tuning_gives_the_large_model_the_format(family):
    from collab_ops.hf import ProxyTuningLogitsProcessor

    tokenizer, large, small, tuned = (family[k] for k in ("tokenizer", "large_base", "small_base", "small_tuned"))
    problems = evaluation_problems(48)
    proxy = evaluate_addition(
        large, tokenizer, problems, processor=lambda mask: ProxyTuningLogitsProcessor(tuned, small, attention_mask=mask)
    )
    alone = evaluate_addition(tuned, tokenizer, problems)
    assert proxy["format_rate"] >= 0.9
    assert proxy["accuracy"] > alone["accuracy"]


def test_contrastive_decoding_undoes_part_of_the_slip_greedy_copies(family):
    from collab_ops.hf import ContrastiveDecodingLogitsProcessor

    tokenizer, large, small = family["tokenizer"], family["large_base"], family["small_base"]
    problems = evaluation_problems(256, style="forum")  # ~150 with a carry: the slip rates move by 0.1+
    greedy = evaluate_addition(large, tokenizer, problems)
    cd = {
        beta: evaluate_addition(
            large,
            tokenizer,
            problems,
            processor=lambda mask, beta=beta: ContrastiveDecodingLogitsProcessor(small, beta=beta, attention_mask=mask),
        )
        for beta in (None, 0.5)
    }
    # Greedy follows the corpus' majority and drops the carry on most problems that have one.
    assert greedy["slip_rate"] >= 0.5
    # Li et al.'s contrast removes a good part of it and answers at least as well; O'Brien & Lewis'
    # weaker contrast (beta = 0.5 on raw logits) moves the same way.
    assert cd[None]["slip_rate"] <= greedy["slip_rate"] - 0.1
    assert cd[None]["accuracy"] >= greedy["accuracy"]
    assert cd[0.5]["slip_rate"] <= greedy["slip_rate"]


def test_greedy_agreement_is_the_draft_acceptance_rate(family):
    tokenizer, large, small = family["tokenizer"], family["large_base"], family["small_base"]
    problems = evaluation_problems(32)
    assert greedy_agreement(large, large, tokenizer, problems) == 1.0
    rate = greedy_agreement(large, small, tokenizer, problems, batch_size=7)
    assert 0.5 < rate < 1.0


# ------------------------------------------------------------------------ training script


def test_training_script_runs_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("train_demo_models", ROOT / "python" / "train_demo_models.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    try:
        argv = ["--out", str(tmp_path), "--threads", str(threads), "--large-steps", "3", "--small-steps", "2",
                "--tune-steps", "2", "--batch-size", "4", "--eval-problems", "4", "--evaluate-every", "0"]
        assert script.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    for name in FAMILY:
        assert (tmp_path / name / "model.safetensors").is_file()
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / "training_summary.json").is_file()
    reloaded = script.load_saved_family(tmp_path, build_tokenizer(), "cpu")
    assert reloaded["large_base"].config.num_hidden_layers == ARCHITECTURES["large"]["num_hidden_layers"]
