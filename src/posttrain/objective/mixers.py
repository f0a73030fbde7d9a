"""The mixer: the `mix` term of the estimator, each row's weight by stream, over time and per question.

    loss = - sum_{i,t} W_it * mix_i * M_it * A_it * w_it * logp_it

Pure functions of tensors and the step; the trainer (`training/experience.py`, `training/update.py`) and
the oracles call the same functions. Row streams are `DEMO` (0) and `ROLLOUT` (1) as in `data/batch.py`;
the constants are repeated here so the math imports nothing from the data layer.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

DEMO, ROLLOUT = 0, 1


def stream_weights(stream: Tensor, demo: float, rollout: float) -> Tensor:
    """(N,) float: `demo` on demonstration rows, `rollout` on rollout rows."""
    return torch.where(stream == DEMO, torch.full(stream.shape, float(demo)), torch.full(stream.shape, float(rollout)))


def cosine_schedule(step: int, *, start: float, end: float, warmup: int, decay: int) -> float:
    """Linear warm-up 0 -> start over `warmup` steps, cosine start -> end over the next `decay` steps, then `end`.

    CHORD's mu(t) (algorithms.md §4.4, O18): mu(0) = 0 if warmup > 0 else start; mu(W + D/2) = (start + end)/2;
    mu(t >= W + D) = end. `step` counts the optimizer steps taken before this batch (0 for the first).
    """
    if warmup and step < warmup:
        return start * step / warmup
    t = step - warmup
    if decay <= 0 or t >= decay:
        return end
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t / decay))


def chord(stream: Tensor, mu: float) -> Tensor:
    """CHORD: L = (1 - mu) L_RL + mu L_SFT  ->  mix = 1 - mu on rollout rows, mu on demonstration rows."""
    return stream_weights(stream, demo=mu, rollout=1.0 - mu)


def hpt_gate(successes: Tensor, count: Tensor, stream: Tensor, *, gamma: float, sft_coef: float
             ) -> tuple[Tensor, Tensor]:
    """HPT's switch (arXiv 2509.04419): a question with k of n rollouts correct is trained with SFT on its
    demonstration iff k / n <= gamma, else with RL on its rollouts. gamma < 0 never switches (pure RL);
    gamma = 0 switches only the all-wrong questions (SuperRL). A question whose rewards all failed (n = 0)
    carries no evidence and is never switched.

    successes, count, stream (N,) per row (the row's question's k and n) -> (mix (N,), switched (N,) bool):
    mix = 1{not switched} on rollout rows, sft_coef * 1{switched} on demonstration rows.
    """
    acc = successes / count.clamp(min=1)
    switched = (acc <= gamma) & (count > 0)
    mix = torch.where(stream == ROLLOUT, (~switched).to(acc.dtype), switched.to(acc.dtype) * sft_coef)
    return mix, switched


def hpt_soft(successes: Tensor, count: Tensor, stream: Tensor, *, table: tuple[tuple[float, float, float], ...]
             ) -> Tensor:
    """HPT's soft mode: rows (max_accuracy, rl_weight, sft_weight), the first row whose max_accuracy >= k / n
    gives the question's weights (rl on its rollouts, sft on its demonstration). (N,) -> mix (N,)."""
    acc = (successes / count.clamp(min=1)).tolist()
    rl, sft = [], []
    for a in acc:
        row = next((r for r in table if a <= r[0] + 1e-12), table[-1])
        rl.append(row[1])
        sft.append(row[2])
    rl_t = torch.tensor(rl, dtype=successes.dtype)
    sft_t = torch.tensor(sft, dtype=successes.dtype)
    return torch.where(stream == ROLLOUT, rl_t, sft_t)


def srft(row_entropy: Tensor, stream: Tensor, positive: Tensor, *, w_sft: float, w_rl: float) -> Tensor:
    """SRFT's entropy-aware weights (arXiv 2506.19767), from the current policy's mean token entropy H_i of
    each row (detached, same forward pass): demonstration rows w_sft * exp(-H_i) (less SFT where the policy
    is unsure), rollout rows with a positive advantage w_rl * exp(H_i), other rollout rows 1. (N,) -> (N,)."""
    demo = w_sft * torch.exp(-row_entropy)
    pos = w_rl * torch.exp(row_entropy)
    ones = torch.ones_like(row_entropy)
    return torch.where(stream == DEMO, demo, torch.where(positive, pos, ones))
