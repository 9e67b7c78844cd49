"""Kernel-vs-reference checks of fused_sample, shared by the CPU tests and tests/gpu.

Greedy tokens must equal the reference's exactly; sampled tokens must be reproducible under a
seed, depend on a per-row seed only, and stay inside the reference's kept set (ties included).
The C++ and CUDA kernels draw Philox Gumbel-max tokens that a NumPy oracle recomputes for every
column, so the kernels' skipping of hopeless columns is checked to never change a token.
"""
import numpy as np
import torch

from collab_ops.ops.fusion import fused_sample
from fusion_kernel_checks import (DTYPES, UNDEFINED_VALUE_OPTIONS, expected_poisoned_rows, random_logits,
                                  undefined_value_inputs)

INF = float("inf")


def greedy_cases():
    """(batch, widths, dtypes, layout, options) covering odd sizes, Qwen widths, dtypes, layouts, K = 1..8."""
    yield 5, [1], [torch.float32], "contiguous", dict()
    yield 4, [7, 9], [torch.bfloat16, torch.float16], "contiguous", dict(temperatures=[0.7, 1.3])
    yield 2, [151936, 152064, 152064], list(DTYPES), "contiguous", dict(vocab_size=151936)
    yield 3, [152064, 151936], [torch.bfloat16, torch.bfloat16], "row_strided", dict(normalize=False)
    yield 3, [1001, 1003], [torch.float16, torch.float32], "column_strided", dict(plausibility_alpha=0.1)
    yield 4, [32000] * 4, [torch.bfloat16] * 4, "contiguous", dict(per_row_weights=True, neg_inf=0.3)
    for num_models in (5, 8):
        yield 3, [257] * num_models, [DTYPES[k % 3] for k in range(num_models)], "contiguous", dict(
            plausibility_alpha=0.3, plausibility_ref=num_models - 1, neg_inf=0.1
        )


def make_case(case, device, seed):
    batch, widths, dtypes, layout, options = case
    options = dict(options)
    generator = torch.Generator().manual_seed(seed)
    neg_inf = options.pop("neg_inf", 0.0)
    logits = [
        random_logits(batch, w, d, device, generator=generator, layout=layout, neg_inf_fraction=neg_inf)
        for w, d in zip(widths, dtypes)
    ]
    if options.pop("per_row_weights", False):
        weights = torch.randn(batch, len(logits), generator=generator).to(device)
        weights[0, 1] = 0.0
    else:
        weights = [1.0] + [(-0.5) ** k for k in range(1, len(logits))]
    return logits, weights, options


def check_greedy_case(backend, device, case, seed):
    logits, weights, options = make_case(case, device, seed)
    tokens = fused_sample(logits, weights, greedy=True, backend=backend, **options)
    expected = fused_sample(logits, weights, greedy=True, backend="reference", **options)
    assert tokens.dtype == torch.int64 and tokens.device.type == torch.device(device).type
    assert torch.equal(tokens.cpu(), expected.cpu()), f"{case}: {tokens.tolist()} != {expected.tolist()}"


def check_greedy_takes_the_first_of_tied_maxima(backend, device):
    logits = torch.randn(3, 300, dtype=torch.float64).to(torch.bfloat16)
    logits[:, [17, 123, 250]] = 20.0
    tokens = fused_sample([logits.to(device)], [1.0], greedy=True, backend=backend)
    assert tokens.tolist() == [17, 17, 17]


def check_seeds(backend, device):
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(64, 3001, generator=g).to(device), torch.randn(64, 3001, generator=g).to(device, torch.bfloat16)]
    for options in (dict(), dict(temperature=0.7, min_p=0.01), dict(top_k=50, top_p=0.9)):
        run = lambda seed: fused_sample(logits, [1.0, -0.5], seed=seed, backend=backend, **options)
        first = run(11)
        assert torch.equal(first, run(11)) and torch.equal(first, run(torch.tensor(11, device=device)))
        assert not torch.equal(first, run(12))
        per_row = torch.arange(64, device=device) * 1009 + 5
        by_row = run(per_row)
        assert torch.equal(by_row, run(per_row.clone())) and not torch.equal(by_row, run(per_row + 1))
        # A row's token depends on its own seed only, not on its position in the batch.
        order = torch.randperm(64, generator=g).to(device)
        shuffled = fused_sample([l[order] for l in logits], [1.0, -0.5], seed=per_row[order], backend=backend, **options)
        assert torch.equal(shuffled, by_row[order])


