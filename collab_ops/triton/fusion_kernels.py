"""Triton kernels of fuse_logits and fused_sample: fp32 math whatever the input dtypes, the rules of
collab_ops.reference.fusion (exclusions, zero weights, poisoned rows).

A row is split into chunks of whole BLOCKs, one program each (program = row · chunks + chunk), so
that a batch of one row spreads over the GPU as a large batch does; collab_ops.triton.fusion picks
the chunk count from the SM count. A row-wide quantity (a log-sum-exp, a max, the sampled token)
takes two launches: each chunk program writes its partial state to a workspace, and the next
launch merges the row's partials, MERGE_STEP of them per step of a loop. Nothing is read back to
the host.

Up to 8 models are passed as separate pointer arguments P0..P7 (unused ones repeat P0), so that
each keeps its own dtype; a compile-time K unrolls the per-model code (`tl.static_range`, with
`_model_pointer` picking the argument when the kernel is compiled). Per-model row/column strides,
inverse temperatures and, for normalisation, log-sum-exps come from small tensors indexed by the
static k.

fuse_logits: [model_stats_kernel: each chunk's (max, Σ exp) state of every participating model
→ model_lse_kernel: their log-sum-exps, when normalising] → fuse_kernel writes the chunk's scores
s = Σ_k w_k (z_k − lse_k) (or raw z_k) with the plausibility cut, and the chunk's state of s →
fuse_finish_kernel subtracts the score's log-sum-exp (log-prob output) and turns poisoned rows NaN.
fused_sample: [model_stats_kernel for the plausibility reference] [score_max_kernel: each chunk's
max of s / temperature, for min_p] → sample_kernel: each chunk's Gumbel-max candidate, drawn with
Triton's Philox (`tl.rand`) keyed by the row's seed and the column, so a column's noise does not
depend on the chunking → pick_token_kernel: the row's best candidate, ties to the lower column.
"""
import triton
import triton.language as tl

# The fields of a fuse_kernel chunk state in its workspace row.
SCORE_STATE_FIELDS = tl.constexpr(4)  # max, Σ exp(s − max), has a NaN score, is poisoned


