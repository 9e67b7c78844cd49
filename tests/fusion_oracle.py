"""The logit-fusion formulas of DESIGN.md written out in NumPy float64, row by row.

Independent of `collab_ops.reference.fusion`: different library, per-row loops, the plausibility
mask in its probability form and the top_p filter in Hugging Face's ascending-sort form.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.special import logsumexp, rel_entr

NEG_INF = -np.inf


def as_float64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float64).cpu().numpy()


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row log-softmax in which −inf stays −inf, also in an all −inf row."""
    out = np.full_like(x, NEG_INF)
    finite = x != NEG_INF
    if finite.any():
        out[finite] = x[finite] - logsumexp(x[finite])
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    if (x == NEG_INF).all():
        return np.zeros_like(x)
    return np.exp(log_softmax(x))


def fused_row(rows, weights, temperatures, normalize, alpha, ref, vocab_size) -> np.ndarray:
    """s(x) for one row; `rows` are the K models' float64 rows at full width."""
    rows = [r[:vocab_size] for r in rows]
    takes_part = [w != 0 for w in weights]
    if any(part and np.isnan(r).any() for part, r in zip(takes_part, rows)):
        return np.full(vocab_size, np.nan)
    if alpha is not None and np.isnan(rows[ref]).any():
        return np.full(vocab_size, np.nan)
    total = np.zeros(vocab_size)
    excluded = np.zeros(vocab_size, dtype=bool)
    for r, w, t, part in zip(rows, weights, temperatures, takes_part):
        if not part:
            continue
        z = log_softmax(r / t) if normalize else r / t
        excluded |= z == NEG_INF
        total += w * np.where(z == NEG_INF, 0.0, z)
    if alpha is not None:
        p_ref = softmax(rows[ref] / temperatures[ref])
        excluded |= p_ref < alpha * p_ref.max()
        if (rows[ref] == NEG_INF).all():
            excluded[:] = True
    return np.where(excluded, NEG_INF, total)


def fuse(logits, weights, temperatures=None, normalize=True, alpha=None, ref=0, vocab_size=None, output="logprobs"):
    """fuse_logits in float64. `logits`: list of tensors [B, V_k]; `weights`: K floats or [B, K]."""
    arrays = [as_float64(l) for l in logits]
    batch, num_models = arrays[0].shape[0], len(arrays)
    vocab_size = vocab_size or min(a.shape[1] for a in arrays)
    temperatures = temperatures or [1.0] * num_models
    row_weights = np.broadcast_to(np.asarray(as_float64(weights) if torch.is_tensor(weights) else weights, dtype=np.float64), (batch, num_models))
    out = np.empty((batch, vocab_size))
    for b in range(batch):
        s = fused_row([a[b] for a in arrays], row_weights[b], temperatures, normalize, alpha, ref, vocab_size)
        out[b] = log_softmax(s) if output == "logprobs" and not np.isnan(s).any() else s
    return out


def sampling_distribution(scores: np.ndarray, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """The distribution fused_sample draws from for one row of fused scores, following the
    Hugging Face warpers' code: TopK, then TopP via an ascending sort, then MinP."""
    x = scores / temperature
    if top_k:
        kth = np.sort(x)[::-1][min(top_k, x.size) - 1]
        x = np.where(x < kth, NEG_INF, x)
    if top_p < 1.0:
        ascending = np.argsort(x, kind="stable")
        cumulative = np.cumsum(softmax(x[ascending]))
        remove_sorted = cumulative <= 1.0 - top_p
        remove_sorted[-1] = False
        x = x.copy()
        x[ascending[remove_sorted]] = NEG_INF
    if min_p > 0.0:
        p = softmax(x)
        x = np.where(p < min_p * p.max(), NEG_INF, x)
    return softmax(x)


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(rel_entr(p, q).sum())


def dynamic_weights(large, experts, base, grid) -> np.ndarray:
    """Per-expert grid search of Fan et al.'s objective, brute force, [B, T]."""
    large, base = as_float64(large), as_float64(base)
    experts = [as_float64(e) for e in experts]
    vocab_size = min(a.shape[1] for a in [large, base, *experts])
    out = np.empty((large.shape[0], len(experts)))
    for b in range(large.shape[0]):
        p, q = softmax(large[b, :vocab_size]), softmax(base[b, :vocab_size])
        for t, expert in enumerate(experts):
            q_t = softmax(expert[b, :vocab_size])
            objectives = []
            for alpha in grid:
                p_fused = softmax(large[b, :vocab_size] + alpha * (expert[b, :vocab_size] - base[b, :vocab_size]))
                objectives.append((kl(p_fused, p) - kl(q_t, q)) ** 2 + (kl(p, p_fused) - kl(q, q_t)) ** 2)
            out[b, t] = grid[int(np.argmin(objectives))]
    return out


def dynamic_objective(large_row, expert_row, base_row, alpha) -> float:
    p, q, q_t = softmax(large_row), softmax(base_row), softmax(expert_row)
    p_fused = softmax(large_row + alpha * (expert_row - base_row))
    return (kl(p_fused, p) - kl(q_t, q)) ** 2 + (kl(p, p_fused) - kl(q, q_t)) ** 2
