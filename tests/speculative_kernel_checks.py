"""Kernel-vs-reference checks of speculative_verify, shared by the CPU tests and tests/gpu.

Greedy verification and every invalid-row rule are deterministic, so a kernel must give the
reference's outputs exactly. Cases are built so that float32-vs-float64 rounding cannot move an
argmax: logits are wide normals, and ties only arise from exact input ties (smallest id wins on
every backend).
"""
import numpy as np
import torch

from collab_ops.ops.speculative import speculative_verify

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def scores(batch, positions, vocab, *, generator, inputs, layout="contiguous", dtype=torch.float32):
    """[batch, positions, vocab] logits (or their softmax) with a few -inf (or 0) entries."""
    values = 3.0 * torch.randn(batch, positions, vocab, generator=generator, dtype=torch.float64)
    if vocab > 2:
        excluded = torch.rand(batch, positions, vocab, generator=generator) < 0.05
        excluded[..., 0] = False  # keeps every row defined
        values[excluded] = -float("inf")
    if inputs == "probs":
        values = values.softmax(-1)
    values = values.to(dtype)
    if layout == "position_major":  # batch stride smaller than position stride
        return values.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "padded":  # rows inside a wider buffer: vocabulary stride 1, other strides odd
        wide = torch.zeros(batch, positions, vocab + 3, dtype=dtype)
        wide[..., :vocab] = values
        return wide[..., :vocab]
    return values


def greedy_case(batch, num_drafts, vocab, *, seed, inputs="logits", dtype=torch.float32, layout="contiguous",
                num_targets=1, ragged=True):
    generator = torch.Generator().manual_seed(seed)
    targets = [
        scores(batch, num_drafts + 1, vocab, generator=generator, inputs=inputs, layout=layout, dtype=dtype)
        for _ in range(num_targets)
    ]
    if num_targets == 1:
        weights = None
    else:
        weights = torch.randn(batch, num_targets, generator=generator)
        weights[:, 0] = weights[:, 0].abs() + 1.0
        weights[0, 1:] = 0.0  # a row where the other models do not take part
    # Mostly the reference's own argmax, so that chains get long before a mismatch.
    best = _reference_argmax(targets, weights, inputs)[:, :num_drafts]
    guess = torch.randint(0, vocab, (batch, num_drafts), generator=generator)
    draft_tokens = torch.where(torch.rand(batch, num_drafts, generator=generator) < 0.7, best, guess)
    if batch and num_drafts:
        draft_tokens[0, 0] = best[0, 0]  # row 0 accepts at least one draft unless ragged cuts it
    num_draft_tokens = (
        torch.randint(0, num_drafts + 1, (batch,), generator=generator) if ragged else torch.full((batch,), num_drafts)
    )
    return dict(
        draft_tokens=draft_tokens,
        target=targets if num_targets > 1 else targets[0],
        target_weights=weights,
        inputs=inputs,
        num_draft_tokens=num_draft_tokens,
    )


def _reference_argmax(targets, weights, inputs):
    from collab_ops.reference import speculative as reference

    batch = targets[0].shape[0]
    if weights is None:
        weights = torch.ones(batch, 1)
    return reference.fused_target_probs(targets, weights, inputs == "logits", 1.0).argmax(-1)


def near_tie_target(temperature):
    """[1, 1, 3] float32 logits whose first two differ by one ulp yet tie once multiplied by 1/T in
    float32: a greedy argmax taken after scaling would pick id 0, the true one is id 1."""
    scale = np.float32(1 / temperature)
    candidates = np.float32(3.0) + np.float32(2**-22) * np.arange(1000, dtype=np.float32)
    low = next(x for x in candidates if np.float32(x * scale) == np.float32(np.nextafter(x, np.float32(9)) * scale))
    return torch.tensor([[[low, np.nextafter(low, np.float32(9)), 0.0]]], dtype=torch.float32)


