"""speculative_verify argument checks (errors name the argument) and bad values (documented output or strict)."""
import pytest
import torch

from collab_ops import _dispatch
from collab_ops.ops.speculative import speculative_verify
from backends import cpu_backends

BACKENDS = cpu_backends("speculative_verify")

BATCH, NUM_DRAFTS, VOCAB = 4, 3, 10


def good_arguments(**changes):
    generator = torch.Generator().manual_seed(0)
    arguments = dict(
        draft_tokens=torch.randint(0, VOCAB, (BATCH, NUM_DRAFTS), generator=generator),
        target=torch.rand(BATCH, NUM_DRAFTS + 1, VOCAB, generator=generator) + 0.01,
        draft=torch.rand(BATCH, NUM_DRAFTS, VOCAB, generator=generator) + 0.01,
    )
    arguments.update(changes)
    return arguments


def targets(count=2):
    return [torch.rand(BATCH, NUM_DRAFTS + 1, VOCAB) for _ in range(count)]


BAD_ARGUMENTS = {
    "draft_tokens float": (dict(draft_tokens=torch.zeros(BATCH, NUM_DRAFTS)), TypeError, "draft_tokens"),
    "draft_tokens 1-d": (dict(draft_tokens=torch.zeros(BATCH, dtype=torch.int64)), ValueError, "draft_tokens"),
    "draft_tokens list": (dict(draft_tokens=[[0, 1, 2]] * BATCH), TypeError, "draft_tokens"),
    "target K mismatch": (dict(target=torch.rand(BATCH, NUM_DRAFTS, VOCAB)), ValueError, "target"),
    "target batch mismatch": (dict(target=torch.rand(BATCH + 1, NUM_DRAFTS + 1, VOCAB)), ValueError, "target"),
    "target 2-d": (dict(target=torch.rand(BATCH, VOCAB)), ValueError, "target"),
    "target int": (dict(target=torch.ones(BATCH, NUM_DRAFTS + 1, VOCAB, dtype=torch.int64)), TypeError, "target"),
    "target float64": (dict(target=torch.rand(BATCH, NUM_DRAFTS + 1, VOCAB, dtype=torch.float64)), TypeError, "target"),
    "target empty vocabulary": (
        dict(target=torch.rand(BATCH, NUM_DRAFTS + 1, 0), draft=None),
        ValueError,
        "target",
    ),
    "target not a tensor": (dict(target="logits"), TypeError, "target"),
    "target empty list": (dict(target=[]), ValueError, "target"),
    "second target vocabulary": (
        dict(target=[torch.rand(BATCH, NUM_DRAFTS + 1, VOCAB), torch.rand(BATCH, NUM_DRAFTS + 1, VOCAB + 1)], target_weights=[1.0, 1.0]),
        ValueError,
        "target[1]",
    ),
    "draft K mismatch": (dict(draft=torch.rand(BATCH, NUM_DRAFTS + 1, VOCAB)), ValueError, "draft"),
    "draft batch mismatch": (dict(draft=torch.rand(BATCH - 1, NUM_DRAFTS, VOCAB)), ValueError, "draft"),
    "draft vocabulary mismatch": (dict(draft=torch.rand(BATCH, NUM_DRAFTS, VOCAB - 1)), ValueError, "draft"),
    "draft int": (dict(draft=torch.ones(BATCH, NUM_DRAFTS, VOCAB, dtype=torch.int32)), TypeError, "draft"),
    "num_draft_tokens float": (dict(num_draft_tokens=torch.ones(BATCH)), TypeError, "num_draft_tokens"),
    "num_draft_tokens shape": (dict(num_draft_tokens=torch.ones(BATCH + 1, dtype=torch.int64)), ValueError, "num_draft_tokens"),
    "num_draft_tokens 2-d": (dict(num_draft_tokens=torch.ones(BATCH, 1, dtype=torch.int64)), ValueError, "num_draft_tokens"),
    "num_draft_tokens list": (dict(num_draft_tokens=[1] * BATCH), TypeError, "num_draft_tokens"),
    "temperature zero": (dict(inputs="logits", temperature=0.0), ValueError, "temperature"),
    "temperature negative": (dict(inputs="logits", temperature=-1.0), ValueError, "temperature"),
    "temperature nan": (dict(inputs="logits", temperature=float("nan")), ValueError, "temperature"),
    "temperature string": (dict(inputs="logits", temperature="hot"), TypeError, "temperature"),
    "temperature with probs": (dict(temperature=0.5), ValueError, "temperature"),
    "unknown mode": (dict(mode="beam"), ValueError, "mode"),
    "unknown inputs": (dict(inputs="logprobs"), ValueError, "inputs"),
    "weights missing": (dict(target=targets()), ValueError, "target_weights"),
    "weights too few": (dict(target=targets(3), target_weights=[1.0, 1.0]), ValueError, "target_weights"),
    "weight infinite": (dict(target=targets(), target_weights=[1.0, float("inf")]), ValueError, "target_weights[1]"),
    "weights tensor too many": (dict(target=targets(), target_weights=torch.ones(3)), ValueError, "target_weights"),
    "weights per-row batch": (dict(target=targets(), target_weights=torch.ones(BATCH + 1, 2)), ValueError, "target_weights"),
    "weights nan": (dict(target=targets(), target_weights=[1.0, float("nan")]), ValueError, "target_weights[1]"),
    "weights string": (dict(target=targets(), target_weights="equal"), TypeError, "target_weights"),
    "weights int tensor": (dict(target=targets(), target_weights=torch.ones(2, dtype=torch.int64)), TypeError, "target_weights"),
    "seed float": (dict(seed=1.5), TypeError, "seed"),
    "seed bool": (dict(seed=True), TypeError, "seed"),
    "seed float tensor": (dict(seed=torch.ones(BATCH)), TypeError, "seed"),
    "seed wrong length": (dict(seed=torch.ones(BATCH + 1, dtype=torch.int64)), ValueError, "seed"),
    "seed 2-d": (dict(seed=torch.ones(BATCH, 1, dtype=torch.int64)), ValueError, "seed"),
    "strict not bool": (dict(strict=1), TypeError, "strict"),
    "return_accepted not bool": (dict(return_accepted="yes"), TypeError, "return_accepted"),
    "unknown backend": (dict(backend="fortran"), ValueError, "backend"),
}


