"""The demo's synthetic task: addition problems, the corpora built from them, and their metrics.

A problem is `a + b` with operands of 1 to 3 digits. The pretraining corpus comes from two sources:

- worksheets, asked "Q:123+45\nA:" and answered correctly, mostly plain ("168"), sometimes in the
  tuned format ("the answer is 168."), the behaviour the small model is later fine-tuned for. The
  bases see it at a small rate, so they know it but rarely choose it, as real base models know a
  chat format they seldom produce unprompted;
- a forum, asked "q:123+45\nA:", where most replies to a problem with a carry are the amateur's
  slip, the sum with every carry dropped (56+78 -> "24"), and the rest are right. The slip needs
  no carrying, so both sizes learn to produce it, while only the large model learns the true sum
  well. Greedy decoding of the large model follows the majority and answers with the slip: the
  failure of mode-seeking decoding that contrastive decoding (expert − amateur) is meant to
  remove. Where the answers part, the small model gives the slip as much weight as the large one
  but the right digit far less, so log p_large − log p_small favours the right digit.

A fixed share of the pairs (a, b) is held out: the training corpora never contain them, and the
evaluation draws only from them. Every generator takes a seed and returns the same texts for the
same arguments on every machine (`random.Random`, no hashing of Python objects).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional, Sequence

PROMPT_TEMPLATES = {"worksheet": "Q:{a}+{b}\nA:", "forum": "q:{a}+{b}\nA:"}
TUNED_TEMPLATE = "the answer is {total}."
MAX_OPERAND_DIGITS = 3
# Held-out pairs: about 1 in HELD_OUT_MODULUS, picked by a fixed arithmetic hash of (a, b).
HELD_OUT_MODULUS = 16

_TUNED_PATTERN = re.compile(r"the answer is (\d+)\.")
_NUMBER_PATTERN = re.compile(r"\d+")


def is_held_out(a: int, b: int) -> bool:
    """Whether the pair (a, b) belongs to the evaluation split (never seen in training)."""
    return (a * 7919 + b * 6007 + 13) % HELD_OUT_MODULUS == 0


@dataclass(frozen=True)
class AdditionProblem:
    a: int
    b: int
    style: str = "worksheet"  # a key of PROMPT_TEMPLATES

    def __post_init__(self):
        if self.style not in PROMPT_TEMPLATES:
            raise ValueError(f"style must be one of {sorted(PROMPT_TEMPLATES)}, got {self.style!r}")

    @property
    def total(self) -> int:
        return self.a + self.b

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATES[self.style].format(a=self.a, b=self.b)

    def completion(self, tuned_format: bool = False, value: Optional[int] = None) -> str:
        """The answer text after the prompt (no end-of-sequence token); `value` overrides the sum."""
        total = self.total if value is None else value
        return TUNED_TEMPLATE.format(total=total) if tuned_format else str(total)

    def no_carry_sum(self) -> int:
        """The sum computed digit by digit with every carry dropped (the classic slip)."""
        result, place, a, b = 0, 1, self.a, self.b
        while a or b:
            result += ((a % 10 + b % 10) % 10) * place
            a, b, place = a // 10, b // 10, place * 10
        return result


def _random_operand(rng: random.Random) -> int:
    digits = rng.randint(1, MAX_OPERAND_DIGITS)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def sample_problems(count: int, seed: int, *, held_out: bool = False, style: str = "worksheet") -> list[AdditionProblem]:
    """`count` problems of the training split (held_out=False) or of the evaluation split.

    Each operand first draws its number of digits (1 to 3, uniformly), then its value, so short
    and long operands are equally common. Problems may repeat within a list.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng = random.Random(seed)
    problems = []
    while len(problems) < count:
        a, b = _random_operand(rng), _random_operand(rng)
        if is_held_out(a, b) == held_out:
            problems.append(AdditionProblem(a, b, style))
    return problems


def evaluation_problems(count: int = 512, seed: int = 1234, style: str = "worksheet") -> list[AdditionProblem]:
    """Held-out problems, distinct pairs, for measuring accuracy and format rate."""
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    problems = []
    for _ in range(100 * max(count, 1)):
        if len(problems) == count:
            break
        a, b = _random_operand(rng), _random_operand(rng)
        if is_held_out(a, b) and (a, b) not in seen:
            seen.add((a, b))
            problems.append(AdditionProblem(a, b, style))
    if len(problems) < count:
        raise ValueError(f"count={count} exceeds the distinct held-out problems this generator finds")
    return problems