def to_device(case, device):
    moved = {}
    for name, value in case.items():
        if isinstance(value, torch.Tensor):
            moved[name] = value.to(device)
        elif isinstance(value, list):
            moved[name] = [v.to(device) for v in value]
        else:
            moved[name] = value
    return moved


def assert_same_as_reference(backend, device, case, **options):
    expected = speculative_verify(**case, **options, return_accepted=True, backend="reference")
    actual = speculative_verify(**to_device(case, device), **options, return_accepted=True, backend=backend)
    for name, got, want in zip(("tokens", "num_emitted", "num_accepted"), actual, expected):
        assert got.device.type == torch.device(device).type
        assert torch.equal(got.cpu(), want), f"{name}: got {got.cpu().tolist()}, expected {want.tolist()}"


GREEDY_CASES = [
    # (batch, K, V, inputs, dtype, layout, num_targets)
    (5, 3, 1, "logits", torch.float32, "contiguous", 1),
    (17, 4, 7, "probs", torch.float32, "contiguous", 1),
    (9, 5, 1001, "logits", torch.bfloat16, "position_major", 1),
    (9, 5, 1001, "probs", torch.float16, "padded", 1),
    (6, 2, 2049, "logits", torch.float16, "contiguous", 1),
    (7, 3, 4099, "logits", torch.float32, "padded", 3),
    (7, 3, 333, "probs", torch.float32, "position_major", 2),
    (3, 0, 50, "logits", torch.float32, "contiguous", 1),
    (2, 2, 20011, "logits", torch.bfloat16, "contiguous", 1),  # many 16-byte loads per thread
]


def invalid_row_case(inputs, seed):
    """One bad row per rule, next to clean rows; every row of the reference's verdict must match.

    Probabilities are read at the drafted ids and in the stop row only, and the stop row depends on
    each backend's random numbers, so the bad values sit where the verdict cannot depend on them:
    at drafted ids, or behind drafts that are certainly accepted (p(x_i) = 1 >= q(x_i))."""
    generator = torch.Generator().manual_seed(seed)
    batch, num_drafts, vocab = 10, 3, 61
    target = scores(batch, num_drafts + 1, vocab, generator=generator, inputs=inputs)
    draft = scores(batch, num_drafts, vocab, generator=generator, inputs=inputs)
    draft_tokens = torch.randint(1, vocab, (batch, num_drafts), generator=generator)
    num_draft_tokens = torch.tensor([3, 2, 3, 1, 3, 3, 3, 0, 4, -1])
    excluded = -float("inf") if inputs == "logits" else 0.0
    certain = 100.0 if inputs == "logits" else 1.0  # p(x) = 1 (to rounding): x is always accepted
    draft_tokens[1, 2] = -7  # unused position of a ragged row: not read
    draft_tokens[2, 1] = vocab  # used id out of range
    target[3, 3] = float("nan")  # NaN past the row's last used target position (n = 1): not read
    draft_tokens[4], target[4, :3, 0] = 0, certain  # row 4 reaches its bonus position ...
    target[4, 3, 5] = float("nan")  # ... which holds a NaN
    draft_tokens[5, 0], target[5, 0, 0] = 0, certain  # row 5 reaches position 1 ...
    target[5, 1] = excluded  # ... where every token is excluded
    draft_tokens[6, 2] = 9
    draft[6, 2, 9] = float("nan")  # undefined draft at a drafted id (sample mode only)
    draft[7, 0] = float("nan")  # row 7 uses no drafts: not read
    draft_tokens[0, 2] = 4
    if inputs == "probs":
        target[0, 2, 4] = -0.5  # negative probability at a drafted id
    else:
        target[0, 2, 4] = float("inf")  # +inf logit
    return dict(
        draft_tokens=draft_tokens, target=target, draft=draft, inputs=inputs, num_draft_tokens=num_draft_tokens
    )


