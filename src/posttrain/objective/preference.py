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

`margin` is the method's own preference margin (beta h, h, z + gamma, D): the pair is ranked right when it is
> 0, the preference accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PREFERENCE_LOSSES = ("dpo", "ipo", "simpo", "orpo")
NEEDS_REFERENCE = ("dpo", "ipo")


@dataclass(frozen=True)
class PreferenceSpec:
    kind: str  # one of PREFERENCE_LOSSES
    beta: float  # DPO / SimPO beta, IPO tau
    gamma: float = 0.0  # SimPO target margin
    lam: float = 0.1  # ORPO weight of the odds-ratio term


@dataclass(frozen=True)
class PreferenceTerms:
    advantages: Tensor  # (N, T) detached coefficient per token (times W = 1/P gives -dL/dlogp)
    value: Tensor  # () this micro-batch's share of the batch loss: sum over its pairs of L / P (ORPO: + NLL part)
    margin: Tensor  # (pairs,) the method's margin per pair
    chosen_reward: Tensor  # (pairs,) beta (s_w - b_w) with a reference, else beta a_w (ORPO: o_w)
    rejected_reward: Tensor  # (pairs,)


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


def preference_terms(spec: PreferenceSpec, logp: Tensor, mask: Tensor, group: Tensor, sign: Tensor, *,
                     ref_logp: Tensor | None, num_pairs: float, chosen_tokens: float) -> PreferenceTerms:
    """The coefficients and loss value of `spec.kind` on a micro-batch of whole pairs (see the module doc).
    logp, mask, ref_logp: (N, T); group, sign: (N,). num_pairs and chosen_tokens count the whole batch."""
    if spec.kind not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {spec.kind!r}; choose one of {', '.join(PREFERENCE_LOSSES)}")
    if spec.kind in NEEDS_REFERENCE and ref_logp is None:
        raise ValueError(f"{spec.kind} needs the reference model's log-probs")
    lp = logp.detach().double()
    m = mask.double()
    n = m.sum(1).clamp(min=1)  # (N,) response lengths
    s = (lp * m).sum(1)  # (N,)
    b = (ref_logp.double() * m).sum(1) if ref_logp is not None else torch.zeros_like(s)
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
