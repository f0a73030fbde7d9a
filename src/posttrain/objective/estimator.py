"""The one estimator: every method's loss on one micro-batch (DESIGN.md §1).

    loss = - sum_{i,t} W_it * lam_it * M_it * A_it * w_it * logp_it  +  beta * sum W_it kl_it  -  alpha * sum W_it H_it

with w = sg(p / D) the reference-denominator weight, A the advantage, M the stabilisation mask, W the
aggregation weights (global normalisers, so gradient accumulation is invariant) and lam the stream mixer.
Only `logp` (and `entropy`, when the bonus is on) carry gradient; the coefficient is detached.

The gradient is the contract. The *value* of the returned loss is the method's familiar surrogate
(the NLL for SFT, the clipped surrogate for PPO/GRPO, -T(p) for DFT / LUFFY / CHORD-phi), obtained as
`value.detach() + (pg - pg.detach())`: the value is logged, the gradient is the coefficient form.
Tests prove the familiar surrogate, differentiated by autograd, gives the same gradient (oracle O1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .components import WEIGHTS, clip_mask, kl_penalty, likelihood_value, sequence_ratio


@dataclass(frozen=True)
class EstimatorTerms:
    """Outputs for one micro-batch. `loss` is what to backpropagate; the rest are detached diagnostics."""

    loss: Tensor  # () differentiable
    pg_value: Tensor  # () familiar surrogate of the policy-gradient term
    kl: Tensor  # () W-aggregated KL estimate (0 without a KL term)
    entropy: Tensor  # () W-aggregated entropy (0 when not computed)
    clipped_tokens: Tensor  # () count of masked-out tokens by the clip mask (for clipfrac)
    ratio_sum: Tensor  # () sum of r over response tokens (for the mean ratio)


def estimator_loss(
    logp: Tensor,
    *,
    advantages: Tensor,
    mask: Tensor,
    agg_weights: Tensor,
    old_logp: Tensor | None = None,
    lam: Tensor | None = None,
    weight: str = "one",
    clip: str = "none",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    eps_max: float = 5.0,
    gamma: float = 0.1,
    ref_logp: Tensor | None = None,
    kl_estimator: str = "k3",
    kl_beta: float = 0.0,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> EstimatorTerms:
    """The unified loss for one micro-batch.

    Args (all (N, T) aligned with input_ids unless noted):
      logp: log pi_theta of each token (differentiable).
      advantages: A (detached). mask: 1 on tokens the loss may touch. agg_weights: W from `aggregation_weights`.
      old_logp: log q of the policy that produced the data; None means q = sg(p) (one update per batch).
      lam: stream mixer weights (default 1). weight: a key of WEIGHTS. clip: "none" | "token" | "sequence".
      ref_logp: log b of the reference model, needed when kl_beta > 0 (KL in the loss).
      entropy: per-token entropy (differentiable), needed when entropy_coef > 0.
    """
    if weight not in WEIGHTS:
        raise ValueError(f"unknown weight {weight!r}; choose one of {', '.join(WEIGHTS)}")
    lp = logp.detach()
    q = lp if old_logp is None else old_logp
    lam = torch.ones_like(lp) if lam is None else lam
    with torch.no_grad():
        w = WEIGHTS[weight](lp, q, eps_max=eps_max, gamma=gamma, mask=mask)  # (N, T)
        if clip == "none":
            M = torch.ones_like(lp)
            ratio_for_clip = None
        elif clip == "token":
            ratio_for_clip = torch.exp(lp - q)  # (N, T)
            M = clip_mask(ratio_for_clip, advantages, eps_low, eps_high)
        elif clip == "sequence":
            ratio_for_clip = sequence_ratio(lp, q, mask)[:, None].expand_as(lp)  # (N, T)
            M = clip_mask(ratio_for_clip, advantages, eps_low, eps_high)
        else:
            raise ValueError(f"unknown clip {clip!r}; choose one of none, token, sequence")
        coef = agg_weights * lam * M * advantages * w  # (N, T) detached
        # The familiar surrogate value: -sum W lam min(T A, clip(T) A) for clipped ratios, else -sum W lam M A T.
        T = likelihood_value(weight, lp, q, mask, gamma, eps_max)
        if ratio_for_clip is not None and weight in ("ratio", "seq_ratio"):
            tok = torch.minimum(T * advantages, T.clamp(1 - eps_low, 1 + eps_high) * advantages)
        else:
            tok = M * advantages * T
        pg_value = -(agg_weights * lam * tok).sum()
        clipped = ((1 - M) * mask).sum()
        ratio_sum = (torch.exp(lp - q) * mask).sum()

    pg = -(coef * logp).sum()
    loss = pg_value + (pg - pg.detach())
    kl = torch.zeros((), dtype=lp.dtype, device=lp.device)
    if kl_beta:
        if ref_logp is None:
            raise ValueError("kl_beta > 0 needs ref_logp (the reference model's log-probs)")
        kl_tok = kl_penalty(logp, ref_logp, kl_estimator, old_logp)  # (N, T)
        kl_term = (agg_weights * kl_tok).sum()
        loss = loss + kl_beta * kl_term
        kl = kl_term.detach()
    ent = torch.zeros((), dtype=lp.dtype, device=lp.device)
    if entropy is not None:
        ent_term = (agg_weights * entropy).sum()
        if entropy_coef:
            loss = loss - entropy_coef * ent_term
        ent = ent_term.detach()
    return EstimatorTerms(loss, pg_value, kl, ent, clipped, ratio_sum)
