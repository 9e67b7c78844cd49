"""Row kernel of the distillation losses: divergence, hard cross-entropy and the gradient with
respect to the student's logits, one position at a time per program (one program per position
unless the launch caps the programs), fp32 math whatever the input dtype.

A program walks its row in blocks of BLOCK_V columns, at most three times:
  1. statistics: per-lane online log-sum-exp of the student at temperature T, of the teacher at T,
     and of the student at temperature 1 (hard term, only when T ≠ 1). For forward_kl and
     reverse_kl the loss needs no second pass: Σ_x p(x)·(y(x) − z(x)) is accumulated online with
     the same running maximum as p's normaliser.
  2. mixtures (jsd, skew KLs, tvd): the loss and C = Σ_x q(x)·g(x), g = ∂soft/∂q, which both need
     the finished normalisers. Walked backwards, so the blocks pass 1 read last are still in L2.
  3. gradient (WRITE_GRAD): ∂loss/∂s = factor·q·(g − C)/T (+ hard_weight·(q₁ − onehot)), times the
     softcap derivative, written over `grad_width` columns (zeros past `vocab` and on ignored rows).
     It may overwrite the student's logits in place: each block is read before it is written.
With LOAD_STATS the normalisers and C come from a previous launch (kd_loss's backward) and only
pass 3 runs.

Masked tokens (−inf logits) follow the reference: 0·log 0 = 0, no NaN from a probability of 0.
A counted row whose student or teacher row has no finite mass (all −inf, or NaN) has a NaN loss.
"""
import triton
import triton.language as tl

FORWARD_KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
SKEW_FORWARD_KL = tl.constexpr(3)
SKEW_REVERSE_KL = tl.constexpr(4)
TVD = tl.constexpr(5)
DIVERGENCE_CODES = {
    "forward_kl": FORWARD_KL.value,
    "reverse_kl": REVERSE_KL.value,
    "jsd": JSD.value,
    "skew_forward_kl": SKEW_FORWARD_KL.value,
    "skew_reverse_kl": SKEW_REVERSE_KL.value,
    "tvd": TVD.value,
}
# Per-row statistics a forward launch leaves for the backward one: the log-normalisers of the
# student at T, of the teacher at T and of the student at temperature 1, each as its (max, log Σ
# exp(x − max)) pair, and C. A log-probability is then (x − max) − log Σ, as torch's log_softmax
# computes it: one fp32 log-sum-exp near |x| = 40 would carry its rounding (~2e-6) into every one.
NUM_STATS = tl.constexpr(7)

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _softcapped(x, cap):
    """cap·tanh(x/cap), with tanh built from exp(−2|x|/cap) so that it never overflows."""
    decay = tl.exp(-2.0 * tl.abs(x) / cap)
    magnitude = cap * (1.0 - decay) / (1.0 + decay)
    return tl.where(x < 0, -magnitude, magnitude)


@triton.jit
def _load_logits(row_ptr, cols, in_vocab, cap, SOFTCAP: tl.constexpr):
    x = tl.load(row_ptr + cols, mask=in_vocab, other=NEG_INF).to(tl.float32)
    if SOFTCAP:
        # columns past the vocabulary stay −inf (a capped −inf would be −cap)
        x = tl.where(in_vocab, _softcapped(x, cap), NEG_INF)
    return x


@triton.jit
def _online_step(running_max, running_sum, x):
    """One element per lane into a running (max, Σ exp(x − max)) with a single exp. Returns the
    new max and sum, whether x became the max and exp(−|x − max|) for _accumulate; −inf weighs 0."""
    is_new_max = x > running_max
    weight = tl.exp(-tl.abs(x - running_max))
    weight = tl.where(x == NEG_INF, 0.0, weight)  # both −inf would give exp(nan)
    # a weight that underflowed to 0 leaves nothing of the old sum (and no 0·inf)
    new_sum = tl.where(is_new_max, tl.where(weight > 0, running_sum * weight, 0.0) + 1.0, running_sum + weight)
    return tl.where(is_new_max, x, running_max), new_sum, is_new_max, weight


