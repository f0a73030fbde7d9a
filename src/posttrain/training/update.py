"""One optimizer step over one global batch: micro-batches, the estimator, backward, clip, step.

This is the hot loop. It does forward, backward and step, accumulates diagnostics as tensors, and
syncs once (one `.tolist()`) at the end. Aggregation normalisers (tokens, sequences) are counted over
the whole global batch first, so splitting it into micro-batches leaves the gradient unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..objective.components import aggregation_weights
from ..objective.estimator import estimator_loss
from .experience import Batch
from .logprobs import token_logprobs


@dataclass(frozen=True)
class ObjectiveSpec:
    """The resolved components of a stage, as plain values for `estimator_loss`."""

    weight: str
    clip: str
    aggregation: str
    eps_low: float
    eps_high: float
    eps_max: float
    gamma: float
    kl_beta_loss: float  # beta of a KL term in the loss (0 when the KL sits in the reward)
    kl_estimator: str
    entropy_coef: float
    max_len: int  # L_max of CONST aggregation
    temperature: float  # logits are scaled like the sampler's (1 for demonstrations)
    with_entropy: bool  # compute per-token entropy (bonus, or logged for RL)

    @classmethod
    def from_stage(cls, s, *, max_len: int, temperature: float, log_entropy: bool = False) -> "ObjectiveSpec":
        return cls(
            weight=s.weight, clip=s.clip_level, aggregation=s.aggregation, eps_low=s.clip.eps_low,
            eps_high=s.clip.eps_high, eps_max=s.clip.eps_max, gamma=0.1,
            kl_beta_loss=s.kl.beta if s.kl.placement == "loss" else 0.0, kl_estimator=s.kl.estimator,
            entropy_coef=s.entropy.coef, max_len=max_len, temperature=temperature,
            with_entropy=s.entropy.coef > 0 or log_entropy,
        )


STAT_KEYS = ("loss", "pg_loss", "kl", "entropy", "clipped", "ratio_sum", "tokens", "mismatch_sum")


def accumulate_gradients(model, batch: Batch, spec: ObjectiveSpec, *, micro_size: int, device) -> torch.Tensor:
    """Backpropagate the estimator over micro-batches of `batch` into `.grad`; returns summed diagnostics
    (a tensor ordered as STAT_KEYS, still on the device: no sync here)."""
    num_tokens = float(batch.loss_mask.sum())
    num_seqs = float((batch.loss_mask.sum(1) > 0).sum())
    acc = torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=device)
    model.train()
    for start in range(0, batch.size, micro_size):
        mb = batch.select(slice(start, start + micro_size)).to(device)
        # ---- forward / backward -------------------------------------------------------------------
        logp, entropy = token_logprobs(model, mb.input_ids, mb.attention_mask, temperature=spec.temperature,
                                       with_entropy=spec.with_entropy)
        logp = logp.float()  # the estimator's math runs in fp32 even when the model is bf16
        W = aggregation_weights(mb.loss_mask, spec.aggregation, num_tokens=num_tokens, num_seqs=num_seqs,
                                max_len=spec.max_len)
        terms = estimator_loss(
            logp, advantages=mb.advantages, mask=mb.loss_mask, agg_weights=W, old_logp=mb.old_logp,
            weight=spec.weight, clip=spec.clip, eps_low=spec.eps_low, eps_high=spec.eps_high,
            eps_max=spec.eps_max, gamma=spec.gamma, ref_logp=mb.ref_logp, kl_estimator=spec.kl_estimator,
            kl_beta=spec.kl_beta_loss, entropy=entropy, entropy_coef=spec.entropy_coef,
        )
        terms.loss.backward()
        # -------------------------------------------------------------------------------------------
        with torch.no_grad():
            mism = ((logp.detach() - mb.sampler_logp).abs() * mb.loss_mask).sum() if mb.sampler_logp is not None \
                else torch.zeros((), device=device)
            acc += torch.stack([terms.loss.detach(), terms.pg_value, terms.kl, terms.entropy, terms.clipped_tokens,
                                terms.ratio_sum, mb.loss_mask.sum(), mism]).to(acc)
    return acc


def optimizer_step(model, optimizer, scheduler, batch: Batch, spec: ObjectiveSpec, *, micro_size: int,
                   max_grad_norm: float | None, device) -> dict[str, float]:
    """Accumulate the estimator's gradient over micro-batches of `batch`, then take one optimizer step."""
    acc = accumulate_gradients(model, batch, spec, micro_size=micro_size, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    if max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    values = torch.cat([acc, grad_norm.detach().reshape(1).to(acc)]).tolist()  # the one sync of the step
    stats = dict(zip(STAT_KEYS + ("grad_norm",), values))
    tokens = max(stats.pop("tokens"), 1.0)
    out = {"loss": stats["loss"], "pg_loss": stats["pg_loss"], "lr": lr, "grad_norm": stats["grad_norm"]}
    if spec.clip != "none" or spec.weight != "one":
        out.update(clipfrac=stats["clipped"] / tokens, ratio_mean=stats["ratio_sum"] / tokens)
    if spec.kl_beta_loss:
        out["kl"] = stats["kl"]
    if spec.with_entropy:
        out["entropy"] = stats["entropy"]
    if batch.sampler_logp is not None:
        out["sampler_mismatch"] = stats["mismatch_sum"] / tokens
    return out
