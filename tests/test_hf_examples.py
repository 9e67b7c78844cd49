"""The runnable examples in python/ (proxy_tuning, contrastive_decoding, speculative_eft) on tiny
random-weight checkpoints saved to a temporary folder, with a word-level tokenizer (nothing is
downloaded): they load, generate, and print what the processors give when called directly."""
import importlib.util
import runpy
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, LogitsProcessorList, PreTrainedTokenizerFast  # noqa: E402

from collab_ops.hf import ContrastiveDecodingLogitsProcessor, ProxyTuningLogitsProcessor  # noqa: E402

from tiny_models import VOCAB, tiny_llama  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "python"
NEW_TOKENS = 5
PROMPTS = ["w5 w9 w17 w3 w40 w41", "w12 w60"]


def word_level_tokenizer(word_prefix="w"):
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"{word_prefix}{i}": i for i in range(2, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Folders large/ small_tuned/ small_base/; small_base has an embedding padded beyond the
    tokenizer, as real model families often do."""
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = word_level_tokenizer()
    for name, model in (
        ("large", tiny_llama(0)),
        ("small_tuned", tiny_llama(1)),
        ("small_base", tiny_llama(2, vocab_size=VOCAB + 16)),
    ):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def load_example(name, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def direct_generation(checkpoints, main_name, make_processor):
    """What the example should print: `generate` with and without the processor, called here
    directly on a left-padded batch of PROMPTS, greedy."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoints / main_name, padding_side="left")
    main = AutoModelForCausalLM.from_pretrained(checkpoints / main_name).eval()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    texts = []
    for processor in (None, make_processor(batch["attention_mask"])):
        out = main.generate(
            **batch,
            logits_processor=LogitsProcessorList([processor] if processor else []),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        )
        texts.append(tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True))
    return texts


def prompt_arguments():
    return [arg for prompt in PROMPTS for arg in ("--prompt", prompt)] + [
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--device",
        "cpu",
    ]


