"""PPO's value model: a scalar head on its own copy of a backbone, with its own AdamW (DESIGN.md §1: the value
loss of a critic is a regulariser beside the estimator; the values enter the advantage through GAE).

    when the batch is built:  V_old(s_t) = critic(x, y_<t)   (no grad)  ->  A, G = GAE(r, V_old)
    each policy minibatch:    one critic step on the same rows, L_V = value_loss(V, V_old, G) (clipped, token mean)

The critic starts from `critic.model` (a directory or hub id of a causal LM or a sequence-classification model)
or, by default, from the policy at the stage's start under a fresh head. Its weights and optimizer are part of
every checkpoint, so a resumed PPO stage continues with the critic it had.

`critic.shared` puts the value head on the policy's own backbone instead (`SharedCritic`, as TRL's old
`AutoModelForCausalLMWithValueHead`): the policy's forward pass gives both log-probs and values, and the step
minimises L_pg + coef L_V, so the value loss shapes the shared backbone too; the head has its own AdamW and
gradient clipping, the backbone steps with the policy's optimizer.
"""
from __future__ import annotations

import logging

import torch

from ..data.batch import ROLLOUT, Batch
from .loop import adamw
from .world import SINGLE, World, gathered
from ..logprobs import position_ids_from_mask
from ..objective.components import value_loss
from ..reward_model import from_policy, token_values, values_at_tokens

log = logging.getLogger("posttrain")


def _value_loss_stats(v: torch.Tensor, mb: Batch, mask: torch.Tensor, *, clip, tokens: float):
    """(L_V, its diagnostics: loss, clipped tokens, sum V, sum (V - G)^2, as a float64 CPU tensor) of a
    micro-batch's values `v` on the sampled tokens `mask`."""
    loss, clipped = value_loss(v, mb.values.to(v), mb.returns.to(v), mask, clip=clip, tokens=tokens)
    with torch.no_grad():
        stats = torch.stack([loss.detach().double().cpu(), clipped.double().cpu(),
                             (v.detach() * mask).sum().double().cpu(),
                             ((v.detach() - mb.returns.to(v)) ** 2 * mask).sum().double().cpu()])
    return loss, stats


def _value_record(stats: torch.Tensor, tokens: float, grad_norm) -> dict[str, float]:
    loss, clipped, v_sum, sq = stats.tolist()
    n = max(tokens, 1.0)
    return {"value_loss": loss, "value_clipfrac": clipped / n, "value_mean": v_sum / n, "value_mse": sq / n,
            "value_grad_norm": float(grad_norm)}


def _sampled(batch: Batch) -> torch.Tensor:
    """(N, T) 1 on the sampled (rollout) tokens that take the loss: where values are learned."""
    return (batch.loss_mask * (batch.stream[:, None] == ROLLOUT)).float()


