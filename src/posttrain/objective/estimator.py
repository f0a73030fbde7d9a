"""The one estimator: every method's loss on one micro-batch (DESIGN.md §1).

    loss = - sum_{i,t} W_it * mix_it * M_it * A_it * w_it * logp_it  +  beta * sum W_it kl_it  -  alpha * sum W_it H_it

with w = sg(p / D) the reference-denominator weight, A the advantage, M the stabilisation mask, W the
aggregation weights (global normalisers, so gradient accumulation is invariant) and mix the stream mixer.
`estimator_loss` is this formula for one choice of components; `objective_loss` applies each stream's
own choice (weight, mask, aggregation) to that stream's tokens and sums: LUFFY's demonstration tokens are
shaped and unclipped while its rollout tokens are ratio-clipped, in one batch.
Only `logp` (and `entropy`, when the bonus is on) carry gradient; the coefficient is detached.

The gradient is the contract. The *value* of the returned loss is the method's familiar surrogate
(the NLL for SFT, the clipped surrogate for PPO/GRPO, -T(p) for DFT / LUFFY / CHORD-phi), obtained as
`value.detach() + (pg - pg.detach())`: the value is logged, the gradient is the coefficient form.
Tests prove the familiar surrogate, differentiated by autograd, gives the same gradient (oracle O1).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .components import WEIGHTS, clip_mask, kl_penalty, likelihood_value, sequence_ratio, tv_mask


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
    mix: Tensor | None = None,
    weight: str = "one",
    clip: str = "none",
    eps_low: float | None = None,
    eps_high: float | None = None,
    eps_max: float | None = None,
    shaping_gamma: float | None = None,
    tv_delta: float | None = None,
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
      mix: the mixer's weights, (N, T) or (N, 1) (default 1). weight: a key of WEIGHTS.
      clip: "none" | "token" | "sequence" (needs eps_low, eps_high) | "tv" (DPPO's divergence mask, needs
      tv_delta). eps_max: CISPO's truncation (weight
      "truncated"); shaping_gamma: LUFFY's gamma (weight "shaped"). Their defaults live in the presets.
      ref_logp: log b of the reference model, needed when kl_beta > 0 (KL in the loss).
      entropy: per-token entropy (differentiable), needed when entropy_coef > 0.
    """
    if weight not in WEIGHTS:
        raise ValueError(f"unknown weight {weight!r}; choose one of {', '.join(WEIGHTS)}")
    _require(weight, clip, eps_low, eps_high, eps_max, shaping_gamma)
    lp = logp.detach()
    q = lp if old_logp is None else old_logp
    mix = torch.ones_like(lp) if mix is None else mix
    with torch.no_grad():
        w = WEIGHTS[weight](lp, q, eps_max=eps_max, shaping_gamma=shaping_gamma, mask=mask)  # (N, T)
        if clip == "none":
            M = torch.ones_like(lp)
            ratio_for_clip = None
        elif clip == "token":
            ratio_for_clip = torch.exp(lp - q)  # (N, T)
            M = clip_mask(ratio_for_clip, advantages, eps_low, eps_high)
        elif clip == "sequence":
            ratio_for_clip = sequence_ratio(lp, q, mask)[:, None].expand_as(lp)  # (N, T)
            M = clip_mask(ratio_for_clip, advantages, eps_low, eps_high)
        elif clip == "tv":
            if tv_delta is None:
                raise ValueError("estimator_loss needs tv_delta (for the divergence mask)")
            ratio_for_clip, M = None, tv_mask(lp, q, advantages, tv_delta)
        else:
            raise ValueError(f"unknown clip {clip!r}; choose one of none, token, sequence, tv")
        coef = agg_weights * mix * M * advantages * w  # (N, T) detached
        # The familiar surrogate value: -sum W mix min(T A, clip(T) A) for clipped ratios, else -sum W mix M A T.
        T = likelihood_value(weight, lp, q, mask, shaping_gamma=shaping_gamma, eps_max=eps_max)
        if ratio_for_clip is not None and weight in ("ratio", "seq_ratio"):
            tok = torch.minimum(T * advantages, T.clamp(1 - eps_low, 1 + eps_high) * advantages)
        else:
            tok = M * advantages * T
        pg_value = -(agg_weights * mix * tok).sum()
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


def _require(weight: str, clip: str, eps_low, eps_high, eps_max, shaping_gamma) -> None:
    """The constants a component needs must be given (no silent defaults: they live in the presets)."""
    missing = []
    if clip != "none" and (eps_low is None or eps_high is None):
        missing.append("eps_low and eps_high (for the clip)")
    if weight == "truncated" and eps_max is None:
        missing.append("eps_max (for the truncated weight)")
    if weight == "shaped" and shaping_gamma is None:
        missing.append("shaping_gamma (for the shaped weight)")
    if missing:
        raise ValueError("estimator_loss needs " + "; ".join(missing))


# ---- several streams in one batch -----------------------------------------------------------------------


