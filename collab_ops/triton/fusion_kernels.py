"""Triton kernels of fuse_logits and fused_sample: one program per row, fp32 math whatever the
input dtypes, the rules of collab_ops.reference.fusion (exclusions, zero weights, poisoned rows).

Up to 8 models are passed as separate pointer arguments P0..P7 (unused ones repeat P0), so that
each keeps its own dtype; a compile-time K unrolls the per-model code (`tl.static_range`, with
`_model_pointer` picking the argument when the kernel is compiled). Per-model row/column strides, inverse temperatures and, for
normalisation, log-sum-exps come from small tensors indexed by the static k.

fuse_logits: [stats launch: every participating model's row max and log-sum-exp] then the row
program writes s = Σ_k w_k (z_k − lse_k) (or raw z_k) with the plausibility cut, and for
log-prob output subtracts the score's log-sum-exp in a second sweep over its own output.
fused_sample: the reference max (plausibility) and the score max (min_p) when needed, then one
sweep drawing a Gumbel-max token with Triton's Philox (`tl.rand`) keyed by the row's seed.
"""
import triton
import triton.language as tl


@triton.jit
def _load_scaled(P, k: tl.constexpr, row, cols, mask, STRIDES, INV_T):
    """Model k's logits at `cols` of `row`, times its inverse temperature, fp32 (−inf outside)."""
    row_stride = tl.load(STRIDES + 2 * k)
    col_stride = tl.load(STRIDES + 2 * k + 1)
    x = tl.load(P + row * row_stride + cols * col_stride, mask=mask, other=float("-inf")).to(tl.float32)
    return x * tl.load(INV_T + k)


@triton.jit
def _row_lse(P, k: tl.constexpr, row, V, STRIDES, INV_T, BLOCK: tl.constexpr):
    """(max, log-sum-exp, has NaN) of model k's scaled row over its first V columns; NaN entries
    are left out of the max and sum (the row is poisoned anyway)."""
    lane_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    lane_sum = tl.zeros((BLOCK,), tl.float32)
    nans = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = _load_scaled(P, k, row, cols, cols < V, STRIDES, INV_T)
        is_nan = x != x
        nans += is_nan.to(tl.int32)
        x = tl.where(is_nan, float("-inf"), x)
        new_max = tl.maximum(lane_max, x)
        finite_max = (new_max != float("-inf")) & (new_max != float("inf"))
        rescaled = tl.where(finite_max, lane_sum * tl.exp(lane_max - new_max) + tl.exp(x - new_max), lane_sum)
        lane_sum = tl.where(new_max == float("inf"), 1.0, rescaled)
        lane_max = new_max
    row_max = tl.max(lane_max, axis=0)
    finite = (row_max != float("-inf")) & (row_max != float("inf"))
    safe_max = tl.where(finite, row_max, 0.0)
    total = tl.sum(tl.where(lane_max != float("-inf"), lane_sum * tl.exp(lane_max - safe_max), 0.0), axis=0)
    lse = tl.where(finite, safe_max + tl.log(total), row_max)
    return row_max, lse, tl.sum(nans, axis=0) > 0


@triton.jit
def _stats_of(P, k: tl.constexpr, row, V, STRIDES, INV_T, STATS, K: tl.constexpr, BLOCK: tl.constexpr):
    row_max, lse, has_nan = _row_lse(P, k, row, V, STRIDES, INV_T, BLOCK)
    base = STATS + (row * K + k) * 3
    tl.store(base, row_max)
    tl.store(base + 1, lse)
    tl.store(base + 2, has_nan.to(tl.float32))


@triton.jit
def model_stats_kernel(P0, P1, P2, P3, P4, P5, P6, P7, STRIDES, INV_T, STATS, V,
                       K: tl.constexpr, ONLY_REF: tl.constexpr, REF: tl.constexpr, BLOCK: tl.constexpr):
    """STATS[row, k] = (max, log-sum-exp, has NaN) of every model's scaled row (ONLY_REF: of model
    REF alone, all the plausibility cut needs)."""
    row = tl.program_id(0).to(tl.int64)
    for k in tl.static_range(K):
        if (not ONLY_REF) or k == REF:
            _stats_of(_model_pointer(P0, P1, P2, P3, P4, P5, P6, P7, k), k, row, V, STRIDES, INV_T, STATS, K, BLOCK)