@triton.jit
def _accumulate(total, is_new_max, weight, value):
    """total ← total·exp(old max − new max) + value·exp(x − new max), for the step of _online_step.
    A weight that underflowed to 0 contributes 0 even next to an infinite value (as p = 0 does)."""
    rescaled = tl.where(weight > 0, total * weight, 0.0)
    added = tl.where(weight > 0, value * weight, 0.0)
    return tl.where(is_new_max, rescaled + value, total + added)


@triton.jit
def _merge_lanes(lane_max, lane_sum, lane_extra):
    """Per-lane online sums → (row max, Σ exp(x − max), Σ exp(x − max)·value) of the whole row."""
    row_max = tl.max(lane_max, 0)
    shift = tl.where(row_max == NEG_INF, 0.0, row_max)
    lane_weight = tl.exp(lane_max - shift)
    row_sum = tl.sum(lane_sum * lane_weight, 0)
    row_extra = tl.sum(tl.where(lane_weight > 0, lane_extra * lane_weight, 0.0), 0)
    return row_max, row_sum, row_extra


@triton.jit
def _merged_log_normaliser(lane_max, lane_sum):
    """Per-lane online sums → (row max, log Σ exp(x − max)) of the whole row."""
    row_max = tl.max(lane_max, 0)
    shift = tl.where(row_max == NEG_INF, 0.0, row_max)
    return row_max, tl.log(tl.sum(lane_sum * tl.exp(lane_max - shift), 0))


@triton.jit
def _log_probability(x, row_max, log_sum):
    return (x - row_max) - log_sum


@triton.jit
def _mixture_terms(log_p, log_q, p, q, beta, DIVERGENCE: tl.constexpr):
    """Per token: the soft loss term and g = ∂soft/∂q up to a constant (constants cancel in g − C)."""
    if DIVERGENCE == JSD:  # β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q
        mix = q + beta * (p - q)  # exactly q where p == q
        log_mix = tl.log(mix)
        term = beta * tl.where((p > 0) & (mix > 0), p * (log_p - log_mix), 0.0) + (1.0 - beta) * tl.where(
            (q > 0) & (mix > 0), q * (log_q - log_mix), 0.0
        )
        g = (1.0 - beta) * tl.where((q > 0) & (mix > 0), log_q - log_mix, 0.0)
    elif DIVERGENCE == SKEW_FORWARD_KL:  # KL(p ‖ βp + (1−β)q)
        mix = q + beta * (p - q)
        term = tl.where((p > 0) & (mix > 0), p * (log_p - tl.log(mix)), 0.0)
        g = tl.where(mix > 0, -(1.0 - beta) * p / mix, 0.0)
    elif DIVERGENCE == SKEW_REVERSE_KL:  # KL(q ‖ βq + (1−β)p)
        mix = p + beta * (q - p)
        log_mix = tl.log(mix)
        term = tl.where((q > 0) & (mix > 0), q * (log_q - log_mix), 0.0)
        g = tl.where((q > 0) & (mix > 0), log_q - log_mix - beta * q / mix, 0.0)
    else:  # tvd: ½·Σ|p − q|
        term = 0.5 * tl.abs(p - q)
        g = tl.where(p > q, -0.5, tl.where(p < q, 0.5, 0.0))
    return term, g


