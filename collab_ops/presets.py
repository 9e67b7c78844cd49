"""Fusion options of published decoding-time collaboration methods.

Each function returns the keyword arguments (`weights`, `temperatures`, `normalize`,
`plausibility_alpha`, `plausibility_ref`) for `fuse_logits` / `fused_sample`, and documents the
order in which the models' logits must be passed:

    fused_sample([expert_logits, amateur_logits], **contrastive_decoding(alpha=0.1))

With equal temperatures, fusing log-probabilities (`normalize=True`) or raw logits gives the same
distribution (log_softmax only subtracts a per-row constant); the choice matters for
`output="logits"`, and each preset follows its paper.
"""
from __future__ import annotations

from ._validation import check_choice, check_float32, check_in_range, check_positive

EFT_DIRECTIONS = ("up", "down")


def _options(weights, *, temperatures=None, normalize=True, plausibility_alpha=None) -> dict:
    return dict(
        weights=[float(w) for w in weights],
        temperatures=temperatures or [1.0] * len(weights),
        normalize=normalize,
        plausibility_alpha=plausibility_alpha,
        plausibility_ref=0,
    )


def contrastive_decoding(alpha: float = 0.1, amateur_temperature: float = 1.0) -> dict:
    """Contrastive decoding (Li et al., ACL 2023). Models: [expert, amateur].

    Score log p_exp(x) − log p_ama(x) with p_ama at `amateur_temperature`, restricted to
    V_head = {x : p_exp(x) ≥ alpha · max p_exp} (other tokens −inf).
    """
    alpha = check_in_range("alpha", alpha, 0.0, 1.0, low_open=True)
    amateur_temperature = check_positive("amateur_temperature", amateur_temperature)
    return _options(
        [1.0, -1.0],
        temperatures=[1.0, amateur_temperature],
        normalize=True,
        plausibility_alpha=alpha,
    )


def cd_reasoning(beta: float = 0.5, alpha: float = 0.1) -> dict:
    """Contrastive decoding for reasoning (O'Brien & Lewis, 2023). Models: [expert, amateur].

    Score (1 + beta) · l_exp − beta · l_ama on raw logits, with the alpha plausibility mask of
    the expert (tokens with p_exp < alpha · max p_exp get −inf).
    """
    beta = check_float32("beta", beta)
    alpha = check_in_range("alpha", alpha, 0.0, 1.0, low_open=True)
    return _options([1.0 + beta, -beta], normalize=False, plausibility_alpha=alpha)


def proxy_tuning(alpha: float = 1.0) -> dict:
    """Proxy-tuning (Liu et al., COLM 2024). Models: [large base, small tuned, small base].

    Score log p_L(x) + alpha · (log p_tuned(x) − log p_base(x)).
    """
    alpha = check_float32("alpha", alpha)
    return _options([1.0, alpha, -alpha], normalize=True)


def eft(beta: float = 1.0, direction: str = "up") -> dict:
    """Emulated fine-tuning (Mitchell et al., ICLR 2024): log p_base_M + beta · (log p_ft_N − log p_ref_N).

    Models: [pretrained model of scale M, fine-tuned model of scale N, pretrained model of scale N].
    direction="up" (up-scaling: emulate fine-tuning the large model): [large pretrained,
    small fine-tuned, small pretrained]. direction="down" (down-scaling: emulate the small
    pretrained model fine-tuned like the large one): [small pretrained, large fine-tuned,
    large pretrained]. The arithmetic is the same; `direction` states which order you pass.
    beta scales the fine-tuning behaviour (beta = 1 is plain EFT).
    """
    beta = check_float32("beta", beta)
    check_choice("direction", direction, EFT_DIRECTIONS)
    return _options([1.0, beta, -beta], normalize=True)


def dexperts(alpha: float = 2.0) -> dict:
    """DExperts (Liu et al., ACL 2021). Models: [base, expert, anti-expert].

    Score z_base + alpha · (z_expert − z_antiexpert) on raw logits (the paper's steering uses
    alpha around 2 for detoxification, the default here).
    """
    alpha = check_float32("alpha", alpha)
    return _options([1.0, alpha, -alpha], normalize=False)


def cfg(guidance_scale: float = 1.5) -> dict:
    """Classifier-free guidance as Hugging Face's CFG logits processor. Models: [conditional, unconditional].

    Score log p_uncond + guidance_scale · (log p_cond − log p_uncond) in log-prob space, i.e.
    weights [guidance_scale, 1 − guidance_scale]; guidance_scale = 1 is the conditional model alone.
    """
    guidance_scale = check_float32("guidance_scale", guidance_scale)
    return _options([guidance_scale, 1.0 - guidance_scale], normalize=True)
