"""Kernel-vs-reference checks of fuse_logits, shared by the CPU tests and tests/gpu.

Each case builds fresh random inputs on a device; the kernel's answer is compared with the
float64 reference under the tolerance rule of tests/tolerance.py.
"""
import itertools
from typing import NamedTuple, Optional

import torch

from collab_ops.ops.fusion import fuse_logits
from tolerance import assert_close_to_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def random_logits(batch, width, dtype, device, *, generator, layout="contiguous", neg_inf_fraction=0.0):
    """Logits with the spread of a real LM head, in one of three memory layouts."""
    values = torch.randn(batch, width, generator=generator, dtype=torch.float64) * 3.0
    if neg_inf_fraction:
        values[torch.rand(batch, width, generator=generator, dtype=torch.float64) < neg_inf_fraction] = float("-inf")
    values = values.to(device=device, dtype=dtype)
    if layout == "row_strided":  # every other row of a larger tensor
        padded = torch.empty(2 * batch, width, dtype=dtype, device=device)
        padded[::2] = values
        return padded[::2]
    if layout == "column_strided":  # a transposed buffer: last-dimension stride != 1
        return values.t().contiguous().t()
    return values


def fusion_cases():
    """(batch, widths, dtypes, layout, options) combinations covering the DESIGN.md test matrix."""
    yield 3, [7], [torch.float32], "contiguous", dict()
    yield 2, [1, 1], [torch.bfloat16, torch.float32], "contiguous", dict(output="logits")
    for dtype, output, normalize in itertools.product(DTYPES, ("logprobs", "logits"), (True, False)):
        yield 3, [257, 263, 257], [dtype] * 3, "contiguous", dict(output=output, normalize=normalize)
    yield 2, [151936, 152064, 152064], list(DTYPES), "contiguous", dict(vocab_size=151936)
    yield 4, [32000, 32000], [torch.bfloat16, torch.float16], "row_strided", dict(temperatures=[0.7, 1.3])
    yield 3, [1000, 1000], [torch.float32, torch.bfloat16], "column_strided", dict(output="logits", temperatures=[1.0, 0.5])
    yield 5, [513, 520], [torch.float32, torch.float32], "contiguous", dict(plausibility_alpha=0.1, neg_inf=0.3)
    yield 3, [97] * 8, [torch.bfloat16] * 8, "contiguous", dict(plausibility_alpha=0.5, plausibility_ref=2, output="logits")
    yield 4, [300, 300, 300], [torch.float16] * 3, "contiguous", dict(per_row_weights=True, neg_inf=0.2)


def check_fusion_case(backend, device, case, seed):
    batch, widths, dtypes, layout, options = case
    options = dict(options)
    generator = torch.Generator().manual_seed(seed)
    neg_inf = options.pop("neg_inf", 0.0)
    logits = [
        random_logits(batch, w, d, device, generator=generator, layout=layout, neg_inf_fraction=neg_inf)
        for w, d in zip(widths, dtypes)
    ]
    num_models = len(logits)
    if options.pop("per_row_weights", False):
        weights = torch.randn(batch, num_models, generator=generator).to(device)
        weights[0, 1] = 0.0  # a zero weight must ignore that model's -inf entries
    else:
        weights = [1.0] + [(-0.5) ** k for k in range(1, num_models)]
    result = fuse_logits(logits, weights, backend=backend, **options)
    exact = fuse_logits([t.double() for t in logits], weights.double() if torch.is_tensor(weights) else weights, backend="reference", **options)
    working = fuse_logits(logits, weights, backend="reference", **options)
    assert result.dtype == torch.float32 and result.device.type == torch.device(device).type
    assert_close_to_reference(result, exact, working, what=f"fuse_logits[{backend}] {widths} {dtypes} {layout} {options}")


# Rows of undefined_value_inputs: which model holds the special value, and whether it poisons.
UNDEFINED_VALUE_ROWS = (
    ("clean", False),
    ("+inf in a model of positive weight", True),
    ("+inf in a model of negative weight", True),
    ("+inf in a model of zero weight", False),
    ("NaN in a model of positive weight", True),
    ("+inf and -inf at one column", True),
    ("+inf beyond vocab_size", False),
    ("+inf in the plausibility reference, weight 0", "with plausibility"),
)