@triton.jit
def _chunk_of_program(V, chunks, chunk_columns):
    """(row, chunk, first column, end column) of this program, program = row · chunks + chunk.
    The kernels step over [begin, end) by a step count, `range(0, tl.cdiv(end - begin, BLOCK))`:
    with `range(begin, end, BLOCK)` ptxas spilled registers in sample_kernel and fuse_kernel
    (tests/test_triton_compile.py)."""
    program = tl.program_id(0)
    row = (program // chunks).to(tl.int64)
    chunk = program % chunks
    begin = chunk * chunk_columns
    return row, chunk, begin, tl.minimum(begin + chunk_columns, V)


@triton.jit
def _fold_lse(lane_max, lane_total, part_max, part_total):
    """Fold (max, Σ exp(x − max)) states into the lanes' running states. −inf maxima add nothing;
    a +inf max makes the total 1 (the log-sum-exp is the max then). A single entry x is (x, 1)."""
    new_max = tl.maximum(lane_max, part_max)
    finite_max = (new_max != float("-inf")) & (new_max != float("inf"))
    rescaled = tl.where(finite_max, lane_total * tl.exp(lane_max - new_max) + part_total * tl.exp(part_max - new_max),
                        lane_total)
    return new_max, tl.where(new_max == float("inf"), 1.0, rescaled)


@triton.jit
def _lse_state(lane_max, lane_total):
    """The lanes' states reduced to one (max, Σ exp(x − max)); the total is 0 for an all −inf set."""
    row_max = tl.max(lane_max, axis=0)
    finite = (row_max != float("-inf")) & (row_max != float("inf"))
    safe_max = tl.where(finite, row_max, 0.0)
    total = tl.sum(tl.where(lane_max != float("-inf"), lane_total * tl.exp(lane_max - safe_max), 0.0), axis=0)
    return row_max, total


@triton.jit
def _lse(row_max, total):
    finite = (row_max != float("-inf")) & (row_max != float("inf"))
    return tl.where(finite, row_max + tl.log(total), row_max)


@triton.jit
def _merged_max(PARTIALS, row, chunks, part_stride, MERGE_STEP: tl.constexpr):
    """The max of a row's chunk partials PARTIALS[(row · chunks + c) · part_stride] (a max is exact
    in any order, so the split never changes it)."""
    lane_max = tl.full((MERGE_STEP,), float("-inf"), tl.float32)
    for first in range(0, chunks, MERGE_STEP):
        parts = first + tl.arange(0, MERGE_STEP)
        part = tl.load(PARTIALS + (row * chunks + parts) * part_stride, mask=parts < chunks, other=float("-inf"))
        lane_max = tl.maximum(lane_max, part)
    return tl.max(lane_max, axis=0)


@triton.jit
def _load_scaled(P, k: tl.constexpr, row, cols, mask, STRIDES, INV_T):
    """Model k's logits at `cols` of `row`, times its inverse temperature, fp32 (−inf outside)."""
    row_stride = tl.load(STRIDES + 2 * k)
    col_stride = tl.load(STRIDES + 2 * k + 1)
    x = tl.load(P + row * row_stride + cols * col_stride, mask=mask, other=float("-inf")).to(tl.float32)
    return x * tl.load(INV_T + k)


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
def model_stats_kernel(P0, P1, P2, P3, P4, P5, P6, P7, STRIDES, INV_T, MODEL_PARTIALS, V, chunks, chunk_columns,
                       K: tl.constexpr, ONLY_REF: tl.constexpr, REF: tl.constexpr, BLOCK: tl.constexpr):
    """MODEL_PARTIALS[row, chunk, k] = (max, Σ exp(x − max)) of every model's scaled logits in the
    chunk (ONLY_REF: of model REF alone, whose max is all the plausibility cut needs; the other
    models' entries stay unwritten and unread). NaN entries are left out (a NaN in a model that
    takes part poisons the row anyway)."""
    row, chunk, begin, end = _chunk_of_program(V, chunks, chunk_columns)
    for k in tl.static_range(K):
        if (not ONLY_REF) or k == REF:
            P = _model_pointer(P0, P1, P2, P3, P4, P5, P6, P7, k)
            lane_max = tl.full((BLOCK,), float("-inf"), tl.float32)
            lane_total = tl.zeros((BLOCK,), tl.float32)
            for step in range(0, tl.cdiv(end - begin, BLOCK)):
                cols = begin + step * BLOCK + tl.arange(0, BLOCK)
                x = _load_scaled(P, k, row, cols, cols < end, STRIDES, INV_T)
                lane_max, lane_total = _fold_lse(lane_max, lane_total, tl.where(x != x, float("-inf"), x), 1.0)
            chunk_max, chunk_total = _lse_state(lane_max, lane_total)
            state = MODEL_PARTIALS + ((row * chunks + chunk) * K + k) * 2
            tl.store(state, chunk_max)
            tl.store(state + 1, chunk_total)


@triton.jit
def model_lse_kernel(MODEL_PARTIALS, MODEL_LSE, chunks, K: tl.constexpr, MERGE_STEP: tl.constexpr):
    """MODEL_LSE[row, k]: model k's log-sum-exp over the row, merged from its chunks' states. One
    program per row; the fuse programs read the K values in their column loop."""
    row = tl.program_id(0).to(tl.int64)
    for k in tl.static_range(K):
        lane_max = tl.full((MERGE_STEP,), float("-inf"), tl.float32)
        lane_total = tl.zeros((MERGE_STEP,), tl.float32)
        for first in range(0, chunks, MERGE_STEP):
            parts = first + tl.arange(0, MERGE_STEP)
            state = MODEL_PARTIALS + ((row * chunks + parts) * K + k) * 2
            in_row = parts < chunks
            lane_max, lane_total = _fold_lse(lane_max, lane_total, tl.load(state, mask=in_row, other=float("-inf")),
                                             tl.load(state + 1, mask=in_row, other=0.0))
        row_max, total = _lse_state(lane_max, lane_total)
        tl.store(MODEL_LSE + row * K + k, _lse(row_max, total))


@triton.jit
def _poisons(z):
    """Scaled logits that poison the row of a model taking part in it: NaN and +inf."""
    return (z != z) | (z == float("inf"))


@triton.jit
def _add_model(score, nans, P, k: tl.constexpr, row, cols, mask, STRIDES, INV_T, W, w_row_stride, MODEL_LSE,
               K: tl.constexpr, NORMALIZE: tl.constexpr):
    """score + w_k · z_k where model k takes part in the row (w_k ≠ 0): −inf in z_k excludes the
    token for either sign of w_k. NaNs and +infs are counted (they poison the row)."""
    w = tl.load(W + row * w_row_stride + k)
    z = _load_scaled(P, k, row, cols, mask, STRIDES, INV_T)
    # (a scalar condition goes through tl.where: the interpreter cannot AND a scalar with a block)
    nans += tl.where(w != 0, (_poisons(z) & mask).to(tl.int32), 0)
    if NORMALIZE:
        lse = tl.load(MODEL_LSE + row * K + k)
        z = tl.where(z == float("-inf"), z, z - lse)
    term = tl.where(z == float("-inf"), z, w * z)
    return tl.where(w != 0, score + term, score), nans


@triton.jit
def _fused_block(P0, P1, P2, P3, P4, P5, P6, P7, row, cols, mask, nans, STRIDES, INV_T, W, w_row_stride, MODEL_LSE,
                 plausibility_cut, K: tl.constexpr, NORMALIZE: tl.constexpr, PLAUSIBILITY: tl.constexpr,
                 REF: tl.constexpr):
    """The fused scores s of one block of columns (−inf outside the mask), and the running count of
    poisoning values (NaN or +inf in a model that takes part, or in the plausibility reference)."""
    score = tl.zeros(cols.shape, tl.float32)
    for k in tl.static_range(K):
        score, nans = _add_model(score, nans, _model_pointer(P0, P1, P2, P3, P4, P5, P6, P7, k), k, row, cols, mask,
                                 STRIDES, INV_T, W, w_row_stride, MODEL_LSE, K, NORMALIZE)
    if PLAUSIBILITY:
        ref = _load_scaled(_model_pointer(P0, P1, P2, P3, P4, P5, P6, P7, REF), REF, row, cols, mask, STRIDES, INV_T)
        nans += (_poisons(ref) & mask).to(tl.int32)
        # p_ref(x) >= alpha · max p_ref, i.e. ref(x) >= max ref + log alpha (NaN compares false).
        score = tl.where(ref >= plausibility_cut, score, float("-inf"))
    return tl.where(mask, score, float("-inf")), nans


@triton.jit
def _plausibility_cut(MODEL_PARTIALS, row, chunks, log_alpha, K: tl.constexpr, REF: tl.constexpr,
                      MERGE_STEP: tl.constexpr):
    """The smallest scaled reference logit that passes the cut, from the reference's chunk maxima."""
    ref_max = _merged_max(MODEL_PARTIALS + REF * 2, row, chunks, K * 2, MERGE_STEP)
    # An all −inf reference row has no plausible token (one holding +inf is poisoned anyway).
    return tl.where(ref_max == float("-inf"), float("inf"), ref_max + log_alpha)


@triton.jit
def fuse_kernel(P0, P1, P2, P3, P4, P5, P6, P7, STRIDES, INV_T, W, w_row_stride, MODEL_PARTIALS, MODEL_LSE,
                SCORE_PARTIALS, OUT, V, chunks, chunk_columns, log_alpha,
                K: tl.constexpr, NORMALIZE: tl.constexpr, PLAUSIBILITY: tl.constexpr, REF: tl.constexpr,
                LOGPROBS: tl.constexpr, BLOCK: tl.constexpr, MERGE_STEP: tl.constexpr):
    """The chunk's scores into OUT, and SCORE_PARTIALS[row, chunk] = (max, Σ exp(s − max) of its
    non-NaN scores (LOGPROBS only), has a NaN score, is poisoned) for fuse_finish_kernel."""
    row, chunk, begin, end = _chunk_of_program(V, chunks, chunk_columns)
    out_row = OUT + row * V
    plausibility_cut = float("-inf")
    if PLAUSIBILITY:
        plausibility_cut = _plausibility_cut(MODEL_PARTIALS, row, chunks, log_alpha, K, REF, MERGE_STEP)
    nans = tl.zeros((BLOCK,), tl.int32)
    nan_scores = tl.zeros((BLOCK,), tl.int32)  # +inf − inf from sums that overflow
    lane_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    lane_total = tl.zeros((BLOCK,), tl.float32)
    for step in range(0, tl.cdiv(end - begin, BLOCK)):
        cols = begin + step * BLOCK + tl.arange(0, BLOCK)
        mask = cols < end
        score, nans = _fused_block(P0, P1, P2, P3, P4, P5, P6, P7, row, cols, mask, nans, STRIDES, INV_T, W,
                                   w_row_stride, MODEL_LSE, plausibility_cut, K, NORMALIZE, PLAUSIBILITY, REF)
        tl.store(out_row + cols, score, mask=mask)
        if LOGPROBS:
            nan_scores += (score != score).to(tl.int32)
            lane_max, lane_total = _fold_lse(lane_max, lane_total, tl.where(score != score, float("-inf"), score), 1.0)
    state = SCORE_PARTIALS + (row * chunks + chunk) * SCORE_STATE_FIELDS
    if LOGPROBS:
        chunk_max, chunk_total = _lse_state(lane_max, lane_total)
        tl.store(state, chunk_max)
        tl.store(state + 1, chunk_total)
        tl.store(state + 2, (tl.sum(nan_scores, axis=0) > 0).to(tl.float32))
    tl.store(state + 3, (tl.sum(nans, axis=0) > 0).to(tl.float32))


@triton.jit
def fuse_finish_kernel(SCORE_PARTIALS, OUT, V, chunks, chunk_columns, LOGPROBS: tl.constexpr, BLOCK: tl.constexpr,
                       MERGE_STEP: tl.constexpr):
    """The chunk's scores minus the row's score log-sum-exp (LOGPROBS), all NaN in a poisoned row.
    Every program of a row merges the row's states in the same order, so they agree on the lse."""
    row, chunk, begin, end = _chunk_of_program(V, chunks, chunk_columns)
    out_row = OUT + row * V
    lane_max = tl.full((MERGE_STEP,), float("-inf"), tl.float32)
    lane_total = tl.zeros((MERGE_STEP,), tl.float32)
    lane_nan_score = tl.zeros((MERGE_STEP,), tl.float32)
    lane_poisoned = tl.zeros((MERGE_STEP,), tl.float32)
    for first in range(0, chunks, MERGE_STEP):
        parts = first + tl.arange(0, MERGE_STEP)
        in_row = parts < chunks
        state = SCORE_PARTIALS + (row * chunks + parts) * SCORE_STATE_FIELDS
        lane_poisoned = tl.maximum(lane_poisoned, tl.load(state + 3, mask=in_row, other=0.0))
        if LOGPROBS:
            lane_max, lane_total = _fold_lse(lane_max, lane_total, tl.load(state, mask=in_row, other=float("-inf")),
                                             tl.load(state + 1, mask=in_row, other=0.0))
            lane_nan_score = tl.maximum(lane_nan_score, tl.load(state + 2, mask=in_row, other=0.0))
    poisoned = tl.max(lane_poisoned, axis=0) > 0
    if LOGPROBS:
        row_max, total = _lse_state(lane_max, lane_total)
        lse = _lse(row_max, total)
        lse = tl.where(tl.max(lane_nan_score, axis=0) > 0, float("nan"), lse)  # a NaN score poisons the normaliser
        for step in range(0, tl.cdiv(end - begin, BLOCK)):
            cols = begin + step * BLOCK + tl.arange(0, BLOCK)
            mask = cols < end
            score = tl.load(out_row + cols, mask=mask)
            # −inf stays −inf even in an all −inf row; a poisoned row becomes all NaN.
            result = tl.where(score == float("-inf"), score, score - lse)
            tl.store(out_row + cols, tl.where(poisoned, float("nan"), result), mask=mask)
    else:
        if poisoned:
            for step in range(0, tl.cdiv(end - begin, BLOCK)):
                cols = begin + step * BLOCK + tl.arange(0, BLOCK)
                tl.store(out_row + cols, tl.full((BLOCK,), float("nan"), tl.float32), mask=cols < end)


@triton.jit
def score_max_kernel(P0, P1, P2, P3, P4, P5, P6, P7, STRIDES, INV_T, W, w_row_stride, MODEL_PARTIALS, MODEL_LSE,
                     SCORE_MAX_PARTIALS, V, chunks, chunk_columns, log_alpha, inv_temperature,
                     K: tl.constexpr, NORMALIZE: tl.constexpr, PLAUSIBILITY: tl.constexpr, REF: tl.constexpr,
                     BLOCK: tl.constexpr, MERGE_STEP: tl.constexpr):
    """SCORE_MAX_PARTIALS[row, chunk]: the chunk's max of s / temperature over non-NaN scores,
    from which sample_kernel takes min_p's cut."""
    row, chunk, begin, end = _chunk_of_program(V, chunks, chunk_columns)
    plausibility_cut = float("-inf")
    if PLAUSIBILITY:
        plausibility_cut = _plausibility_cut(MODEL_PARTIALS, row, chunks, log_alpha, K, REF, MERGE_STEP)
    nans = tl.zeros((BLOCK,), tl.int32)  # counted again, and reported, by sample_kernel
    lane_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    for step in range(0, tl.cdiv(end - begin, BLOCK)):
        cols = begin + step * BLOCK + tl.arange(0, BLOCK)
        score, nans = _fused_block(P0, P1, P2, P3, P4, P5, P6, P7, row, cols, cols < end, nans, STRIDES, INV_T, W,
                                   w_row_stride, MODEL_LSE, plausibility_cut, K, NORMALIZE, PLAUSIBILITY, REF)
        lane_max = tl.maximum(lane_max, tl.where(score != score, float("-inf"), score * inv_temperature))
    tl.store(SCORE_MAX_PARTIALS + row * chunks + chunk, tl.max(lane_max, axis=0))


@triton.jit
def sample_kernel(P0, P1, P2, P3, P4, P5, P6, P7, STRIDES, INV_T, W, w_row_stride, MODEL_PARTIALS, MODEL_LSE,
                  SCORE_MAX_PARTIALS, SEED, seed_row_stride, seed_spread, CANDIDATE_KEYS, CANDIDATE_COLUMNS, V, chunks,
                  chunk_columns, log_alpha, inv_temperature, log_min_p,
                  K: tl.constexpr, NORMALIZE: tl.constexpr, PLAUSIBILITY: tl.constexpr, REF: tl.constexpr,
                  GREEDY: tl.constexpr, MIN_P: tl.constexpr, BLOCK: tl.constexpr, MERGE_STEP: tl.constexpr):
    """The chunk's candidate: the first column of its largest key x + Gumbel noise (x when GREEDY),
    x = s / temperature, tokens with x < max x + log min_p dropped. CANDIDATE_KEYS[row, chunk] = that
    key (−inf: none), CANDIDATE_COLUMNS[row, chunk] = (column or −1, whether the chunk makes the row
    undefined: a poisoned input, a +inf or NaN score)."""
    row, chunk, begin, end = _chunk_of_program(V, chunks, chunk_columns)
    plausibility_cut = float("-inf")
    if PLAUSIBILITY:
        plausibility_cut = _plausibility_cut(MODEL_PARTIALS, row, chunks, log_alpha, K, REF, MERGE_STEP)
    keep_from = float("-inf")
    if MIN_P:
        keep_from = _merged_max(SCORE_MAX_PARTIALS, row, chunks, 1, MERGE_STEP) + log_min_p
    # A per-row seed keys the row alone; one seed for the batch is spread over the rows.
    seed = tl.load(SEED + row * seed_row_stride) + row * seed_spread
    nans = tl.zeros((BLOCK,), tl.int32)
    best_key = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_col = tl.full((BLOCK,), -1, tl.int32)
    infinite = tl.zeros((BLOCK,), tl.int32)
    for step in range(0, tl.cdiv(end - begin, BLOCK)):
        cols = begin + step * BLOCK + tl.arange(0, BLOCK)
        mask = cols < end
        score, nans = _fused_block(P0, P1, P2, P3, P4, P5, P6, P7, row, cols, mask, nans, STRIDES, INV_T, W,
                                   w_row_stride, MODEL_LSE, plausibility_cut, K, NORMALIZE, PLAUSIBILITY, REF)
        infinite += ((score == float("inf")) | (score != score)).to(tl.int32)
        if GREEDY:
            key = score
        else:
            x = score * inv_temperature
            # Keyed by the column, not by its place in the chunk: any split draws the same noise.
            # tl.rand can return 0 (p = 2^-31), whose noise -log(-log 0) = -inf would drop the
            # token even when it is the only one kept: the smallest normal float stands in for it.
            u = tl.maximum(tl.rand(seed, cols.to(tl.int32)), 1.1754944e-38)
            key = tl.where(x >= keep_from, x - tl.log(-tl.log(u)), float("-inf"))
        # NaN keys never win; ties keep the first column (lanes see increasing columns).
        better = (key > best_key) & (key == key)
        best_col = tl.where(better, cols.to(tl.int32), best_col)
        best_key = tl.where(better, key, best_key)
    top = tl.max(best_key, axis=0)
    column = tl.min(tl.where((best_key == top) & (best_col >= 0), best_col, V), axis=0)
    undefined = (tl.sum(nans, axis=0) > 0) | (tl.sum(infinite, axis=0) > 0)
    candidate = row * chunks + chunk
    tl.store(CANDIDATE_KEYS + candidate, top)
    tl.store(CANDIDATE_COLUMNS + 2 * candidate, tl.where(column < V, column, -1))
    tl.store(CANDIDATE_COLUMNS + 2 * candidate + 1, undefined.to(tl.int32))


@triton.jit
def pick_token_kernel(CANDIDATE_KEYS, CANDIDATE_COLUMNS, TOKENS, V, chunks, MERGE_STEP: tl.constexpr):
    """One token per row: the column of the largest chunk candidate, the lower column on a tie
    (chunks hold increasing columns); −1 for a row some chunk made undefined or with every token
    excluded. One program per row."""
    row = tl.program_id(0).to(tl.int64)
    best_key = tl.full((MERGE_STEP,), float("-inf"), tl.float32)
    best_col = tl.full((MERGE_STEP,), -1, tl.int32)
    undefined = tl.zeros((MERGE_STEP,), tl.int32)
    for first in range(0, chunks, MERGE_STEP):
        parts = first + tl.arange(0, MERGE_STEP)
        in_row = parts < chunks
        candidate = row * chunks + parts
        key = tl.load(CANDIDATE_KEYS + candidate, mask=in_row, other=float("-inf"))
        column = tl.load(CANDIDATE_COLUMNS + 2 * candidate, mask=in_row, other=-1)
        undefined = tl.maximum(undefined, tl.load(CANDIDATE_COLUMNS + 2 * candidate + 1, mask=in_row, other=0))
        # Keys are never NaN (a chunk's top is the max of non-NaN keys); a lane sees later chunks
        # only after earlier ones, so strictly greater keeps the lower column.
        better = key > best_key
        best_col = tl.where(better, column, best_col)
        best_key = tl.where(better, key, best_key)
    top = tl.max(best_key, axis=0)
    token = tl.min(tl.where((best_key == top) & (best_col >= 0), best_col, V), axis=0)
    no_token = (tl.max(undefined, axis=0) > 0) | (top == float("-inf")) | (token >= V)
    tl.store(TOKENS + row, tl.where(no_token, -1, token.to(tl.int64)))