def no_drafts_case(inputs, seed):
    """K = 0: no draft ids at all, so a count of 1 or −1 makes its row invalid without any id to read."""
    generator = torch.Generator().manual_seed(seed)
    target = scores(3, 1, 61, generator=generator, inputs=inputs)
    draft = scores(3, 0, 61, generator=generator, inputs=inputs)
    return dict(draft_tokens=torch.zeros(3, 0, dtype=torch.int64), target=target, draft=draft, inputs=inputs,
                num_draft_tokens=torch.tensor([0, 1, -1]))


def fused_target_invalid_row_case(inputs, seed):
    """A fused target (one model of weight 2) with probabilities or logits: read whole, yet the draft
    row at the stop position still counts where draft probabilities are used as given."""
    generator = torch.Generator().manual_seed(seed)
    batch, num_drafts, vocab = 4, 2, 61
    target = scores(batch, num_drafts + 1, vocab, generator=generator, inputs=inputs)
    draft = scores(batch, num_drafts, vocab, generator=generator, inputs=inputs)
    draft_tokens = torch.randint(1, vocab, (batch, num_drafts), generator=generator)
    num_draft_tokens = torch.tensor([2, 2, 2, 1])
    excluded = -float("inf") if inputs == "logits" else 0.0
    draft_tokens[1:3, 0] = 0
    target[1:3, 0, 0] = excluded  # p(x_0) = 0: rows 1 and 2 certainly stop at position 0 ...
    draft[1, 0, 7] = float("nan")  # ... where row 1's draft row has a NaN off the drafted id
    draft[2, 0, 7] = -0.5 if inputs == "probs" else float("inf")  # and row 2's a negative probability / +inf logit
    draft[3, 1] = float("nan")  # row 3 uses one draft: its second draft row is never read
    return dict(draft_tokens=draft_tokens, target=target, draft=draft, inputs=inputs,
                num_draft_tokens=num_draft_tokens, target_weights=torch.tensor([2.0]))


def check_invalid_rows_match_reference(backend, device, inputs, mode):
    """The verdict per row of invalid_row_case, fused_target_invalid_row_case and no_drafts_case as
    the reference's; in greedy mode every output exactly."""
    cases = (invalid_row_case(inputs, seed=3), fused_target_invalid_row_case(inputs, seed=5), no_drafts_case(inputs, seed=4))
    for case in cases:
        seed = torch.arange(len(case["num_draft_tokens"])) * 7919
        expected = speculative_verify(**case, mode=mode, seed=seed, return_accepted=True, backend="reference")
        actual = speculative_verify(**to_device(case, device), mode=mode, seed=seed.to(device), return_accepted=True,
                                    backend=backend)
        assert torch.equal(actual[1].cpu() == 0, expected[1] == 0), f"invalid rows: got {actual[1]}, expected {expected[1]}"
        if mode == "greedy":
            for got, want in zip(actual, expected):
                assert torch.equal(got.cpu(), want)


def acceptance_case(rows, inputs):
    """Random targets and drafts (K = 4, V = 3001) with each draft sampled from its distribution and
    a seed per row: two backends draw the same acceptance uniforms on it, so only the rounding of p
    and q may make their accepted counts differ."""
    generator = torch.Generator().manual_seed(8)
    target = torch.randn(rows, 5, 3001, generator=generator)
    draft = torch.randn(rows, 4, 3001, generator=generator)
    if inputs == "probs":
        target, draft = target.softmax(-1), draft.softmax(-1)
    draft_tokens = torch.multinomial(draft.softmax(-1).reshape(-1, 3001), 1, generator=generator).reshape(rows, 4)
    seed = torch.randint(-(2**62), 2**62, (rows,), generator=generator)
    return dict(draft_tokens=draft_tokens, target=target, draft=draft, inputs=inputs, seed=seed)


def assert_accept_alike(accepted, other_accepted):
    """At least 99% of rows accept the same number of drafts, and some drafts are accepted at all."""
    same = (accepted.cpu() == other_accepted.cpu()).float().mean()
    assert same >= 0.99, f"only {float(same):.3f} of rows accept alike"
    assert int(accepted.sum()) > 0
