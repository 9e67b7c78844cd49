"""What users write without collab_ops: the eager PyTorch chains that the benchmarks and the demo
time our fused ops against. Each is the straightforward vectorised form (no Python loop over rows),
one full pass over [B, V] per step of the chain.
"""
from __future__ import annotations

import torch

def eager_fused_score(logits: list, weights: tuple) -> torch.Tensor:
    return sum(w * torch.log_softmax(l.float(), dim=-1) for w, l in zip(weights, logits))


def eager_proxy_tuning_step(logits: list, weights: tuple) -> torch.Tensor:
    probs = torch.softmax(eager_fused_score(logits, weights), dim=-1)
    return torch.multinomial(probs, 1).squeeze(1)


def eager_fuse_logits(logits: list, weights: tuple) -> torch.Tensor:
    return torch.log_softmax(eager_fused_score(logits, weights), dim=-1)


def eager_dynamic_fusion_weights(large: torch.Tensor, expert: torch.Tensor, base: torch.Tensor, grid: tuple) -> torch.Tensor:
    """Dynamic logits fusion (Fan et al. 2024) for one expert: one full pass over [B, V] per candidate."""
    log_p = torch.log_softmax(large.float(), dim=-1)
    log_q = torch.log_softmax(base.float(), dim=-1)
    log_q_expert = torch.log_softmax(expert.float(), dim=-1)
    kl_expert_base = (log_q_expert.exp() * (log_q_expert - log_q)).sum(-1)
    kl_base_expert = (log_q.exp() * (log_q - log_q_expert)).sum(-1)
    shift = expert.float() - base.float()
    objectives = []
    for alpha in grid:
        log_p_fused = torch.log_softmax(large.float() + alpha * shift, dim=-1)
        kl_fused_large = (log_p_fused.exp() * (log_p_fused - log_p)).sum(-1)
        kl_large_fused = (log_p.exp() * (log_p - log_p_fused)).sum(-1)
        objectives.append((kl_fused_large - kl_expert_base) ** 2 + (kl_large_fused - kl_base_expert) ** 2)
    best = torch.stack(objectives, dim=-1).argmin(dim=-1)
    return torch.tensor(grid, device=large.device)[best].unsqueeze(-1)


def eager_speculative_verify(draft_tokens: torch.Tensor, target: torch.Tensor, draft: torch.Tensor, from_logits: bool):
    if from_logits:
        target = torch.softmax(target.float(), dim=-1)
        draft = torch.softmax(draft.float(), dim=-1)
    batch, num_draft = draft_tokens.shape
    ids = draft_tokens.unsqueeze(-1)
    p = target[:, :num_draft].gather(-1, ids).squeeze(-1)
    q = draft.gather(-1, ids).squeeze(-1)
    accepted = torch.rand_like(p) * q < p  # u < p/q, i.e. accept with probability min(1, p/q)
    num_accepted = accepted.long().cumprod(dim=1).sum(dim=1)
    rows = torch.arange(batch, device=draft_tokens.device)
    p_next = target[rows, num_accepted]
    # With every draft accepted there is no q: the residual is the bonus row of the target itself.
    q_next = torch.where(
        (num_accepted < num_draft).unsqueeze(-1), draft[rows, num_accepted.clamp(max=num_draft - 1)], 0.0
    )
    next_token = torch.multinomial((p_next - q_next).clamp_min(0), 1)
    positions = torch.arange(num_draft + 1, device=draft_tokens.device)
    padded = torch.cat([draft_tokens, draft_tokens.new_full((batch, 1), -1)], dim=1)
    tokens = torch.where(positions < num_accepted.unsqueeze(-1), padded, -1).scatter(1, num_accepted.unsqueeze(-1), next_token)
    return tokens, num_accepted + 1


def eager_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    log_t = torch.log_softmax(teacher_logits.float(), dim=-1)
    p_s, p_t = log_s.exp(), log_t.exp()
    log_m = (beta * p_t + (1 - beta) * p_s).log()
    per_row = beta * (p_t * (log_t - log_m)).sum(-1) + (1 - beta) * (p_s * (log_s - log_m)).sum(-1)
    return per_row.mean()


def eager_linear_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, beta: float) -> torch.Tensor:
    return eager_jsd(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, beta)


def eager_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    log_t = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()