@triton.jit
def _add_model(score, nans, P, k: tl.constexpr, row, cols, mask, STRIDES, INV_T, W, w_row_stride, STATS,
               K: tl.constexpr, NORMALIZE: tl.constexpr, INF_UNDEFINED: tl.constexpr):
    """score + w_k · z_k where model k takes part in the row (w_k ≠ 0): −inf in z_k excludes the
    token for either sign of w_k. NaNs are counted, and +inf too with INF_UNDEFINED (sampling
    without the normalisation it would make NaN)."""
    w = tl.load(W + row * w_row_stride + k)
    z = _load_scaled(P, k, row, cols, mask, STRIDES, INV_T)
    bad = z != z
    if INF_UNDEFINED:
        bad = bad | (z == float("inf"))
    # (a scalar condition goes through tl.where: the interpreter cannot AND a scalar with a block)
    nans += tl.where(w != 0, (bad & mask).to(tl.int32), 0)
    if NORMALIZE:
        lse = tl.load(STATS + (row * K + k) * 3 + 1)
        z = tl.where(z == float("-inf"), z, z - lse)
    term = tl.where(z == float("-inf"), z, w * z)
    return tl.where(w != 0, score + term, score), nans


@triton.jit
def _model_pointer(P0, P1, P2, P3, P4, P5, P6, P7, k: tl.constexpr):
    """Argument P<k> (k static)."""
    if k == 0:
        P = P0
    elif k == 1:
        P = P1
    elif k == 2:
        P = P2
    elif k == 3:
        P = P3
    elif k == 4:
        P = P4
    elif k == 5:
        P = P5
    elif k == 6:
        P = P6
    else:
        P = P7
    return P


@triton.jit
def _fused_block(P0, P1, P2, P3, P4, P5, P6, P7, row, cols, mask, nans, STRIDES, INV_T, W, w_row_stride, STATS,
                 plausibility_cut, K: tl.constexpr, NORMALIZE: tl.constexpr, PLAUSIBILITY: tl.constexpr,
                 REF: tl.constexpr, INF_UNDEFINED: tl.constexpr):
    """The fused scores s of one block of columns (−inf past V), and the running NaN count."""
    score = tl.zeros(cols.shape, tl.float32)
    for k in tl.static_range(K):
        score, nans = _add_model(score, nans, _model_pointer(P0, P1, P2, P3, P4, P5, P6, P7, k), k, row, cols, mask,
                                 STRIDES, INV_T, W, w_row_stride, STATS, K, NORMALIZE, INF_UNDEFINED)
    if PLAUSIBILITY:
        ref = _load_scaled(_model_pointer(P0, P1, P2, P3, P4, P5, P6, P7, REF), REF, row, cols, mask, STRIDES, INV_T)
        nans += ((ref != ref) & mask).to(tl.int32)
        # p_ref(x) >= alpha · max p_ref, i.e. ref(x) >= max ref + log alpha (NaN compares false).
        score = tl.where(ref >= plausibility_cut, score, float("-inf"))
    return tl.where(mask, score, float("-inf")), nans


@triton.jit
def _plausibility_cut(STATS, row, log_alpha, K: tl.constexpr, REF: tl.constexpr):
    ref_max = tl.load(STATS + (row * K + REF) * 3)
    # An all −inf reference row has no plausible token, nor has one holding +inf (every ratio
    # p_ref / max p_ref is NaN or 0): a NaN cut keeps nothing.
    cut = tl.where(ref_max == float("-inf"), float("inf"), ref_max + log_alpha)
    return tl.where(ref_max == float("inf"), float("nan"), cut)


