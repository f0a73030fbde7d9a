"""Advantages A as pure functions of rewards keyed by explicit group ids (DESIGN.md §2).

Inputs are flat: rewards (N,) float with NaN where a row has no reward (a failed reward function, a row
outside any group's statistics), group (N,) long ids of the question each row answers. Rows of a group
may sit anywhere in the batch: statistics never depend on row order. Rows with a NaN reward get A = 0 and
do not enter their group's statistics.

The trainer (`training/experience.py`) and the oracles call `advantages(...)`, the same function.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .preference import PREFERENCE_LOSSES, REWARD_MODEL_LOSS


def _index(group: Tensor) -> tuple[Tensor, int]:
    """(inverse (N,) in 0..P-1, P) for arbitrary group ids."""
    uniq, inverse = torch.unique(group, return_inverse=True)
    return inverse, len(uniq)


def group_sum(values: Tensor, group: Tensor) -> Tensor:
    """(N,) -> (N,): the sum of `values` over each row's group."""
    inv, P = _index(group)
    sums = torch.zeros(P, dtype=values.dtype, device=values.device).index_add_(0, inv, values)
    return sums[inv]


def group_stats(rewards: Tensor, group: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(valid (N,) bool, count (N,), mean (N,)) of each row's group, ignoring NaN rewards."""
    valid = ~torch.isnan(rewards)
    r0 = torch.where(valid, rewards, torch.zeros_like(rewards))
    count = group_sum(valid.to(rewards.dtype), group)
    mean = group_sum(r0, group) / count.clamp(min=1)
    return valid, count, mean


def advantage_one(rewards: Tensor, group: Tensor) -> Tensor:
    """A = 1 on every valid row (demonstrations: SFT, DFT)."""
    return (~torch.isnan(rewards)).to(rewards.dtype)


def advantage_zero(rewards: Tensor, group: Tensor) -> Tensor:
    """A = 0: the rewards carry no signal (on-policy distillation, whose advantage is the teacher term alone)."""
    return torch.zeros_like(rewards)


def advantage_raw(rewards: Tensor, group: Tensor) -> Tensor:
    """A = R (REINFORCE without a baseline)."""
    return torch.nan_to_num(rewards, nan=0.0)


def advantage_group_center(rewards: Tensor, group: Tensor) -> Tensor:
    """A_i = R_i - mean_g R (Dr. GRPO: no std, no difficulty bias)."""
    valid, _, mean = group_stats(rewards, group)
    return torch.where(valid, rewards - mean, torch.zeros_like(rewards))


def advantage_maxrl(rewards: Tensor, group: Tensor) -> Tensor:
    """A_i = (R_i - mean_g R) / mean_g R (MaxRL, arXiv 2602.02710): with 0/1 rewards and k of n right, a right
    sample gets n/k - 1 and a wrong one -1, so rare successes weigh more, toward maximum likelihood of the
    right answers. A group with mean 0 (nothing right) gives A = 0."""
    valid, _, mean = group_stats(rewards, group)
    ok = valid & (mean != 0)
    return torch.where(ok, (rewards - mean) / torch.where(ok, mean, torch.ones_like(mean)), torch.zeros_like(rewards))


def advantage_group_zscore(rewards: Tensor, group: Tensor, *, std_eps: float, bessel: bool = True) -> Tensor:
    """A_i = (R_i - mean_g R) / (std_g R + eps) (GRPO). Bessel-corrected std by default (as TRL).

    A group with a single valid row has std 0 under either convention (we define it so), hence A = 0.
    """
    valid, count, mean = group_stats(rewards, group)
    dev = torch.where(valid, rewards - mean, torch.zeros_like(rewards))
    denom = (count - 1 if bessel else count).clamp(min=1)
    std = (group_sum(dev.pow(2), group) / denom).sqrt()
    return dev / (std + std_eps)


def advantage_loo(rewards: Tensor, group: Tensor) -> Tensor:
    """A_i = R_i - mean_{j != i} R_j = (n/(n-1)) (R_i - mean_g R) (RLOO). 0 in groups of fewer than 2 valid rows."""
    valid, count, mean = group_stats(rewards, group)
    scale = count / (count - 1).clamp(min=1)
    adv = torch.where(valid, (rewards - mean) * scale, torch.zeros_like(rewards))
    return torch.where(count > 1, adv, torch.zeros_like(adv))


def advantage_indicator(rewards: Tensor, group: Tensor, *, threshold: float) -> Tensor:
    """A = 1{R >= threshold} (rejection sampling: keep the verified samples, no baseline)."""
    return (torch.nan_to_num(rewards, nan=float("-inf")) >= threshold).to(rewards.dtype)


SEQUENCE_ADVANTAGES = {
    "one": advantage_one,
    "zero": advantage_zero,
    "raw": advantage_raw,
    "remax": advantage_raw,  # R - R(greedy decode of the prompt): the baseline is subtracted before (ReMax)
    "group_center": advantage_group_center,
    "group_zscore": advantage_group_zscore,
    "maxrl": advantage_maxrl,
    "loo": advantage_loo,
    "indicator": advantage_indicator,
}
TOKEN_ADVANTAGES = ("reinforce_pp", "gae")
# Preference losses: their advantages come from the update's own forward pass (objective/preference.py).
ADVANTAGES = tuple(SEQUENCE_ADVANTAGES) + TOKEN_ADVANTAGES + PREFERENCE_LOSSES + (REWARD_MODEL_LOSS,)
GROUP_ADVANTAGES = ("group_center", "group_zscore", "loo", "reinforce_pp", "maxrl")  # need >= 2 samples per question


def token_returns(seq_adv: Tensor, kl_tokens: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Per-token return with a k1 penalty in the reward (REINFORCE++):  A_it = a_i - beta * sum_{t' >= t} k1_it'.

    seq_adv (N,), kl_tokens (N, T) detached k1 = old_logp - ref_logp, mask (N, T) -> (N, T).
    """
    pen = (kl_tokens * mask).flip(1).cumsum(1).flip(1)  # (N, T) reverse cumulative sum
    return (seq_adv[:, None] - beta * pen) * mask


def global_normalize(adv: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Whiten token advantages over every response token of the batch (REINFORCE++).

    After it, the masked mean is 0 and the masked population std (no Bessel correction) is 1.
    """
    n = mask.sum().clamp(min=1)
    mean = (adv * mask).sum() / n
    var = (((adv - mean) * mask) ** 2).sum() / n
    return (adv - mean) / (var.sqrt() + eps) * mask


def terminal_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """(N, T) per-token rewards that pay each row's sequence reward R_i (N,) at its last response token."""
    m = mask.to(torch.float64)
    last = (m * torch.arange(m.shape[1], dtype=m.dtype)).argmax(1)  # (N,)
    r = torch.zeros_like(m)
    r[torch.arange(len(last)), last] = rewards.to(m.dtype)
    return r * m


def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each row's response tokens (Schulman et al. 2016; PPO for LMs).

    token_rewards (N, T) r_t (PPO's: R at the last response token, minus beta k1_t on every token when the KL
    sits in the reward); values (N, T) V(s_t), the critic's value of the state before token t; mask (N, T) the
    response tokens (one contiguous span per row):

        delta_t = r_t + gamma V(s_{t+1}) - V(s_t),   V after the last token = 0
        A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l},   returns G_t = A_t + V(s_t)

    Returns (A, G), float64, (N, T) each, 0 off the mask. lam = gamma = 1: A_t = sum_{k >= t} r_k - V(s_t);
    lam = 0: A_t = delta_t (oracle O11).
    """
    m = mask.to(torch.float64)
    r, v = token_rewards.to(m.dtype) * m, values.to(m.dtype) * m
    A = torch.zeros_like(m)
    next_v = torch.zeros(m.shape[0], dtype=m.dtype)
    next_a = torch.zeros_like(next_v)
    for t in range(m.shape[1] - 1, -1, -1):  # one vectorised step per position, over every row at once
        on = m[:, t] > 0
        a = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * next_a
        A[:, t] = torch.where(on, a, 0.0)
        next_v = torch.where(on, v[:, t], next_v)
        next_a = torch.where(on, a, next_a)
    return A, (A + v) * m


def advantages(kind: str, rewards: Tensor, group: Tensor, mask: Tensor, *, std_eps: float, threshold: float,
               k1: Tensor | None = None, kl_beta: float = 0.0, baseline: Tensor | None = None) -> Tensor:
    """Token advantages (N, T) of rows with `rewards` (N,) in `group` (N,); `mask` (N, T) their loss tokens.
    `std_eps` (z-score) and `threshold` (indicator) come from the stage; their defaults live in the presets.

    With `k1` (N, T) (= old_logp - ref_logp, detached) and `kl_beta` > 0 the KL penalty sits in the reward:
      sequence kinds:  R_i <- R_i - beta * sum_t k1_it, then A;
      reinforce_pp:    REINFORCE++ with the group-mean baseline (arXiv 2501.03262, the variant for G > 1):
                       a_i = R_i - mean_g R, A_it = a_i - beta * sum_{t' >= t} k1_it', whitened over the batch.
    ReMax (arXiv 2310.10505): A_i = R_i - baseline_i, the reward of the greedy decode of row i's prompt (N,).
    """
    kl_on = k1 is not None and kl_beta > 0
    if kind == "reinforce_pp":
        base = advantage_group_center(rewards, group)  # (N,)
        tok = token_returns(base, k1, mask, kl_beta) if kl_on else base[:, None] * mask
        return global_normalize(tok, mask)
    if kind not in SEQUENCE_ADVANTAGES:
        raise ValueError(f"unknown advantage {kind!r}; choose one of {', '.join(ADVANTAGES)}")
    if kind == "remax":
        if baseline is None:
            raise ValueError("the remax advantage needs each row's baseline, the reward of its prompt's greedy decode")
        rewards = rewards - baseline.to(rewards)
    if kl_on:
        rewards = rewards - kl_beta * (k1 * mask).sum(1).to(rewards)
    fn = SEQUENCE_ADVANTAGES[kind]
    if kind == "group_zscore":
        a = fn(rewards, group, std_eps=std_eps)
    elif kind == "indicator":
        a = fn(rewards, group, threshold=threshold)
    else:
        a = fn(rewards, group)
    return a.to(mask.dtype)[:, None] * mask


# ---- group statistics the mixers and filters read ------------------------------------------------------


def group_success(rewards: Tensor, group: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """(successes (N,), count (N,)) of each row's group: rows with R >= threshold, and valid rows."""
    valid = ~torch.isnan(rewards)
    hit = (torch.nan_to_num(rewards, nan=float("-inf")) >= threshold).to(rewards.dtype)
    return group_sum(hit, group), group_sum(valid.to(rewards.dtype), group)


def mixed_outcome(rewards: Tensor, group: Tensor) -> Tensor:
    """(N,) bool: the row's group has >= 2 valid rewards that are not all equal (DAPO dynamic sampling)."""
    valid = ~torch.isnan(rewards)
    inv, P = _index(group)
    lo = torch.full((P,), float("inf"), dtype=rewards.dtype).scatter_reduce(
        0, inv[valid], rewards[valid], reduce="amin")
    hi = torch.full((P,), float("-inf"), dtype=rewards.dtype).scatter_reduce(
        0, inv[valid], rewards[valid], reduce="amax")
    count = group_sum(valid.to(rewards.dtype), group)
    return (count >= 2) & (hi[inv] > lo[inv])