def kept_set_case(device, rows=2000):
    """A row whose k-th value is tied (bf16), so the kept sets must include every tie; `rows` draws
    leave the least likely kept token (p = 0.033) undrawn with probability below 2e-6 at 400."""
    values = torch.tensor([4.0, 3.0, 3.0, 3.0, 2.0, 2.0, 1.5, 1.0] + [0.0] * 32)
    logits = values.to(torch.bfloat16)[None, :].expand(rows, -1).to(device)
    return logits


def check_kept_sets_include_ties(backend, device, rows=2000):
    logits = kept_set_case(device, rows)
    for options, kept in (
        (dict(top_k=2), {0, 1, 2, 3}),
        (dict(top_k=5), {0, 1, 2, 3, 4, 5}),
        # softmax mass: token 0 holds 0.32; tokens 1-3 tie at the token that reaches 0.4.
        (dict(top_p=0.4), {0, 1, 2, 3}),
        (dict(top_k=6, top_p=0.999), {0, 1, 2, 3, 4, 5}),
        (dict(min_p=float(torch.exp(torch.tensor(-2.7)))), {0, 1, 2, 3, 4, 5, 6}),
    ):
        tokens = fused_sample([logits], [1.0], seed=1, backend=backend, **options)
        reference = fused_sample([logits.cpu()], [1.0], seed=1, backend="reference", **options)
        assert set(reference.tolist()) == kept
        assert set(tokens.tolist()) == kept, f"{options}: drew {sorted(set(tokens.tolist()))}, kept set {sorted(kept)}"


# Sampling options under which two kernels drawing the same Philox stream must give equal tokens.
SAME_DRAW_OPTIONS = [dict(), dict(temperature=0.7, min_p=0.02), dict(top_k=40, top_p=0.9), dict(plausibility_alpha=0.01)]


def same_draw_inputs(rows, vocab):
    """Three bf16 models (weights 1, 1, -1) and the seeds (one for the batch, one per row) on which
    the CPU and CUDA kernels' tokens are compared."""
    g = torch.Generator().manual_seed(4)
    logits = [(torch.randn(rows, vocab, generator=g) * 3).to(torch.bfloat16) for _ in range(3)]
    return logits, [1.0, 1.0, -1.0], (torch.tensor(123), torch.arange(rows) * 31 + 1)


def check_rows_without_a_token(backend, device):
    """Rows the reference gives -1 through +inf inputs, beside the NaN / all-excluded rows of the stats tests."""
    a = torch.randn(4, 10)
    b = torch.randn(4, 10)
    a[0, 3] = INF  # normalised model with +inf: log_softmax is NaN there
    b[2, 5] = -INF
    a[2, 5] = INF  # +inf meets an exclusion: NaN score
    a, b = a.to(device), b.to(device)
    for normalize in (True, False):
        tokens = fused_sample([a, b], [1.0, 1.0], normalize=normalize, seed=0, backend=backend)
        expected = fused_sample([a.cpu(), b.cpu()], [1.0, 1.0], normalize=normalize, seed=0, backend="reference")
        assert ((tokens.cpu() == -1) == (expected == -1)).all(), (normalize, tokens.tolist(), expected.tolist())
    reference_with_inf = torch.randn(2, 10, device=device)
    reference_with_inf[0, 4] = INF
    tokens = fused_sample([torch.randn(2, 10, device=device), reference_with_inf], [1.0, 0.0], plausibility_alpha=0.5,
                          plausibility_ref=1, seed=0, backend=backend)
    assert tokens[0] == -1 and tokens[1] >= 0


def check_undefined_values_give_no_token(backend, device):
    """-1 exactly in the rows that fuse_logits poisons (fusion_kernel_checks.UNDEFINED_VALUE_ROWS),
    greedy and sampled, and in the reference too."""
    logits, weights = undefined_value_inputs(device)
    for options in UNDEFINED_VALUE_OPTIONS:
        options = {key: value for key, value in options.items() if key != "output"}
        expected = expected_poisoned_rows("plausibility_alpha" in options)
        for sampling in (dict(greedy=True), dict(seed=3), dict(seed=3, min_p=0.1)):
            for impl in (backend, "reference"):
                tokens = fused_sample(logits, weights, backend=impl, **sampling, **options).cpu()
                assert [r for r in range(len(tokens)) if tokens[r] == -1] == expected, (impl, options, sampling)
                assert (tokens[tokens >= 0] < logits[1].shape[1]).all()