@dataclass(frozen=True)
class StreamComponents:
    """One stream's choice of the estimator's parts (resolved from a preset and a recipe)."""

    weight: str
    clip: str
    aggregation: str
    eps_low: float
    eps_high: float
    eps_max: float
    shaping_gamma: float
    max_len: int  # L_max of the CONST aggregation
    tv_delta: float | None = None  # DPPO's divergence bound (clip "tv")
    kl: bool = False  # the KL-in-loss term applies to this stream's tokens (samples of the policy)


@dataclass(frozen=True)
class ObjectiveTerms:
    loss: Tensor  # () differentiable, summed over streams
    streams: dict = field(default_factory=dict)  # stream id -> EstimatorTerms
    preference: Any = None  # PreferenceTerms of a preference loss (margins, implicit rewards), else None


def stream_counts(mask: Tensor, token_stream: Tensor, streams, *, joint: bool) -> dict[int, tuple[float, float]]:
    """{stream: (tokens, sequences)} over the optimizer step's whole batch, the normalisers of W.

    A sequence counts for a stream when it has at least one of that stream's loss tokens. With `joint`
    every stream is normalised by the totals over all streams (one token mean over the mixed batch, as
    LUFFY); otherwise each by its own counts (CHORD: (1 - mu) GRPO + mu SFT, each its own mean).
    """
    out = {}
    for k in streams:
        m = mask * (token_stream == k) if not joint else mask
        out[k] = (float(m.sum()), float((m.sum(1) > 0).sum()))
    return out


def objective_loss(logp: Tensor, *, token_stream: Tensor, mask: Tensor, advantages: Tensor, mix: Tensor,
                   streams: dict, counts: dict, old_logp: Tensor | None = None, ref_logp: Tensor | None = None,
                   kl_estimator: str = "k3", kl_beta: float = 0.0, entropy: Tensor | None = None,
                   entropy_coef: float = 0.0) -> ObjectiveTerms:
    """The estimator applied stream by stream: sum_k estimator(tokens of stream k, components_k, W_k).

    token_stream (N, T) long: each token's stream; streams {k: StreamComponents}; counts {k: (tokens, seqs)}
    over the global batch (`stream_counts`); mix (N,) per row. A stream absent from this micro-batch adds 0.
    """
    from .components import aggregation_weights

    total = torch.zeros((), dtype=logp.dtype, device=logp.device)
    out = {}
    mix_tok = mix[:, None].to(logp.dtype).expand_as(logp)
    for k, c in streams.items():
        tokens, seqs = counts[k]
        if not tokens:  # the stream is absent from the whole batch (checked on host counts: no device sync)
            continue
        m = mask * (token_stream == k)  # (N, T)
        W = aggregation_weights(m, c.aggregation, num_tokens=tokens, num_seqs=seqs, max_len=c.max_len)
        terms = estimator_loss(
            logp, advantages=advantages * m, mask=m, agg_weights=W, old_logp=old_logp, mix=mix_tok, weight=c.weight,
            clip=c.clip, eps_low=c.eps_low, eps_high=c.eps_high, eps_max=c.eps_max, shaping_gamma=c.shaping_gamma,
            tv_delta=c.tv_delta,
            ref_logp=ref_logp, kl_estimator=kl_estimator, kl_beta=kl_beta if c.kl else 0.0, entropy=entropy,
            entropy_coef=entropy_coef)
        total = total + terms.loss
        out[k] = terms
    return ObjectiveTerms(total, out)


def preference_loss(logp: Tensor, *, spec, token_stream: Tensor, mask: Tensor, group: Tensor, sign: Tensor,
                    streams: dict, counts: dict, ref_logp: Tensor | None = None,
                    ref_point: Tensor | None = None) -> ObjectiveTerms:
    """A preference loss (objective/preference.py) through the estimator: its advantages, computed from this
    forward pass's detached log-probs, enter as A with w = 1, no mask and W = 1/P (aggregation "pair"); the
    logged value is the method's own loss (-log sigma(beta h), ...). counts["chosen_tokens"] and the stream's
    sequence count (2 P; KTO: its N unpaired rows, W = 1/N) cover the whole optimizer step."""
    from .preference import preference_terms

    (k, _), = streams.items()
    n = counts[k][1] if spec.kind == "kto" else counts[k][1] / 2
    pref = preference_terms(spec, logp, mask, group, sign, ref_logp=ref_logp, num_pairs=n,
                            chosen_tokens=counts["chosen_tokens"], ref_point=ref_point)
    out = objective_loss(logp, token_stream=token_stream, mask=mask, advantages=pref.advantages,
                         mix=torch.ones(logp.shape[0], dtype=logp.dtype, device=logp.device), streams=streams,
                         counts=counts)
    terms = out.streams[k]
    loss = out.loss - terms.pg_value + pref.value  # the same gradient, the method's own value
    return ObjectiveTerms(loss, {k: replace(terms, loss=loss, pg_value=pref.value)}, pref)