@triton.jit
def fuse_kernel(P0, P1, P2, P3, P4, P5, P6, P7, STRIDES, INV_T, W, w_row_stride, STATS, OUT, V, log_alpha,
                K: tl.constexpr, NORMALIZE: tl.constexpr, PLAUSIBILITY: tl.constexpr, REF: tl.constexpr,
                LOGPROBS: tl.constexpr, INF_UNDEFINED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    out_row = OUT + row * V
    plausibility_cut = float("-inf")
    if PLAUSIBILITY:
        plausibility_cut = _plausibility_cut(STATS, row, log_alpha, K, REF)
    nans = tl.zeros((BLOCK,), tl.int32)
    nan_scores = tl.zeros((BLOCK,), tl.int32)  # +inf − inf from a normalised +inf input
    lane_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    lane_sum = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        score, nans = _fused_block(P0, P1, P2, P3, P4, P5, P6, P7, row, cols, mask, nans, STRIDES, INV_T, W,
                                   w_row_stride, STATS, plausibility_cut, K, NORMALIZE, PLAUSIBILITY, REF, INF_UNDEFINED)
        tl.store(out_row + cols, score, mask=mask)
        if LOGPROBS:
            nan_scores += (score != score).to(tl.int32)
            x = tl.where(score != score, float("-inf"), score)
            new_max = tl.maximum(lane_max, x)
            finite_max = (new_max != float("-inf")) & (new_max != float("inf"))
            rescaled = tl.where(finite_max, lane_sum * tl.exp(lane_max - new_max) + tl.exp(x - new_max), lane_sum)
            lane_sum = tl.where(new_max == float("inf"), 1.0, rescaled)
            lane_max = new_max
    poisoned = tl.sum(nans, axis=0) > 0
    if LOGPROBS:
        row_max = tl.max(lane_max, axis=0)
        finite = (row_max != float("-inf")) & (row_max != float("inf"))
        safe_max = tl.where(finite, row_max, 0.0)
        total = tl.sum(tl.where(lane_max != float("-inf"), lane_sum * tl.exp(lane_max - safe_max), 0.0), axis=0)
        lse = tl.where(finite, safe_max + tl.log(total), row_max)
        lse = tl.where(tl.sum(nan_scores, axis=0) > 0, float("nan"), lse)  # a NaN score poisons the normaliser
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            score = tl.load(out_row + cols, mask=mask)
            # −inf stays −inf even in an all −inf row; a poisoned row becomes all NaN.
            result = tl.where(score == float("-inf"), score, score - lse)
            tl.store(out_row + cols, tl.where(poisoned, float("nan"), result), mask=mask)
    else:
        if poisoned:
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                tl.store(out_row + cols, tl.full((BLOCK,), float("nan"), tl.float32), mask=cols < V)


@triton.jit
def sample_kernel(P0, P1, P2, P3, P4, P5, P6, P7, STRIDES, INV_T, W, w_row_stride, STATS, SEED, seed_row_stride,
                  seed_spread, TOKENS, V, log_alpha, inv_temperature, log_min_p,
                  K: tl.constexpr, NORMALIZE: tl.constexpr, PLAUSIBILITY: tl.constexpr, REF: tl.constexpr,
                  GREEDY: tl.constexpr, MIN_P: tl.constexpr, INF_UNDEFINED: tl.constexpr, BLOCK: tl.constexpr):
    """One token per row: argmax of x + Gumbel noise (argmax x when GREEDY), x = s / temperature,
    tokens with x < max x + log min_p dropped; −1 for a poisoned row, a row with a +inf score or
    one with every token excluded or a NaN score."""
    row = tl.program_id(0).to(tl.int64)
    plausibility_cut = float("-inf")
    if PLAUSIBILITY:
        plausibility_cut = _plausibility_cut(STATS, row, log_alpha, K, REF)
    nans = tl.zeros((BLOCK,), tl.int32)
    keep_from = float("-inf")
    if MIN_P:
        lane_max = tl.full((BLOCK,), float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            score, nans = _fused_block(P0, P1, P2, P3, P4, P5, P6, P7, row, cols, cols < V, nans, STRIDES, INV_T, W,
                                       w_row_stride, STATS, plausibility_cut, K, NORMALIZE, PLAUSIBILITY, REF, INF_UNDEFINED)
            lane_max = tl.maximum(lane_max, tl.where(score != score, float("-inf"), score * inv_temperature))
        keep_from = tl.max(lane_max, axis=0) + log_min_p
        nans = tl.zeros((BLOCK,), tl.int32)
    # A per-row seed keys the row alone; one seed for the batch is spread over the rows.
    seed = tl.load(SEED + row * seed_row_stride) + row * seed_spread
    best_key = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_col = tl.full((BLOCK,), -1, tl.int64)
    infinite = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        score, nans = _fused_block(P0, P1, P2, P3, P4, P5, P6, P7, row, cols, mask, nans, STRIDES, INV_T, W,
                                   w_row_stride, STATS, plausibility_cut, K, NORMALIZE, PLAUSIBILITY, REF, INF_UNDEFINED)
        infinite += ((score == float("inf")) | (score != score)).to(tl.int32)
        if GREEDY:
            key = score
        else:
            x = score * inv_temperature
            u = tl.rand(seed, cols.to(tl.int32))
            key = tl.where(x >= keep_from, x - tl.log(-tl.log(u)), float("-inf"))
        # NaN keys never win; ties keep the first column (lanes see increasing columns).
        better = (key > best_key) & (key == key)
        best_col = tl.where(better, cols.to(tl.int64), best_col)
        best_key = tl.where(better, key, best_key)
    top = tl.max(best_key, axis=0)
    candidates = tl.where((best_key == top) & (best_col >= 0), best_col, V + 1)
    token = tl.min(candidates, axis=0)
    undefined = (tl.sum(nans, axis=0) > 0) | (tl.sum(infinite, axis=0) > 0) | (top == float("-inf"))
    tl.store(TOKENS + row, tl.where(undefined | (token > V), -1, token))