@pytest.mark.parametrize("name", sorted(BAD_ARGUMENTS))
def test_bad_argument_names_it(name):
    changes, error, argument = BAD_ARGUMENTS[name]
    with pytest.raises(error, match=argument.replace("[", r"\[").replace("]", r"\]")):
        speculative_verify(**good_arguments(**changes))


def test_device_mix_names_the_tensor():
    if not torch.cuda.is_available():
        meta_draft = torch.rand(BATCH, NUM_DRAFTS, VOCAB, device="meta")
        with pytest.raises(ValueError, match="draft"):
            speculative_verify(**good_arguments(draft=meta_draft))
    else:
        with pytest.raises(ValueError, match="draft"):
            speculative_verify(**good_arguments(draft=torch.rand(BATCH, NUM_DRAFTS, VOCAB, device="cuda")))


def test_cuda_backend_on_cpu_tensors_is_unavailable():
    with pytest.raises(_dispatch.BackendUnavailableError, match="cuda"):
        speculative_verify(**good_arguments(), backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_modified(backend):
    arguments = good_arguments(target=targets(), target_weights=torch.tensor([1.0, -0.5]), num_draft_tokens=torch.tensor([0, 1, 2, 3]))
    arguments["seed"] = torch.arange(BATCH)
    snapshot = {
        name: [t.clone() for t in value] if isinstance(value, list) else value.clone()
        for name, value in arguments.items()
        if isinstance(value, (torch.Tensor, list))
    }
    speculative_verify(**arguments, backend=backend)
    for name, before in snapshot.items():
        after = arguments[name]
        for old, new in zip(before if isinstance(before, list) else [before], after if isinstance(after, list) else [after]):
            assert torch.equal(old, new), f"{name} was modified"


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the compiled extension (its fake kernel)")
def test_a_call_under_a_fake_mode_leaves_later_calls_alone():
    # The wrapper reuses constant CPU tensors (the all-K count, Python target weights) across calls;
    # none built while a fake mode runs the wrapper (non-strict torch.export does) may be reused
    # outside it. K = 11 and these weights are used nowhere else, so they are first built below.
    from torch._subclasses.fake_tensor import FakeTensorMode

    generator = torch.Generator().manual_seed(31)
    draft_tokens = torch.randint(0, VOCAB, (2, 11), generator=generator)
    target = [torch.randn(2, 12, VOCAB, generator=generator) for _ in range(2)]
    options = dict(inputs="logits", mode="greedy", return_accepted=True, backend="cpu")
    expected = speculative_verify(draft_tokens, target, target_weights=torch.tensor([1.0, 0.375]),
                                  num_draft_tokens=torch.full((2,), 11), **options)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        speculative_verify(mode.from_tensor(draft_tokens), [mode.from_tensor(t) for t in target],
                           target_weights=[1.0, 0.375], **options)
    actual = speculative_verify(draft_tokens, target, target_weights=[1.0, 0.375], **options)
    assert all(type(got) is torch.Tensor and torch.equal(got, want) for got, want in zip(actual, expected))


def bad_value_cases():
    """(description, argument changes, invalid rows) with one or two bad rows each.

    Probabilities are used as given and read at the drafted ids and in the stop row only, so the
    bad values sit where every backend reads them whatever its random numbers: at drafted ids, in
    rows that use no drafts (the stop is position 0), or after a certain rejection (p(x_0) = 0)."""
    generator = torch.Generator().manual_seed(1)
    draft_tokens = torch.randint(0, VOCAB, (BATCH, NUM_DRAFTS), generator=generator)
    target = torch.rand(BATCH, NUM_DRAFTS + 1, VOCAB, generator=generator) + 0.01
    draft = torch.rand(BATCH, NUM_DRAFTS, VOCAB, generator=generator) + 0.01
    target, draft = target / target.sum(-1, keepdim=True), draft / draft.sum(-1, keepdim=True)
    ragged = torch.tensor([3, 1, 3, 2])
    no_drafts_in_row_3 = torch.tensor([3, 3, 3, 0])

    def drafted(tensor, row, position):
        return tensor[row, position, int(draft_tokens[row, position])]

    out_of_range = draft_tokens.clone()
    out_of_range[1, 2], out_of_range[3, 0] = VOCAB, -5
    unused_out_of_range = draft_tokens.clone()
    unused_out_of_range[1, 1:] = -1  # row 1 uses one draft: its padding is never read
    nan_target = target.clone()
    nan_target[2, 1, draft_tokens[2, 1]] = float("nan")  # a drafted entry: always read
    nan_target[1, 3, 0] = float("nan")  # row 1 uses target rows 0..1 only
    empty_target = target.clone()
    empty_target[0, 0] = 0.0  # p(x_0) = 0 rejects x_0: the empty row is the stop row
    negative_target = target.clone()
    negative_target[3, 0, draft_tokens[3, 0]] = -0.1
    negative_in_stop_row = target.clone()
    negative_in_stop_row[3, 0, 2] = -0.1  # row 3 uses no drafts: row 0 is its stop row
    nan_draft = draft.clone()
    nan_draft[0, 0, draft_tokens[0, 0]] = float("nan")
    nan_draft_in_stop_row = draft.clone()
    rejecting_target = target.clone()
    rejecting_target[1, 0, draft_tokens[1, 0]] = 0.0  # a certain rejection at position 0
    nan_draft_in_stop_row[1, 0, (draft_tokens[1, 0] + 1) % VOCAB] = float("nan")
    unread_nan_target = target.clone()
    # Row 2 certainly accepts x_0 (p(x_0) >= q(x_0)), so target row 0 is never its stop row and
    # only its drafted entry is read.
    unread_nan_target[2, 0, draft_tokens[2, 0]] = drafted(draft, 2, 0)
    unread_nan_target[2, 0, (draft_tokens[2, 0] + 1) % VOCAB] = float("nan")
    all_excluded_logits = target.log()
    all_excluded_logits[2, 0] = -float("inf")
    return {
        "draft id out of range": (dict(draft_tokens=out_of_range), [1, 3]),
        "unused draft ids are not read": (dict(draft_tokens=unused_out_of_range, num_draft_tokens=ragged), []),
        "num_draft_tokens out of range": (dict(num_draft_tokens=torch.tensor([3, -1, 4, 0])), [1, 2]),
        "NaN target at a drafted id": (dict(target=nan_target, num_draft_tokens=ragged), [2]),
        "zero target row at the stop": (dict(target=empty_target), [0]),
        "negative probability at a drafted id": (dict(target=negative_target), [3]),
        "negative probability in the stop row": (dict(target=negative_in_stop_row, num_draft_tokens=no_drafts_in_row_3), [3]),
        "NaN draft at a drafted id": (dict(draft=nan_draft), [0]),
        "NaN draft in the stop row": (dict(target=rejecting_target, draft=nan_draft_in_stop_row), [1]),
        "NaN draft is not read when greedy": (dict(draft=nan_draft, mode="greedy"), []),
        "NaN off the drafted ids of a row that never stops there is not read": (dict(target=unread_nan_target), []),
        "NaN in a target row is read when greedy": (dict(target=unread_nan_target, mode="greedy"), [2]),
        "every token excluded": (dict(target=all_excluded_logits, draft=draft.log(), inputs="logits"), [2]),
    }, dict(draft_tokens=draft_tokens, target=target, draft=draft)


BAD_VALUES, CLEAN_ARGUMENTS = bad_value_cases()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_bad_values_give_empty_rows(backend, name):
    changes, invalid_rows = BAD_VALUES[name]
    arguments = dict(CLEAN_ARGUMENTS, **changes)
    seed = torch.arange(BATCH) + 100
    tokens, num_emitted, num_accepted = speculative_verify(**arguments, seed=seed, return_accepted=True, backend=backend)
    invalid = torch.zeros(BATCH, dtype=torch.bool)
    invalid[invalid_rows] = True
    assert bool((tokens[invalid] == -1).all()) and bool((num_emitted[invalid] == 0).all()) and bool((num_accepted[invalid] == 0).all())
    assert bool((num_emitted[~invalid] >= 1).all()), "valid rows must emit a token"
    assert bool((num_emitted[~invalid] == num_accepted[~invalid] + 1).all())
    # A valid row's tokens do not depend on its invalid neighbours.
    valid_rows = (~invalid).nonzero().flatten()
    alone = {
        name: value[valid_rows] if isinstance(value, torch.Tensor) and value.dim() > 0 else value
        for name, value in arguments.items()
    }
    alone_tokens, _ = speculative_verify(**alone, seed=seed[valid_rows], backend=backend)
    assert torch.equal(alone_tokens, tokens[valid_rows])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_strict_raises_naming_the_rows(backend, name):
    changes, invalid_rows = BAD_VALUES[name]
    arguments = dict(CLEAN_ARGUMENTS, **changes, strict=True, seed=5, backend=backend)
    if not invalid_rows:
        speculative_verify(**arguments)
        return
    with pytest.raises(ValueError) as raised:
        speculative_verify(**arguments)
    message = str(raised.value)
    for row in range(BATCH):
        assert (f"row {row}:" in message) == (row in invalid_rows), message
    assert "rejected by the backend kernel" not in message, "the reference should find the reason"