def undefined_value_inputs(device, vocab=2100):
    """Three models (fp32, bf16, fp16) whose row r holds UNDEFINED_VALUE_ROWS[r]'s special value
    near the row's end (past the first 2048-column chunk of the GPU kernels), per-row weights
    [1, -0.5, 0.25] with the zero weight of rows 3 and 7, and model 0 three columns wider than
    the shared vocabulary."""
    g = torch.Generator().manual_seed(17)
    rows, col = len(UNDEFINED_VALUE_ROWS), vocab - 5
    values = [torch.randn(rows, vocab + (3 if k == 0 else 0), generator=g) * 3 for k in range(3)]
    weights = torch.tensor([[1.0, -0.5, 0.25]]).repeat(rows, 1)
    inf, nan = float("inf"), float("nan")
    values[0][1, col] = inf
    values[1][2, col] = inf
    values[1][3, col] = inf
    weights[3, 1] = 0.0
    values[2][4, col] = nan
    values[0][5, col], values[1][5, col] = inf, -inf
    values[0][6, vocab + 1] = inf
    values[2][7, col] = inf
    weights[7, 2] = 0.0
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    return [v.to(device=device, dtype=d) for v, d in zip(values, dtypes)], weights.to(device)


def expected_poisoned_rows(with_plausibility: bool) -> list[int]:
    return [r for r, (_, poisons) in enumerate(UNDEFINED_VALUE_ROWS)
            if poisons is True or (poisons == "with plausibility" and with_plausibility)]


UNDEFINED_VALUE_OPTIONS = [
    dict(),
    dict(output="logits"),
    dict(normalize=False),
    dict(normalize=False, output="logits"),
    dict(plausibility_alpha=0.05, plausibility_ref=2),
    dict(plausibility_alpha=0.05, plausibility_ref=2, normalize=False, output="logits"),
]


def check_undefined_values_poison_rows(backend, device):
    """A NaN or +inf in a model that takes part (or in the plausibility reference) makes its row
    all NaN whatever the weight's sign and the options; zero weights and columns past vocab_size
    ignore them; the other rows are unaffected (compared with the reference)."""
    logits, weights = undefined_value_inputs(device)
    for options in UNDEFINED_VALUE_OPTIONS:
        result = fuse_logits(logits, weights, backend=backend, **options).cpu()
        poisoned = [r for r in range(result.shape[0]) if torch.isnan(result[r]).all()]
        assert poisoned == expected_poisoned_rows("plausibility_alpha" in options), (options, poisoned)
        assert not torch.isnan(result[[r for r in range(result.shape[0]) if r not in poisoned]]).any(), options
        exact = fuse_logits([t.double() for t in logits], weights.double(), backend="reference", **options)
        working = fuse_logits(logits, weights, backend="reference", **options)
        assert_close_to_reference(result, exact.cpu(), working.cpu(), what=f"fuse_logits[{backend}] undefined values {options}")


def dynamic_fusion_objectives(large, expert, base, grid):
    """Float64 objective of every grid candidate per row, [B, G], written out from the definition."""
    large, expert, base = (t.double() for t in (large, expert, base))
    log_p, log_q, log_q_t = (torch.log_softmax(t, dim=-1) for t in (large, base, expert))

    def kl(log_a, log_b):
        a = log_a.exp()
        return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)

    excluded = (large == float("-inf")) | (expert == float("-inf")) | (base == float("-inf"))
    columns = []
    for alpha in grid:
        fused = large if alpha == 0 else (large + alpha * (expert - base)).masked_fill(excluded, float("-inf"))
        log_fused = torch.log_softmax(fused, dim=-1)
        objective = (kl(log_fused, log_p) - kl(log_q_t, log_q)) ** 2 + (kl(log_p, log_fused) - kl(log_q, log_q_t)) ** 2
        columns.append(objective.nan_to_num(nan=float("inf")))
    return torch.stack(columns, dim=-1)


class DynamicFusionCase(NamedTuple):
    batch: int
    widths: list  # large, experts, base
    dtype: torch.dtype
    num_experts: int
    grid: Optional[list]  # None: the default 0, 0.1, ..., 2.0
    neg_inf: float = 0.0  # fraction of -inf entries in large and base
    outliers: bool = False  # plant tokens whose a + alpha * d lie ~150 nats apart (see plant_outliers)