def check_an_empty_batch(backend, device):
    """B = 0 gives an empty int64 tensor (the CUDA launcher planned its workspace per row)."""
    logits = [torch.randn(0, 50, device=device), torch.randn(0, 50, device=device)]
    for options in (dict(seed=1), dict(greedy=True), dict(seed=1, top_k=5)):
        tokens = fused_sample(logits, [1.0, -0.5], backend=backend, **options)
        assert tokens.shape == (0,) and tokens.dtype == torch.int64, options


def opcheck_samples(device):
    g = torch.Generator().manual_seed(0)
    mixed = [torch.randn(3, 11, generator=g).to(device), torch.randn(3, 13, generator=g).to(device, torch.bfloat16)]
    weights = torch.tensor([[1.0, -0.5]], device=device).expand(3, 2)
    seed = torch.tensor(7, device=device)
    yield (mixed, weights, [1.0, 0.7], True, 0.1, 0, 11, 1.0, 0, 1.0, 0.0, False, seed)
    yield (mixed, weights, [1.0, 1.0], False, None, 0, 11, 0.8, 3, 0.9, 0.05, False, torch.arange(3, device=device))
    yield (mixed, weights, [1.0, 1.0], True, None, 0, 11, 1.0, 0, 1.0, 0.0, True, None)


_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter, key):
    """Philox-4x32-10 (csrc/common/philox.h) on uint64 arrays holding 32-bit words: counter is four
    arrays, key a Python int; returns the four output words."""
    c = [np.asarray(word, dtype=np.uint64) & _MASK32 for word in counter]
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32 & 0xFFFFFFFF)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _MASK32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & _MASK32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _MASK32, (k1 + np.uint64(0xBB67AE85)) & _MASK32
    return c


def random_words(row, vocab, seed, row_seeded):
    """Every column's 32-bit Philox word as the kernels draw it: the row's stream (its own seed, or
    the batch seed with the row as stream), columns 4g..4g+3 from counter g."""
    groups = np.arange((vocab + 3) // 4, dtype=np.uint64)
    stream = 0 if row_seeded else row
    zeros = np.zeros_like(groups)
    words = philox4x32_10([groups, zeros, zeros + np.uint64(stream), zeros], seed % 2**64)
    return np.stack(words, axis=1).reshape(-1)[:vocab]


def gumbel_noise(row, vocab, seed, row_seeded):
    """Every column's noise as the kernels draw it, in float64 (see random_words)."""
    bits = random_words(row, vocab, seed, row_seeded)
    # uniform_open01 (csrc/common/philox.h): float32 rounding included, so that the oracle's noise
    # is the kernels' up to their logarithms' error
    u = (bits.astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-32)
    u = np.minimum(u, np.float32(1.0) - np.float32(2.0**-24)).astype(np.float64)
    return -np.log(-np.log1p(-u))


def check_philox_oracle_matches_known_answers():
    words = philox4x32_10([np.uint64(v) for v in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)], 0x299F31D0A4093822)
    assert [int(w) for w in words] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def check_skipping_never_changes_the_token(backend, device, batch=24, vocab=20011):
    """Tokens equal argmax(x + noise) over every kept column: rows whose scale makes the kernels skip
    nearly every column (3, 12), and rows where the noise bound alone skips almost none (0.3)."""
    g = torch.Generator().manual_seed(8)
    weights = [1.0, 1.0, -1.0]
    for scale in (0.3, 3.0, 12.0):
        logits = [torch.randn(batch, vocab, generator=g) * scale for _ in range(3)]
        logits[1][:, ::7] = -INF
        score = (logits[0] + logits[1]) - logits[2]  # float32, in the kernels' order
        for options in (dict(), dict(temperature=0.7, min_p=0.02)):
            x = score.double() / options.get("temperature", 1.0)
            keep = x >= x.max(dim=1, keepdim=True).values + np.log(options.get("min_p", 0.0) or 1e-300)
            for seed, row_seeded in ((12345, False), (torch.arange(batch) * 7919 + 3, True)):
                tokens = fused_sample([l.to(device) for l in logits], weights, seed=seed if not row_seeded else seed.to(device),
                                      backend=backend, **options).cpu()
                for row in range(batch):
                    row_seed = int(seed[row]) if row_seeded else seed
                    keys = np.where(keep[row].numpy(), x[row].numpy() + gumbel_noise(row, vocab, row_seed, row_seeded), -np.inf)
                    assert tokens[row].item() == int(np.argmax(keys)), (scale, options, row_seeded, row)
