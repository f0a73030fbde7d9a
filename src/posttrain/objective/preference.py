"""Preference optimisation as advantages of the one estimator (DESIGN.md §1, algorithms.md §4.3).

A pair (x, y_w, y_l) is two rows of one group: the chosen response (sign +1) and the rejected one (-1). Each
method's loss is a function of the pair's summed or length-averaged log-probs, so its gradient puts one
coefficient on every token of y_w and one on every token of y_l:

    loss = (1/P) sum_pairs L(s_w, s_l)    s = sum_t logp  (or the average a = s / |y|)
    A_it = -dL/dlogp_it,  with W = 1/P per token (aggregation "pair")

computed from the current forward pass's *detached* log-probs (no second policy pass). With b the reference:

    dpo    h = (s_w - b_w) - (s_l - b_l)                     L = -log sigma(beta h)
           A_w =  beta sigma(-beta h),  A_l = -A_w
    ipo    h = (a_w - b_w/|y_w|) - (a_l - b_l/|y_l|)         L = (h - 1/(2 beta))^2           (beta is IPO's tau)
           A_w = -2 (h - 1/(2 beta)) / |y_w|,  A_l = +2 (h - 1/(2 beta)) / |y_l|
    simpo  z = beta (a_w - a_l) - gamma   (no reference)    L = -log sigma(z)
           A_w = beta sigma(-z) / |y_w|,  A_l = -beta sigma(-z) / |y_l|
    orpo   o = a - log(1 - exp(a))  (log-odds)  D = o_w - o_l   (no reference)
           L = NLL_tok(y_w) - lam log sigma(D)
           A_w = P / N_w + lam sigma(-D) / ((1 - e^{a_w}) |y_w|),  A_l = -lam sigma(-D) / ((1 - e^{a_l}) |y_l|)
           (N_w: chosen tokens in the whole batch, so the NLL is a token mean as in ORPO / TRL)

Reward-model training (method `reward_model`, not a policy gradient) uses the same pairs with a scalar score
r(x, y) from a value head instead of log-probs: L = -log sigma(r_w - r_l) (Bradley-Terry), margin r_w - r_l;
its loss carries the gradient itself (`bradley_terry_terms`).

`margin` is the method's own preference margin (beta h, h, z + gamma, D): the pair is ranked right when it is
> 0, the preference accuracy.

KTO is unpaired: each row is one response with a label (sign +1 desirable, -1 undesirable), its own group,
r = s - b its log-ratio and z0 the batch's reference point (a detached KL estimate from mismatched prompts and
responses, clamped at 0; computed when the batch is built). With the mean over rows (aggregation "sum"):

    kto    desirable:   L = lam_D (1 - sigma(beta (r - z0)))    A =  lam_D beta sigma(u)(1 - sigma(u)), u = beta (r - z0)
           undesirable: L = lam_U (1 - sigma(beta (z0 - r)))    A = -lam_U beta sigma(v)(1 - sigma(v)), v = beta (z0 - r)
           margin = sign (r - z0): the response is on the right side of the reference point when it is > 0
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PAIRED_LOSSES = ("dpo", "ipo", "simpo", "orpo")
PREFERENCE_LOSSES = PAIRED_LOSSES + ("kto",)
NEEDS_REFERENCE = ("dpo", "ipo", "kto")
REWARD_MODEL_LOSS = "bradley_terry"


@dataclass(frozen=True)
class PreferenceSpec:
    kind: str  # one of PREFERENCE_LOSSES
    beta: float  # DPO / SimPO beta, IPO tau
    gamma: float = 0.0  # SimPO target margin
    lam: float = 0.1  # ORPO weight of the odds-ratio term
    desirable_weight: float = 1.0  # KTO lam_D
    undesirable_weight: float = 1.0  # KTO lam_U


@dataclass(frozen=True)
class PreferenceTerms:
    advantages: Tensor  # (N, T) detached coefficient per token (times W = 1/P gives -dL/dlogp)
    value: Tensor  # () this micro-batch's share of the batch loss: sum over its pairs of L / P (ORPO: + NLL part)
    margin: Tensor  # (pairs,) the method's margin per pair (KTO: per row)
    chosen_reward: Tensor  # (pairs,) beta (s_w - b_w) with a reference, else beta a_w (ORPO: o_w); KTO: r of each
    rejected_reward: Tensor  # (pairs,)                                            desirable / undesirable row


def pair_index(group: Tensor, sign: Tensor) -> tuple[Tensor, Tensor]:
    """(chosen row, rejected row) of each pair, (pairs,) each, pairs ordered by group id. Every group must hold
    exactly one row of each sign (one check, one host sync)."""
    w, lo = (sign > 0).nonzero().flatten(), (sign < 0).nonzero().flatten()
    w, lo = w[torch.argsort(group[w])], lo[torch.argsort(group[lo])]
    ok = len(w) == len(lo) and len(w) + len(lo) == len(group) and bool(
        (group[w] == group[lo]).all() and (len(w) < 2 or (group[w][1:] != group[w][:-1]).all()))
    if not ok:
        raise ValueError(f"every preference group must hold one chosen and one rejected row; got groups "
                         f"{group.tolist()} with signs {sign.tolist()}")
    return w, lo


def bradley_terry_terms(scores: Tensor, group: Tensor, sign: Tensor, *, num_pairs: float) -> PreferenceTerms:
    """Reward-model training on a micro-batch of whole pairs: scores (N,) differentiable, one per row,

        L = (1/P) sum_pairs -log sigma(r_w - r_l),   margin = r_w - r_l

    with P the pairs of the whole optimizer step. `value` carries the gradient; no token enters the estimator,
    so `advantages` is empty."""
    w, lo = pair_index(group, sign)
    margin = scores[w] - scores[lo]
    value = -F.logsigmoid(margin).sum() / max(float(num_pairs), 1.0)
    return PreferenceTerms(scores.new_zeros(0), value, margin.detach(), scores[w].detach(), scores[lo].detach())


def kto_terms(spec: PreferenceSpec, s: Tensor, b: Tensor, m: Tensor, sign: Tensor, z0: Tensor, num_rows: float,
              dtype) -> PreferenceTerms:
    """KTO on rows with summed log-probs s, reference sums b, labels `sign` and reference point z0 (N,)."""
    r = s - b
    desirable = sign > 0
    u = spec.beta * torch.where(desirable, r - z0, z0 - r)
    lam = torch.where(desirable, torch.full_like(r, spec.desirable_weight), torch.full_like(r, spec.undesirable_weight))
    loss = lam * (1 - torch.sigmoid(u))
    coef = lam * spec.beta * torch.sigmoid(u) * (1 - torch.sigmoid(u)) * torch.where(desirable, 1.0, -1.0).to(r)
    margin = torch.where(desirable, r - z0, z0 - r)
    return PreferenceTerms((coef[:, None] * m).to(dtype), (loss.sum() / max(float(num_rows), 1.0)).to(dtype),
                           margin.to(dtype), (spec.beta * r[desirable]).to(dtype),
                           (spec.beta * r[~desirable]).to(dtype))


def preference_terms(spec: PreferenceSpec, logp: Tensor, mask: Tensor, group: Tensor, sign: Tensor, *,
                     ref_logp: Tensor | None, num_pairs: float, chosen_tokens: float,
                     ref_point: Tensor | None = None) -> PreferenceTerms:
    """The coefficients and loss value of `spec.kind` on a micro-batch of whole pairs (see the module doc).
    logp, mask, ref_logp: (N, T); group, sign: (N,). num_pairs and chosen_tokens count the whole batch.
    KTO: rows are unpaired, num_pairs counts the batch's rows and ref_point (N,) holds z0."""
    if spec.kind not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {spec.kind!r}; choose one of {', '.join(PREFERENCE_LOSSES)}")
    if spec.kind in NEEDS_REFERENCE and ref_logp is None:
        raise ValueError(f"{spec.kind} needs the reference model's log-probs")
    lp = logp.detach().double()
    m = mask.double()
    n = m.sum(1).clamp(min=1)  # (N,) response lengths
    s = (lp * m).sum(1)  # (N,)
    b = (ref_logp.double() * m).sum(1) if ref_logp is not None else torch.zeros_like(s)
    if spec.kind == "kto":
        if ref_point is None:
            raise ValueError("kto needs the batch's reference point z0 (Batch.ref_point)")
        return kto_terms(spec, s, b, m, sign, ref_point.double(), num_pairs, logp.dtype)
    w, lo = pair_index(group, sign)
    P = max(float(num_pairs), 1.0)
    coef = torch.zeros_like(s)  # (N,) coefficient per token of each row
    beta = spec.beta
    if spec.kind == "dpo":
        rw, rl = beta * (s[w] - b[w]), beta * (s[lo] - b[lo])
        margin = rw - rl
        loss = -F.logsigmoid(margin)
        g = beta * torch.sigmoid(-margin)
        coef[w], coef[lo] = g, -g
    elif spec.kind == "ipo":
        rw, rl = s[w] / n[w] - b[w] / n[w], s[lo] / n[lo] - b[lo] / n[lo]
        margin = rw - rl
        loss = (margin - 1 / (2 * beta)) ** 2
        g = -2 * (margin - 1 / (2 * beta))
        coef[w], coef[lo] = g / n[w], -g / n[lo]
    elif spec.kind == "simpo":
        rw, rl = beta * s[w] / n[w], beta * s[lo] / n[lo]
        z = rw - rl - spec.gamma
        margin = z + spec.gamma
        loss = -F.logsigmoid(z)
        g = beta * torch.sigmoid(-z)
        coef[w], coef[lo] = g / n[w], -g / n[lo]
    else:  # orpo
        a = s / n
        odds = a - torch.log(-torch.expm1(a))  # log(p / (1 - p)), p = exp(a) < 1
        rw, rl = odds[w], odds[lo]
        margin = rw - rl
        loss = -spec.lam * F.logsigmoid(margin)
        g = spec.lam * torch.sigmoid(-margin)
        coef[w] = g / ((-torch.expm1(a[w])) * n[w])
        coef[lo] = -g / ((-torch.expm1(a[lo])) * n[lo])
    advantages = coef[:, None] * m
    value = loss.sum() / P
    if spec.kind == "orpo":  # the NLL of the chosen responses, a token mean over the whole batch
        chosen_mask = m * (sign > 0).double()[:, None]
        advantages = advantages + chosen_mask * (P / max(float(chosen_tokens), 1.0))
        value = value - (lp * chosen_mask).sum() / max(float(chosen_tokens), 1.0)
    dt = logp.dtype
    return PreferenceTerms(advantages.to(dt), value.to(dt), margin.to(dt), rw.to(dt), rl.to(dt))
