"""PPO's value model: a scalar head on its own copy of a backbone, with its own AdamW (DESIGN.md §1: the value
loss of a critic is a regulariser beside the estimator; the values enter the advantage through GAE).

    when the batch is built:  V_old(s_t) = critic(x, y_<t)   (no grad)  ->  A, G = GAE(r, V_old)
    each policy minibatch:    one critic step on the same rows, L_V = value_loss(V, V_old, G) (clipped, token mean)

The critic starts from `critic.model` (a directory or hub id of a causal LM or a sequence-classification model)
or, by default, from the policy at the stage's start under a fresh head. Its weights and optimizer are part of
every checkpoint, so a resumed PPO stage continues with the critic it had.
"""
from __future__ import annotations

import logging

import torch

from ..data.batch import ROLLOUT, Batch
from ..objective.components import value_loss
from ..reward_model import from_policy, token_values

log = logging.getLogger("posttrain")


class Critic:
    def __init__(self, model: torch.nn.Module, cfg, *, lr: float, micro_size: int | None, device):
        self.model, self.cfg, self.micro_size, self.device = model, cfg, micro_size, device
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    @classmethod
    def for_stage(cls, stage, policy, *, pad_id: int, device) -> "Critic":
        """The stage's critic: from `stage.critic.model`, else the policy's backbone, under a fresh head."""
        source = policy
        if stage.critic.model:
            from ..models import load_model

            source = load_model(stage.critic.model, dtype=next(policy.parameters()).dtype, device=str(device))
        model = from_policy(source, pad_id)
        log.info("critic: %s under a fresh value head", stage.critic.model or "the policy at the stage's start")
        return cls(model, stage.critic, lr=stage.critic.lr or stage.optim.lr, micro_size=stage.batch.micro_size,
                   device=device)

    @torch.no_grad()
    def values(self, batch: Batch) -> torch.Tensor:
        """(N, T) V(s_t) of every row, float32 on the CPU."""
        self.model.eval()
        out = torch.zeros_like(batch.loss_mask, dtype=torch.float32)
        for rows in batch.split(self.micro_size or batch.size):
            mb = batch.select(rows).to(self.device)
            v = token_values(self.model, mb.input_ids, mb.attention_mask)
            out[rows, : v.shape[1]] = v.float().cpu()
        return out

    def update(self, batch: Batch) -> dict[str, float]:
        """One optimizer step of the value loss on `batch` (a policy minibatch); returns its metrics."""
        self.model.train()
        own = batch.loss_mask * (batch.stream[:, None] == ROLLOUT)
        tokens = float(own.sum())
        acc = torch.zeros(4, dtype=torch.float64)
        for rows in batch.split(self.micro_size or batch.size):
            mb = batch.select(rows).to(self.device)
            m = (mb.loss_mask * (mb.stream[:, None] == ROLLOUT)).float()
            v = token_values(self.model, mb.input_ids, mb.attention_mask)
            loss, clipped = value_loss(v, mb.values.to(v), mb.returns.to(v), m, clip=self.cfg.clip, tokens=tokens)
            loss.backward()
            with torch.no_grad():
                acc += torch.stack([loss.detach().double().cpu(), clipped.double().cpu(),
                                    (v.detach() * m).sum().double().cpu(),
                                    ((v.detach() - mb.returns.to(v)) ** 2 * m).sum().double().cpu()])
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        if torch.isfinite(grad_norm) and torch.isfinite(acc[0]):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss, clipped, v_sum, sq = acc.tolist()
        n = max(tokens, 1.0)
        return {"value_loss": loss, "value_clipfrac": clipped / n, "value_mean": v_sum / n, "value_mse": sq / n,
                "value_grad_norm": float(grad_norm)}