class Critic:
    def __init__(self, model: torch.nn.Module, cfg, *, lr: float, micro_size: int | None, device):
        self.model, self.cfg, self.micro_size, self.device = model, cfg, micro_size, device
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = adamw(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    shared = False  # a copy of its own, stepped by `update`

    @classmethod
    def for_stage(cls, stage, policy, *, pad_id: int, device) -> "Critic | SharedCritic":
        """The stage's critic: from `stage.critic.model`, else the policy's backbone, under a fresh head; with
        `critic.shared` a value head on the policy's backbone itself."""
        if stage.critic.shared:
            log.info("critic: a value head on the policy's backbone (value loss weight %g)", stage.critic.coef)
            return SharedCritic(policy, stage.critic, lr=stage.critic.lr or stage.optim.lr,
                                micro_size=stage.batch.micro_size, device=device)
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

    def update(self, batch: Batch, world: World = SINGLE) -> dict[str, float]:
        """One optimizer step of the value loss on `batch` (a policy minibatch); returns its metrics. Under several
        ranks each takes its share of the rows and the gradients and sums are summed over ranks."""
        self.model.train()
        tokens = float(_sampled(batch).sum())
        acc = torch.zeros(4, dtype=torch.float64)
        mine = batch if world.size == 1 else batch.select(batch.share(world.rank, world.size))
        for rows in mine.split(self.micro_size or max(mine.size, 1)):
            mb = mine.select(rows).to(self.device)
            v = token_values(self.model, mb.input_ids, mb.attention_mask)
            loss, stats = _value_loss_stats(v, mb, _sampled(mb), clip=self.cfg.clip, tokens=tokens)
            loss.backward()
            acc += stats
        params = [p for p in self.model.parameters() if p.requires_grad]
        world.sum_grads(params)
        world.sum_(acc)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        if torch.isfinite(grad_norm) and torch.isfinite(acc[0]):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return _value_record(acc, tokens, grad_norm)


class ValueHead(torch.nn.Module):
    """A scalar head read off a backbone's last hidden state: the shared critic's only weights of its own."""

    def __init__(self, hidden_size: int, *, std: float, dtype, device):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1, bias=False, dtype=dtype, device=device)
        torch.nn.init.normal_(self.score.weight, std=std)  # as transformers initialises a classification head

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D) -> (B, T) V(s_t) aligned with the tokens like `reward_model.token_values`."""
        return values_at_tokens(self.score, hidden, attention_mask)


class SharedCritic:
    """PPO's values from a head on the policy's own backbone (`critic.shared`).

        when the batch is built:  V_old(s_t) = head(h_t) of the policy's no-grad pass
        each policy minibatch:    L = L_pg + coef L_V in the policy's one forward / backward (the hidden states
                                  are kept by a hook on the decoder while `capture` is on), then the head's step
    """

    shared = True

    def __init__(self, policy: torch.nn.Module, cfg, *, lr: float, micro_size: int | None, device):
        self.policy, self.cfg, self.micro_size, self.device = policy, cfg, micro_size, device
        text = policy.config.get_text_config()
        param = next(policy.parameters())
        self.model = ValueHead(text.hidden_size, std=getattr(text, "initializer_range", 0.02), dtype=param.dtype,
                               device=param.device)
        self.optimizer = adamw(self.model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        self.capture, self._hidden = False, None
        self._stats = torch.zeros(4, dtype=torch.float64)
        policy.get_decoder().register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        if self.capture:
            self._hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    @torch.no_grad()
    def values(self, batch: Batch) -> torch.Tensor:
        """(N, T) V(s_t) of every row from the policy's backbone, float32 on the CPU."""
        was = self.policy.training
        self.policy.eval()
        out = torch.zeros_like(batch.loss_mask, dtype=torch.float32)
        with gathered(self.policy):  # (the decoder is called alone: a sharded policy's weights gathered first)
            for rows in batch.split(self.micro_size or batch.size):
                mb = batch.select(rows).to(self.device)
                h = self.policy.get_decoder()(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                              use_cache=False, position_ids=position_ids_from_mask(mb.attention_mask))
                v = self.model(h.last_hidden_state, mb.attention_mask)
                out[rows, : v.shape[1]] = v.float().cpu()
        self.policy.train(was)
        return out

    def loss(self, mb: Batch, tokens: float) -> torch.Tensor:
        """coef L_V of a micro-batch from the hidden states of the policy's forward pass just run (differentiable
        through the head and the backbone); `tokens` the minibatch's sampled tokens, L_V's normaliser."""
        if self._hidden is None:
            raise RuntimeError("the shared value head saw no forward pass of the policy (capture was off)")
        h, self._hidden = self._hidden, None
        loss, stats = _value_loss_stats(self.model(h, mb.attention_mask), mb, _sampled(mb), clip=self.cfg.clip,
                                        tokens=tokens)
        self._stats += stats
        return self.cfg.coef * loss

    def update(self, batch: Batch, world: World = SINGLE) -> dict[str, float]:
        """The head's optimizer step on the gradient the policy's step left on it (summed over ranks); returns the
        value metrics."""
        params = list(self.model.parameters())
        world.sum_grads(params)
        world.sum_(self._stats)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        if torch.isfinite(grad_norm) and torch.isfinite(self._stats[0]):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        record = _value_record(self._stats, float(_sampled(batch).sum()), grad_norm)
        self._stats.zero_()
        return record
