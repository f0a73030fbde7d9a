"""From a step's scored rows to the batch the update reads: collation, each token's advantage (group statistics,
GAE, the teacher term) and the correction for a sampler that is not the trainer. Pure functions of the rows and
the stage; the experience builder (training/experience.py) and the oracles both call them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..data.batch import DEMO, PREFIX, ROLLOUT, Batch, Row, collate
from ..objective import advantages as adv_fns
from ..objective.advantages import advantages
from ..objective.components import sampler_correction
from ..recipe import stage_streams

STREAM_IDS = {"demo": DEMO, "rollout": ROLLOUT, "prefix": PREFIX}


@dataclass
class StepData:
    """What `Experience.make` returns: the batch (None when nothing is left to learn from), the step's
    experience metrics, and the reward errors to report."""

    batch: Batch | None
    values: dict[str, float] = field(default_factory=dict)
    errors: list = field(default_factory=list)


@dataclass
class _Rows:
    """Rows of one sampling round with their rewards; `scored` rows enter their group's statistics."""

    rows: list[Row] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    scored: list[bool] = field(default_factory=list)
    free: list[bool] = field(default_factory=list)  # free rollouts: the policy's own samples (metrics)
    per_fn: dict[str, list[float]] = field(default_factory=dict)
    errors: list = field(default_factory=list)

    def extend(self, other: "_Rows", keep: list[bool] | None = None) -> None:
        keep = keep or [True] * len(other.rows)
        for i, k in enumerate(keep):
            if k:
                self.rows.append(other.rows[i])
                self.rewards.append(other.rewards[i])
                self.scored.append(other.scored[i])
                self.free.append(other.free[i])
        for name, v in other.per_fn.items():
            self.per_fn.setdefault(name, []).extend(x for x, k in zip(v, keep) if k)
        self.errors.extend(other.errors)

    def add(self, row: Row, *, reward: float = math.nan, scored: bool = False) -> None:
        self.rows.append(row)
        self.rewards.append(reward)
        self.scored.append(scored)
        self.free.append(False)
        for v in self.per_fn.values():
            v.append(math.nan)


def rows_to_batch(rows: list[Row], rewards: list[float], scored: list[bool], mix: torch.Tensor, pad_id: int,
                  dtype: torch.dtype = torch.float32) -> Batch:
    """Collate rows; a scored row whose reward failed (or was masked) stays in the batch with no loss token."""
    for row, r, sc in zip(rows, rewards, scored):
        if sc and math.isnan(r):
            row.valid = False
    batch = collate(rows, pad_id, dtype)
    batch.mix = mix.to(dtype)
    return batch


def row_baselines(rows: list[Row]) -> torch.Tensor:
    """(N,) each row's ReMax baseline, the reward of its prompt's greedy decode (NaN where there is none)."""
    return torch.tensor([r.meta.get("baseline", math.nan) for r in rows], dtype=torch.float64)


def correct_for_sampler(batch: Batch, level: str, cap: float) -> dict:
    """Multiply the advantages of sampled tokens by the truncated importance weights min(q / mu, C) of the
    trainer's policy q (`old_logp`) over the sampler's mu (`sampler_logp`); copied prefix tokens were not
    sampled and keep theirs. Returns the mean weight and the share of sampled tokens truncated, to log."""
    own = batch.loss_mask * (batch.token_stream() == ROLLOUT)
    w = sampler_correction(batch.old_logp, batch.sampler_logp, own, level=level, cap=cap)
    batch.advantages = batch.advantages * w
    n = own.sum().clamp(min=1)
    return {"is_weight": float((w * own).sum() / n), "is_truncated": float(((w >= cap * (1 - 1e-6)) * own).sum() / n)}


def token_advantages(batch: Batch, rewards: torch.Tensor, stage, baseline: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, float | None]:
    """(A (N, T), mean k1 or None) of a batch whose rows have `rewards` (N,) (NaN: outside the group statistics).

    Tokens of streams whose advantage is "group" get the stage's advantage over their row's group (with the
    k1 penalty in the reward when the stage puts its KL there, k1 = old_logp - ref_logp on rollout tokens);
    tokens of "one" streams (a demonstration's SFT term) get A = 1. The trainer and the oracles call this.
    GAE (PPO) reads the critic's `batch.values` and sets `batch.returns`, the critic's targets.
    On-policy distillation adds coef * (log pi_T - log q) on every sampled token (q = old_logp, the policy
    that sampled them): minimising -A log pi then follows the reverse KL to the teacher, KL(pi || pi_T).
    """
    ts = batch.token_stream()
    group_tokens = torch.zeros_like(batch.loss_mask)
    for name, c in stage_streams(stage).items():
        if c.advantage == "group":
            group_tokens += batch.loss_mask * (ts == STREAM_IDS[name])
    k1, kl = None, None
    kl_reward = bool(stage.kl.beta) and stage.kl.placement == "reward"
    if kl_reward:
        own = batch.loss_mask * (ts == ROLLOUT)
        k1 = (batch.old_logp - batch.ref_logp) * own  # (N, T) detached, q in place of p
        kl = float(k1.sum() / own.sum().clamp(min=1))
    if stage.advantage.kind == "gae":  # PPO: per-token rewards (R at the end, -beta k1 each token) and the critic
        adv = stage.advantage
        r = adv_fns.terminal_rewards(torch.nan_to_num(rewards, nan=0.0), group_tokens)
        if kl_reward:
            r = r - stage.kl.beta * k1.to(r)
        A, batch.returns = adv_fns.gae(r, batch.values, group_tokens, gamma=adv.gamma, lam=adv.lam)
        A = adv_fns.global_normalize(A, group_tokens).to(batch.loss_mask) if adv.whiten else A.to(batch.loss_mask)
        batch.returns = batch.returns.to(batch.loss_mask)
    else:
        A = advantages(stage.advantage.kind, rewards, batch.group, group_tokens, std_eps=stage.advantage.std_eps,
                       threshold=stage.success_threshold, k1=k1, kl_beta=stage.kl.beta if kl_reward else 0.0,
                       baseline=baseline)
    A = A + (batch.loss_mask - group_tokens)
    if stage.distill.coef:
        own = batch.loss_mask * (ts == ROLLOUT)
        A = A + stage.distill.coef * (batch.teacher_logp - batch.old_logp).to(A) * own
    return A, kl