def dynamic_fusion_cases():
    """Cases small enough for the CPU suite; tests/gpu adds dynamic_fusion_gpu_cases."""
    yield DynamicFusionCase(3, [7, 7, 7], torch.float32, 1, None)
    yield DynamicFusionCase(2, [1, 1, 1], torch.float32, 1, [0.0, 0.5])
    yield DynamicFusionCase(5, [1000, 1003, 1000], torch.bfloat16, 2, None, neg_inf=0.02)
    yield DynamicFusionCase(4, [4099, 4099, 4099], torch.float16, 3, [-1.0, -0.25, 0.0, 0.3, 1.7, 2.5])
    yield DynamicFusionCase(2, [151936, 152064, 152064], torch.bfloat16, 1, None)
    yield DynamicFusionCase(6, [2500, 2500, 2500], torch.float32, 2, [0.7])
    yield DynamicFusionCase(6, [3001, 3001, 3001], torch.bfloat16, 1, [round(-1.0 + 0.1 * k, 1) for k in range(32)], neg_inf=0.01)
    yield DynamicFusionCase(6, [2048, 2048, 2048], torch.float32, 2, [0.0, 0.5, 1.0, 2.0, -2.0], outliers=True)


def dynamic_fusion_gpu_cases():
    """The issue's benchmark shape and wider grids and expert counts at full vocabulary width."""
    yield DynamicFusionCase(16, [152064, 152064, 152064], torch.bfloat16, 1, None)
    yield DynamicFusionCase(6, [151936, 152064, 152064], torch.bfloat16, 4, [round(-1.0 + 0.1 * k, 1) for k in range(32)], neg_inf=0.001)
    yield DynamicFusionCase(8, [152064, 152064, 152064], torch.float16, 1, [1.5])
    yield DynamicFusionCase(8, [152064, 152064, 152064], torch.bfloat16, 2, None, outliers=True)


def plant_outliers(large, experts, base):
    """Tokens where max a and max d sit ~150 nats apart, at the row's two ends: a reference for
    a + alpha * d built from max a + alpha * max d would flush every term of the row to zero, and
    a kernel that walks the row in order meets the candidates' maximum only in its last tile, so
    every sum it has carried so far is rescaled by ~2^-200 (flushed to zero)."""
    last = min(large.shape[1], base.shape[1], *(expert.shape[1] for expert in experts)) - 1

    def put(t, col, value):
        t[:, col] = torch.tensor(value, dtype=t.dtype)

    put(large, 0, 100.0)  # the top token of P ...
    put(base, 0, 75.0)
    put(large, last, -50.0)  # ... and a token far below it whose d is the row's largest
    put(base, last, -75.0)
    for expert in experts:
        put(expert, 0, -75.0)  # d = -150 on the top token
        put(expert, last, 75.0)   # d = +150


def set_special_rows(large, experts, base):
    """Row 1 has a NaN (NaN weights); row 3 of large and row 4 of the first expert are all -inf."""
    batch = large.shape[0]
    if batch > 1:
        base[1, 0] = float("nan")
    if batch > 3:
        large[3] = float("-inf")
    if batch > 4:
        experts[0][4] = float("-inf")


def check_dynamic_fusion_case(backend, device, case, seed):
    from collab_ops.ops.fusion import dynamic_fusion_weights

    batch, widths, dtype, num_experts, grid, neg_inf, outliers = case
    generator = torch.Generator().manual_seed(seed)
    large = random_logits(batch, widths[0], dtype, device, generator=generator, neg_inf_fraction=neg_inf)
    experts = [random_logits(batch, widths[1], dtype, device, generator=generator) for _ in range(num_experts)]
    base = random_logits(batch, widths[2], dtype, device, generator=generator, neg_inf_fraction=neg_inf)
    if outliers:
        plant_outliers(large, experts, base)
    set_special_rows(large, experts, base)
    result = dynamic_fusion_weights(large, experts, base, grid=grid, backend=backend)
    exact = dynamic_fusion_weights(large, experts, base, grid=grid, backend="reference")
    assert result.shape == (batch, num_experts) and result.dtype == torch.float32
    assert torch.equal(torch.isnan(result), torch.isnan(exact))
    candidates = grid if grid is not None else [round(0.1 * step, 1) for step in range(21)]
    vocab = min(widths)
    agree = 0
    for t, expert in enumerate(experts):
        objectives = dynamic_fusion_objectives(large[:, :vocab].cpu(), expert[:, :vocab].cpu(), base[:, :vocab].cpu(), candidates)
        for row in range(batch):
            if torch.isnan(exact[row, t]):
                continue
            chosen = candidates.index(round(result[row, t].item(), 6))
            best = objectives[row].min().item()
            # Near-ties may break differently in fp32: the chosen candidate must be as good as the best.
            assert objectives[row, chosen].item() <= best + 1e-4 * max(1.0, abs(best)), (row, t, result[row, t], exact[row, t])
            agree += int(result[row, t] == exact[row, t])
    rows = sum(1 for row in range(batch) for t in range(num_experts) if not torch.isnan(exact[row, t]))
    assert agree >= 0.75 * rows, f"only {agree}/{rows} weights equal the reference's"