@triton.jit
def _kd_row(
    row,
    student_ptr, student_row_stride,
    teacher_ptr, teacher_row_stride,
    labels_ptr,
    loss_ptr,
    stats_ptr,
    grad_ptr, grad_row_stride,
    row_scale_ptr, row_scale_stride,
    vocab, grad_width,
    inv_temperature, beta, soft_scale, hard_weight, softcap, ignore_index,
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_SOFT: tl.constexpr,
    HAS_HARD: tl.constexpr,
    HARD_SHARES_SOFT_STATS: tl.constexpr,
    SOFTCAP_STUDENT: tl.constexpr,
    SOFTCAP_TEACHER: tl.constexpr,
    LOAD_STATS: tl.constexpr,
    STORE_STATS: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One position: passes 1-3 of the module docstring for row `row` (int64)."""
    student_row = student_ptr + row * student_row_stride
    teacher_row = teacher_ptr + row * teacher_row_stride
    lanes = tl.arange(0, BLOCK_V)
    num_blocks = tl.cdiv(vocab, BLOCK_V)

    counted = True
    label = 0
    active_blocks = num_blocks
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        counted = label != ignore_index
        # Ignored rows read nothing: their logits may hold anything and they cost no bandwidth.
        active_blocks = tl.where(counted, num_blocks, 0)

    # (max, log Σ exp(x − max)) of the student at T, the teacher at T, the student at T = 1
    max_student = 0.0
    log_sum_student = 0.0
    max_teacher = 0.0
    log_sum_teacher = 0.0
    max_student_t1 = 0.0
    log_sum_student_t1 = 0.0
    centre = 0.0
    soft = 0.0
    if LOAD_STATS:
        stats_row = stats_ptr + row * NUM_STATS
        max_student = tl.load(stats_row + 0)
        log_sum_student = tl.load(stats_row + 1)
        max_teacher = tl.load(stats_row + 2)
        log_sum_teacher = tl.load(stats_row + 3)
        max_student_t1 = tl.load(stats_row + 4)
        log_sum_student_t1 = tl.load(stats_row + 5)
        centre = tl.load(stats_row + 6)
    else:
        # ---- pass 1: normalisers (and the KL directions' losses) ----
        max_s = tl.full([BLOCK_V], NEG_INF, tl.float32)
        sum_s = tl.zeros([BLOCK_V], tl.float32)
        max_t = tl.full([BLOCK_V], NEG_INF, tl.float32)
        sum_t = tl.zeros([BLOCK_V], tl.float32)
        max_h = tl.full([BLOCK_V], NEG_INF, tl.float32)
        sum_h = tl.zeros([BLOCK_V], tl.float32)
        # forward_kl: Σ exp(y − max_t)·(y − z); reverse_kl: Σ exp(z − max_s)·(z − y)
        cross = tl.zeros([BLOCK_V], tl.float32)
        for block in range(0, active_blocks):
            cols = block * BLOCK_V + lanes
            in_vocab = cols < vocab
            x = _load_logits(student_row, cols, in_vocab, softcap, SOFTCAP_STUDENT)
            if HAS_SOFT:
                z = x * inv_temperature
                y = _load_logits(teacher_row, cols, in_vocab, softcap, SOFTCAP_TEACHER) * inv_temperature
                max_s, sum_s, new_s, weight_s = _online_step(max_s, sum_s, z)
                max_t, sum_t, new_t, weight_t = _online_step(max_t, sum_t, y)
                if DIVERGENCE == FORWARD_KL:
                    cross = _accumulate(cross, new_t, weight_t, tl.where(y == NEG_INF, 0.0, y - z))
                elif DIVERGENCE == REVERSE_KL:
                    cross = _accumulate(cross, new_s, weight_s, tl.where(z == NEG_INF, 0.0, z - y))
            if HAS_HARD and not HARD_SHARES_SOFT_STATS:
                max_h, sum_h, _, _ = _online_step(max_h, sum_h, x)

        if HAS_SOFT:
            row_max_s, row_sum_s, cross_s = _merge_lanes(max_s, sum_s, cross)
            row_max_t, row_sum_t, cross_t = _merge_lanes(max_t, sum_t, cross)
            max_student, log_sum_student = row_max_s, tl.log(row_sum_s)
            max_teacher, log_sum_teacher = row_max_t, tl.log(row_sum_t)
            if DIVERGENCE == FORWARD_KL:
                # Σp(log p − log q), grouped so that a single-token row gives exactly 0
                soft = cross_t / row_sum_t - (row_max_t - row_max_s) - tl.log(row_sum_t) + tl.log(row_sum_s)
            elif DIVERGENCE == REVERSE_KL:
                soft = cross_s / row_sum_s - (row_max_s - row_max_t) - tl.log(row_sum_s) + tl.log(row_sum_t)
                centre = soft  # Σ q·log(q/p)
            else:
                # ---- pass 2: the mixture losses and C, backwards for L2 reuse ----
                soft_lanes = tl.zeros([BLOCK_V], tl.float32)
                centre_lanes = tl.zeros([BLOCK_V], tl.float32)
                for step in range(0, active_blocks):
                    cols = (active_blocks - 1 - step) * BLOCK_V + lanes
                    in_vocab = cols < vocab
                    z = _load_logits(student_row, cols, in_vocab, softcap, SOFTCAP_STUDENT) * inv_temperature
                    y = _load_logits(teacher_row, cols, in_vocab, softcap, SOFTCAP_TEACHER) * inv_temperature
                    log_q = _log_probability(z, max_student, log_sum_student)
                    log_p = _log_probability(y, max_teacher, log_sum_teacher)
                    q = tl.exp(log_q)
                    term, g = _mixture_terms(log_p, log_q, tl.exp(log_p), q, beta, DIVERGENCE)
                    soft_lanes += term
                    centre_lanes += tl.where(q > 0, q * g, 0.0)
                soft = tl.sum(soft_lanes, 0)
                centre = tl.sum(centre_lanes, 0)
        if HAS_HARD:
            if HARD_SHARES_SOFT_STATS:
                max_student_t1, log_sum_student_t1 = max_student, log_sum_student
            else:
                max_student_t1, log_sum_student_t1 = _merged_log_normaliser(max_h, sum_h)

    if WRITE_LOSS:
        per_position = 0.0
        if HAS_SOFT:
            lse_student = max_student + log_sum_student
            lse_teacher = max_teacher + log_sum_teacher
            no_mass = (lse_student != lse_student) | (lse_teacher != lse_teacher) | (lse_student == NEG_INF) | (
                lse_teacher == NEG_INF)
            per_position += soft_scale * tl.where(no_mass, float("nan"), soft)
        if HAS_HARD:
            label_in_vocab = (label >= 0) & (label < vocab)
            safe_label = tl.where(label_in_vocab, label, 0)
            label_logit = tl.load(student_row + safe_label).to(tl.float32)
            if SOFTCAP_STUDENT:
                label_logit = _softcapped(label_logit, softcap)
            cross_entropy = (max_student_t1 - label_logit) + log_sum_student_t1
            per_position += hard_weight * tl.where(label_in_vocab, cross_entropy, float("nan"))
        tl.store(loss_ptr + row, tl.where(counted, per_position, 0.0))

    if STORE_STATS:
        stats_row = stats_ptr + row * NUM_STATS
        tl.store(stats_row + 0, max_student)
        tl.store(stats_row + 1, log_sum_student)
        tl.store(stats_row + 2, max_teacher)
        tl.store(stats_row + 3, log_sum_teacher)
        tl.store(stats_row + 4, max_student_t1)
        tl.store(stats_row + 5, log_sum_student_t1)
        tl.store(stats_row + 6, centre)

    if WRITE_GRAD:
        # ---- pass 3: the gradient; backwards when pass 2 did not run, so pass 1's tail is in L2 ----
        row_scale = tl.load(row_scale_ptr + row * row_scale_stride).to(tl.float32)
        soft_factor = soft_scale * inv_temperature * row_scale
        hard_factor = hard_weight * row_scale
        grad_row = grad_ptr + row * grad_row_stride
        grad_blocks = tl.cdiv(grad_width, BLOCK_V)
        walk_backwards = LOAD_STATS or DIVERGENCE <= REVERSE_KL or not HAS_SOFT
        for step in range(0, grad_blocks):
            block = step
            if walk_backwards:
                block = grad_blocks - 1 - step
            cols = block * BLOCK_V + lanes
            in_vocab = (cols < vocab) & counted
            x = _load_logits(student_row, cols, in_vocab, softcap, SOFTCAP_STUDENT)
            grad = tl.zeros([BLOCK_V], tl.float32)
            if HAS_SOFT:
                z = x * inv_temperature
                y = _load_logits(teacher_row, cols, in_vocab, softcap, SOFTCAP_TEACHER) * inv_temperature
                log_q = _log_probability(z, max_student, log_sum_student)
                log_p = _log_probability(y, max_teacher, log_sum_teacher)
                q = tl.exp(log_q)
                p = tl.exp(log_p)
                if DIVERGENCE == FORWARD_KL:
                    soft_grad = q - p
                elif DIVERGENCE == REVERSE_KL:
                    soft_grad = tl.where(q > 0, q * (log_q - log_p - centre), 0.0)
                else:
                    _, g = _mixture_terms(log_p, log_q, p, q, beta, DIVERGENCE)
                    soft_grad = tl.where(q > 0, q * (g - centre), 0.0)
                grad += soft_factor * soft_grad
            if HAS_HARD:
                # a label outside [0, vocab) makes the loss NaN and, as on the other backends,
                # sends no gradient
                q_t1 = tl.exp(_log_probability(x, max_student_t1, log_sum_student_t1))
                label_in_vocab = (label >= 0) & (label < vocab)
                grad += tl.where(label_in_vocab, hard_factor * (q_t1 - tl.where(cols == label, 1.0, 0.0)), 0.0)
            if SOFTCAP_STUDENT:
                grad = grad * (1.0 - (x / softcap) * (x / softcap))
            grad = tl.where(in_vocab, grad, 0.0)
            tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < grad_width)


@triton.jit
def kd_rows_kernel(
    student_ptr, student_row_stride,
    teacher_ptr, teacher_row_stride,
    labels_ptr,
    loss_ptr,
    stats_ptr,
    grad_ptr, grad_row_stride,
    row_scale_ptr, row_scale_stride,
    vocab, grad_width, rows,
    inv_temperature, beta, soft_scale, hard_weight, softcap, ignore_index,
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_SOFT: tl.constexpr,
    HAS_HARD: tl.constexpr,
    HARD_SHARES_SOFT_STATS: tl.constexpr,
    SOFTCAP_STUDENT: tl.constexpr,
    SOFTCAP_TEACHER: tl.constexpr,
    LOAD_STATS: tl.constexpr,
    STORE_STATS: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    if PERSISTENT:
        # Fewer programs than rows: program p takes rows p, p + P, ..., which bounds the row pairs in
        # flight (and the L2 footprint of their re-reads) at P.
        for program_row in range(tl.program_id(0), rows, tl.num_programs(0)):
            _kd_row(
                tl.cast(program_row, tl.int64),
                student_ptr, student_row_stride, teacher_ptr, teacher_row_stride, labels_ptr, loss_ptr, stats_ptr,
                grad_ptr, grad_row_stride, row_scale_ptr, row_scale_stride, vocab, grad_width,
                inv_temperature, beta, soft_scale, hard_weight, softcap, ignore_index,
                DIVERGENCE, HAS_LABELS, HAS_SOFT, HAS_HARD, HARD_SHARES_SOFT_STATS, SOFTCAP_STUDENT, SOFTCAP_TEACHER,
                LOAD_STATS, STORE_STATS, WRITE_LOSS, WRITE_GRAD, BLOCK_V,
            )
    else:  # one program per row, no loop
        _kd_row(
            tl.program_id(0).to(tl.int64),
            student_ptr, student_row_stride, teacher_ptr, teacher_row_stride, labels_ptr, loss_ptr, stats_ptr,
            grad_ptr, grad_row_stride, row_scale_ptr, row_scale_stride, vocab, grad_width,
            inv_temperature, beta, soft_scale, hard_weight, softcap, ignore_index,
            DIVERGENCE, HAS_LABELS, HAS_SOFT, HAS_HARD, HARD_SHARES_SOFT_STATS, SOFTCAP_STUDENT, SOFTCAP_TEACHER,
            LOAD_STATS, STORE_STATS, WRITE_LOSS, WRITE_GRAD, BLOCK_V,
        )


@triton.jit
def scale_rows_kernel(grad_ptr, grad_row_stride, width, scale_ptr, scale_stride, BLOCK_V: tl.constexpr):
    """grad[row] *= scale[row · scale_stride], skipped (no traffic) where the scale is 1: kd_loss's
    backward with the gradient its forward already wrote, for the usual grad_output of 1."""
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + row * scale_stride)
    if scale != 1.0:
        grad_row = grad_ptr + row * grad_row_stride
        for start in range(0, width, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < width
            g = tl.load(grad_row + cols, mask=in_row, other=0.0).to(tl.float32)
            tl.store(grad_row + cols, (g * scale).to(grad_ptr.dtype.element_ty), mask=in_row)