@pytest.mark.parametrize("name", ["proxy_tuning", "contrastive_decoding"])
def test_example_help_runs_as_a_script(name, monkeypatch, capsys):
    """Runs the file as `python python/NAME.py --help` would (as __main__, its folder on sys.path),
    in this process: a subprocess would spend most of its time importing torch again."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--alpha" in out and "--max-new-tokens" in out and "--prompt" in out


def test_proxy_tuning_example_prints_the_processor_output(checkpoints, monkeypatch, capsys):
    example = load_example("proxy_tuning", monkeypatch)
    results = example.main(
        [
            "--large-base", str(checkpoints / "large"),
            "--small-tuned", str(checkpoints / "small_tuned"),
            "--small-base", str(checkpoints / "small_base"),
            "--alpha", "0.7",
            *prompt_arguments(),
        ]
    )
    small_tuned = AutoModelForCausalLM.from_pretrained(checkpoints / "small_tuned").eval()
    small_base = AutoModelForCausalLM.from_pretrained(checkpoints / "small_base").eval()
    plain, proxy = direct_generation(
        checkpoints,
        "large",
        lambda mask: ProxyTuningLogitsProcessor(small_tuned, small_base, alpha=0.7, attention_mask=mask),
    )
    assert [r["large base"] for r in results] == plain
    assert [r["proxy-tuned (alpha=0.7)"] for r in results] == proxy
    assert plain != proxy
    printed = capsys.readouterr().out
    for prompt, text in zip(PROMPTS, proxy):
        assert f"prompt: {prompt}" in printed and text in printed


@pytest.mark.parametrize("beta", [None, 0.5])
def test_contrastive_decoding_example_prints_the_processor_output(checkpoints, monkeypatch, beta):
    example = load_example("contrastive_decoding", monkeypatch)
    beta_arguments = [] if beta is None else ["--beta", str(beta)]
    results = example.main(
        ["--expert", str(checkpoints / "large"), "--amateur", str(checkpoints / "small_tuned"), "--alpha", "0.2"]
        + beta_arguments
        + prompt_arguments()
    )
    amateur = AutoModelForCausalLM.from_pretrained(checkpoints / "small_tuned").eval()
    plain, contrastive = direct_generation(
        checkpoints,
        "large",
        lambda mask: ContrastiveDecodingLogitsProcessor(amateur, alpha=0.2, beta=beta, attention_mask=mask),
    )
    label = "contrastive" if beta is None else f"contrastive (beta={beta:g})"
    assert [r["expert"] for r in results] == plain
    assert [r[label] for r in results] == contrastive


def test_contrastive_decoding_example_rejects_beta_with_an_amateur_temperature(checkpoints, monkeypatch, capsys):
    example = load_example("contrastive_decoding", monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        example.main(
            ["--expert", str(checkpoints / "large"), "--amateur", str(checkpoints / "small_tuned")]
            + ["--beta", "0.5", "--amateur-temperature", "0.5"]
        )
    assert exit_info.value.code == 2
    assert "amateur_temperature" in capsys.readouterr().err


def test_examples_refuse_models_with_different_tokenizers(checkpoints, tmp_path, monkeypatch, capsys):
    tiny_llama(3).save_pretrained(tmp_path / "other")
    word_level_tokenizer(word_prefix="v").save_pretrained(tmp_path / "other")
    example = load_example("contrastive_decoding", monkeypatch)
    with pytest.raises(SystemExit):
        example.main(["--expert", str(checkpoints / "large"), "--amateur", str(tmp_path / "other")])
    assert "different tokenizer vocabulary" in capsys.readouterr().err


def test_speculative_eft_help_runs_as_a_script(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", ["speculative_eft.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLES / "speculative_eft.py"), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--target-ft", "--target-ref", "--draft", "--num-draft-tokens", "--sample", "--seed"):
        assert option in out


def test_speculative_eft_example_matches_the_eft_processor(checkpoints, monkeypatch, capsys):
    """Greedy EFT up-scaling: the speculative text equals `generate` with EFTLogitsProcessor."""
    example = load_example("speculative_eft", monkeypatch)
    results = example.main(
        [
            "--target", str(checkpoints / "large"),
            "--target-ft", str(checkpoints / "small_tuned"),
            "--target-ref", str(checkpoints / "small_base"),
            "--draft", str(checkpoints / "small_tuned"),
            "--beta", "0.5",
            "--num-draft-tokens", "3",
            *prompt_arguments(),
        ]
    )
    texts = results["texts"]
    assert texts["speculative_generate"] == texts["generate + EFTLogitsProcessor"]
    assert all(len(text.split()) == NEW_TOKENS for text in texts["speculative_generate"])
    assert int(results["stats"].drafted.sum()) > 0
    printed = capsys.readouterr().out
    assert f"acceptance rate: {results['stats'].acceptance_rate:.3f}" in printed
    assert "wall-clock: generate + EFTLogitsProcessor" in printed


def test_speculative_eft_example_samples_a_single_target(checkpoints, monkeypatch, capsys):
    example = load_example("speculative_eft", monkeypatch)
    arguments = ["--target", str(checkpoints / "large"), "--draft", str(checkpoints / "small_tuned"), "--sample"]
    first = example.main(arguments + ["--seed", "3", *prompt_arguments()])
    again = example.main(arguments + ["--seed", "3", *prompt_arguments()])
    assert first["texts"]["speculative_generate"] == again["texts"]["speculative_generate"]
    assert "wall-clock: target.generate" in capsys.readouterr().out


def test_speculative_eft_example_needs_both_eft_models(checkpoints, monkeypatch, capsys):
    example = load_example("speculative_eft", monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        example.main(
            ["--target", str(checkpoints / "large"), "--draft", str(checkpoints / "small_tuned")]
            + ["--target-ft", str(checkpoints / "small_tuned")]
        )
    assert exit_info.value.code == 2
    assert "--target-ref" in capsys.readouterr().err