@dataclass(frozen=True)
class CorpusOptions:
    """The mix of the pretraining corpus.

    tuned_format_rate: share of worksheet answers written in the tuned format.
    forum_rate: share of documents from the forum.
    forum_slip_rate: share of forum replies to a problem with a carry that give the slip
        (`AdditionProblem.no_carry_sum`) instead of the sum; without a carry the two agree.
    """

    tuned_format_rate: float = 0.05
    forum_rate: float = 0.2
    forum_slip_rate: float = 0.6

    def __post_init__(self):
        for name in ("tuned_format_rate", "forum_rate", "forum_slip_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


def pretraining_texts(count: int, seed: int, options: CorpusOptions = CorpusOptions()) -> list[str]:
    """`count` pretraining documents (prompt + completion, without an end token), training split only."""
    rng = random.Random(seed)
    texts = []
    for problem in sample_problems(count, seed=rng.randrange(2**31)):
        if rng.random() < options.forum_rate:
            problem = AdditionProblem(problem.a, problem.b, "forum")
            slip = rng.random() < options.forum_slip_rate
            texts.append(problem.prompt + problem.completion(value=problem.no_carry_sum() if slip else None))
        else:
            texts.append(problem.prompt + problem.completion(tuned_format=rng.random() < options.tuned_format_rate))
    return texts


def tuning_texts(count: int, seed: int) -> list[str]:
    """`count` fine-tuning documents: correct answers in the tuned format, training split only."""
    return [p.prompt + p.completion(tuned_format=True) for p in sample_problems(count, seed)]


def parse_completion(completion: str) -> tuple[Optional[int], bool]:
    """(the answer's value, whether it is in the tuned format) of a generated completion.

    The value is the completion's only integer; a completion with none or several has no value.
    The tuned format must match exactly ("the answer is 168.", nothing before or after).
    """
    text = completion.strip()
    numbers = _NUMBER_PATTERN.findall(text)
    value = int(numbers[0]) if len(numbers) == 1 else None
    return value, _TUNED_PATTERN.fullmatch(text) is not None


def score_completions(problems: Sequence[AdditionProblem], completions: Sequence[str]) -> dict:
    """Shares of the problems whose completion has the sum as its value (accuracy), is in the
    tuned format (format_rate), and, among the problems with a carry, gives the dropped-carry
    slip (slip_rate; 0 when no problem has a carry)."""
    if len(problems) != len(completions):
        raise ValueError(f"got {len(completions)} completions for {len(problems)} problems")
    if not problems:
        raise ValueError("problems must not be empty")
    correct = formatted = slips = carried = 0
    for problem, completion in zip(problems, completions):
        value, tuned = parse_completion(completion)
        correct += value == problem.total
        formatted += tuned
        if problem.no_carry_sum() != problem.total:
            carried += 1
            slips += value == problem.no_carry_sum()
    n = len(problems)
    return {"n": n, "accuracy": correct / n, "format_rate": formatted / n, "slip_rate": slips / max(carried, 1)}


def _wrong_total(problem: AdditionProblem, rng: random.Random) -> int:
    """A plausible wrong sum: the dropped-carry slip when there is one, else one digit off by one."""
    slip = problem.no_carry_sum()
    if slip != problem.total and rng.random() < 0.5:
        return slip
    digits = str(problem.total)
    position = rng.randrange(len(digits))
    digit = int(digits[position])
    choices = [d for d in (digit - 1, digit + 1) if 0 <= d <= 9 and not (d == 0 and position == 0 and len(digits) > 1)]
    return int(digits[:position] + str(rng.choice(choices)) + digits[position + 1 :])


def noisy_label_texts(count: int, seed: int, noise_rate: float) -> list[str]:
    """`count` worksheet documents (plain format, training split) whose answer is, at `noise_rate`,
    a plausible wrong sum (`_wrong_total`) instead of the sum: a labelled set with annotation noise."""
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate must be in [0, 1], got {noise_rate}")
    rng = random.Random(seed)
    texts = []
    for problem in sample_problems(count, seed=rng.randrange(2**31)):
        value = _wrong_total(problem, rng) if rng.random() < noise_rate else problem.total
        texts.append(problem.prompt + problem.completion(value=value))
    return texts


def classification_examples(count: int, seed: int, *, held_out: bool = False) -> list[tuple[str, int]]:
    """The task's classification view, "is this sum correct?": (text, label) pairs, balanced.

    text is a complete plain-format document ("Q:123+45\\nA:168"); label 1 if the answer is the sum,
    0 if it is a plausible wrong sum (the dropped-carry slip, or one digit off by one).
    """
    rng = random.Random(seed)
    examples = []
    for problem in sample_problems(count, seed=rng.randrange(2**31), held_out=held_out):
        label = rng.randrange(2)
        value = problem.total if label else _wrong_total(problem, rng)
        examples.append((problem.prompt + problem.completion(value=value), label))
    return examples

