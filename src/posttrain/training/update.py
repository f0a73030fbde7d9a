"""One optimizer step over one global batch: micro-batches, the estimator, backward, clip, step.

This is the hot loop. It does forward, backward and step, accumulates diagnostics as tensors, and
syncs once (one `.tolist()`) at the end. Aggregation normalisers (tokens, sequences, per stream) are
counted over the whole global batch first, so splitting it into micro-batches leaves the gradient
unchanged; micro-batches hold whole groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.batch import DEMO, PREFIX, ROLLOUT, STREAMS, Batch
from .world import SINGLE, World
from ..logprobs import logprobs_at, shared_prompts, token_logprobs
from ..objective import mixers
from ..objective.components import soft_target_loss
from ..objective.estimator import ObjectiveTerms, StreamComponents, objective_loss, preference_loss, stream_counts
from ..objective.preference import PREFERENCE_LOSSES, REWARD_MODEL_LOSS, PreferenceSpec, bradley_terry_terms
from ..reward_model import sequence_scores


@dataclass(frozen=True)
class ObjectiveSpec:
    """The resolved components of a stage, as plain values for `objective_loss`."""

    streams: dict  # stream id (DEMO / ROLLOUT / PREFIX) -> StreamComponents
    joint: bool  # one normaliser over all streams (else one per stream)
    kl_beta_loss: float  # beta of a KL term in the loss (0 when the KL sits in the reward)
    kl_estimator: str
    entropy_coef: float
    temperature: float  # logits are scaled like the sampler's (1 for demonstration-only stages)
    with_entropy: bool  # compute per-token entropy (bonus, SRFT's mixer, or logged for RL)
    srft: tuple[float, float] | None = None  # (w_sft, w_rl) when the mixer reads the forward pass's entropy
    preference: PreferenceSpec | None = None  # a preference loss: the advantage from the forward pass
    reward_model: bool = False  # Bradley-Terry on a scalar head's scores (method reward_model), not logp
    soft_targets: float = 0.0  # KD on demonstrations: the teacher's share of each token's target (distill.coef)
    chunk_mb: float | None = None  # MB of fp32 logits per LM-head chunk (batch.logits_chunk_mb); None: all
    share_prompts: bool | None = None  # a group's common prefix once per forward pass (batch.share_prompts)

    @classmethod
    def from_stage(cls, s, *, log_entropy: bool = False) -> "ObjectiveSpec":
        from ..recipe import stage_streams

        rl = s.rewards != []
        ids = {"demo": DEMO, "rollout": ROLLOUT, "prefix": PREFIX}
        streams = {}
        for name, st in stage_streams(s).items():
            max_len = s.data.max_len if name == "demo" else s.rollout.max_new_tokens
            streams[ids[name]] = StreamComponents(
                weight=st.weight, clip=st.clip_level, aggregation=st.aggregation, eps_low=s.clip.eps_low,
                eps_high=s.clip.eps_high, eps_max=s.clip.eps_max, shaping_gamma=s.shaping_gamma, max_len=max_len,
                kl=name == "rollout", tv_delta=s.clip.tv_delta)
        from ..objective.presets import get_preset

        srft = (s.mix.w_sft, s.mix.w_rl) if get_preset(s.method).mixer == "srft" else None
        p = s.preference
        pref = PreferenceSpec(s.advantage.kind, p.beta, p.gamma, p.lam, p.desirable_weight, p.undesirable_weight) \
            if s.advantage.kind in PREFERENCE_LOSSES else None
        soft = (s.distill.coef or 0.0) if get_preset(s.method).data == "demonstrations" else 0.0
        return cls(streams=streams, joint=s.normaliser == "joint", preference=pref, soft_targets=soft,
                   reward_model=s.advantage.kind == REWARD_MODEL_LOSS, chunk_mb=s.batch.logits_chunk_mb,
                   share_prompts=s.batch.share_prompts,
                   kl_beta_loss=s.kl.beta if s.kl.placement == "loss" else 0.0, kl_estimator=s.kl.estimator,
                   entropy_coef=s.entropy.coef, temperature=s.rollout.temperature if rl and pref is None else 1.0,
                   with_entropy=s.entropy.coef > 0 or (log_entropy and rl) or srft is not None, srft=srft)


# Diagnostics accumulated per micro-batch, in this order; then a (pg value, tokens) pair per stream.
STAT_KEYS = ("loss", "kl", "entropy", "clipped", "clip_tokens", "ratio_sum", "ratio_tokens", "tokens",
             "mismatch_sum", "mismatch_tokens", "forward_tokens", "samples", "nll_sum", "nll_tokens",
             "pairs", "pref_correct", "margin_sum", "chosen_reward_sum", "chosen_n", "rejected_reward_sum",
             "rejected_n")
STREAM_KEYS = tuple(f"{k}/{n}" for n in STREAMS for k in ("pg", "tokens"))


def micro_loss(logp, entropy, mb: Batch, spec: ObjectiveSpec, counts: dict):
    """The objective of one micro-batch from its forward pass: the function the oracles call too."""
    if spec.preference is not None:
        return preference_loss(logp, spec=spec.preference, token_stream=mb.token_stream(), mask=mb.loss_mask,
                               group=mb.group, sign=mb.pair_sign, streams=spec.streams, counts=counts,
                               ref_logp=mb.ref_logp, ref_point=mb.ref_point)
    mix = mb.mix.to(logp.dtype)
    if spec.srft is not None:  # SRFT: weights from each row's mean entropy under the current policy (detached)
        m = mb.loss_mask
        row_h = (entropy.detach() * m).sum(1) / m.sum(1).clamp(min=1)
        positive = (mb.advantages * m).sum(1) > 0
        mix = mix * mixers.srft(row_h, mb.stream, positive, w_sft=spec.srft[0], w_rl=spec.srft[1]).to(mix)
    return objective_loss(
        logp, token_stream=mb.token_stream(), mask=mb.loss_mask, advantages=mb.advantages, mix=mix,
        streams=spec.streams, counts=counts, old_logp=mb.old_logp, ref_logp=mb.ref_logp,
        kl_estimator=spec.kl_estimator, kl_beta=spec.kl_beta_loss, entropy=entropy, entropy_coef=spec.entropy_coef)


def batch_counts(batch: Batch, spec: ObjectiveSpec) -> dict:
    """The optimizer step's normalisers over the whole batch: {stream: (tokens, sequences)}, and for a preference
    loss the chosen responses' tokens (ORPO's NLL is a token mean over them)."""
    counts = stream_counts(batch.loss_mask, batch.token_stream(), spec.streams, joint=spec.joint)
    if spec.preference is not None:
        counts["chosen_tokens"] = float((batch.loss_mask * (batch.pair_sign > 0)[:, None]).sum())
    return counts


def sampled_tokens(batch: Batch) -> float:
    """The loss tokens of sampled (rollout) rows: the value loss's normaliser."""
    return float((batch.loss_mask * (batch.stream[:, None] == ROLLOUT)).sum())


def accumulate_gradients(model, batch: Batch, spec: ObjectiveSpec, *, micro_size: int, device,
                         value_head=None, whole: Batch | None = None, passes: int = 0) -> torch.Tensor:
    """Backpropagate the estimator over micro-batches (whole groups) of `batch` into `.grad`; returns summed
    diagnostics (a tensor ordered as STAT_KEYS + STREAM_KEYS, still on the device: no sync here). `value_head`
    (PPO's `SharedCritic`) adds its weighted value loss, read off the same forward pass, to each micro-batch's.
    `whole`: the minibatch `batch` is this rank's share of (default: itself), whose counts normalise the loss.
    `passes`: forward / backward passes to run at least (a sharded model's ranks must run as many as each other:
    the missing ones are passes of weight zero on one row of `whole`)."""
    counts = batch_counts(whole or batch, spec)
    if value_head is not None:
        value_tokens = sampled_tokens(whole or batch)
    acc = torch.zeros(len(STAT_KEYS) + len(STREAM_KEYS), dtype=torch.float64, device=device)
    zero = torch.zeros((), device=device)
    main = ROLLOUT if ROLLOUT in spec.streams else DEMO  # the stream whose entropy is logged
    model.train()
    chunks = batch.split(micro_size)
    for rows in chunks:
        mb = batch.select(rows).to(device)
        # ---- forward / backward -------------------------------------------------------------------
        if spec.reward_model:  # a scalar per row: Bradley-Terry over the pairs, no token log-probs
            scores = sequence_scores(model, mb.input_ids, mb.attention_mask)
            pref = bradley_terry_terms(scores, mb.group, mb.pair_sign, num_pairs=counts[DEMO][1] / 2)
            logp, terms = torch.zeros_like(mb.loss_mask), ObjectiveTerms(pref.value, {}, pref)
        elif spec.soft_targets:  # KD: the (1 - coef) hard NLL through the estimator, plus coef x soft cross-entropy
            logp, at = logprobs_at(model, mb.input_ids, mb.attention_mask, mb.teacher_ids)
            terms = micro_loss(logp, None, mb, spec, counts)  # (logprobs_at computes in >= fp32)
            soft = soft_target_loss(at, mb.teacher_probs.to(at.device), tokens=counts[DEMO][0])
            terms = ObjectiveTerms(terms.loss + spec.soft_targets * soft, terms.streams, None)
        else:
            if value_head is not None:
                value_head.capture = True
            logp, entropy = token_logprobs(model, mb.input_ids, mb.attention_mask, temperature=spec.temperature,
                                           with_entropy=spec.with_entropy, chunk_mb=spec.chunk_mb,
                                           position_ids=mb.position_ids,
                                           **shared_prompts(spec.share_prompts, mb, value_head is None))
            logp = logp.float()  # the estimator's math runs in fp32 even when the model is bf16
            entropy = entropy.float() if entropy is not None else None
            terms = micro_loss(logp, entropy, mb, spec, counts)
            if value_head is not None:
                value_head.capture = False
                terms = ObjectiveTerms(terms.loss + value_head.loss(mb, value_tokens), terms.streams, None)
        terms.loss.backward()
        # -------------------------------------------------------------------------------------------
        with torch.no_grad():
            ts = mb.token_stream()
            own = mb.loss_mask * (ts == ROLLOUT)  # sampled tokens
            clipped_streams = [k for k, c in spec.streams.items() if c.clip != "none"]
            clip_tok = sum((mb.loss_mask * (ts == k)).sum() for k in clipped_streams) if clipped_streams else zero
            t = terms.streams
            mism = ((logp.detach() - mb.sampler_logp).abs() * own).sum() if mb.sampler_logp is not None else zero
            parts = [terms.loss.detach(),
                     sum((x.kl for x in t.values()), zero),
                     t[main].entropy if main in t else zero,
                     sum((x.clipped_tokens for x in t.values()), zero), clip_tok,
                     t[ROLLOUT].ratio_sum if ROLLOUT in t else zero, own.sum(), mb.loss_mask.sum(), mism,
                     own.sum() if mb.sampler_logp is not None else zero, mb.attention_mask.sum(),
                     (mb.loss_mask.sum(1) > 0).sum()]
            demo = mb.loss_mask * (ts == DEMO)  # demonstration tokens: their NLL compares across SFT-like methods
            if spec.preference is None and not spec.reward_model:  # (a preference stage logs its margins instead)
                parts += [-(logp.detach() * demo).sum(), demo.sum()]
            else:
                parts += [zero, zero]
            pref = terms.preference
            if pref is not None:
                parts += [len(pref.margin), (pref.margin > 0).sum(), pref.margin.sum(), pref.chosen_reward.sum(),
                          len(pref.chosen_reward), pref.rejected_reward.sum(), len(pref.rejected_reward)]
            else:
                parts += [zero] * 7
            for k in range(len(STREAMS)):
                parts += [t[k].pg_value if k in t else zero, (mb.loss_mask * (ts == k)).sum()]
            acc += torch.stack([torch.as_tensor(p, device=device).reshape(()) for p in parts]).to(acc)
    for _ in range(passes - len(chunks)):  # zero-weight passes: the gradient is unchanged
        mb = (whole or batch).select([0]).to(device)
        if spec.reward_model:
            zero_loss = sequence_scores(model, mb.input_ids, mb.attention_mask).sum() * 0.0
        else:
            zero_loss = token_logprobs(model, mb.input_ids, mb.attention_mask, chunk_mb=spec.chunk_mb)[0].sum() * 0.0
        zero_loss.backward()
    return acc


def optimizer_step(model, optimizer, scheduler, batch: Batch, spec: ObjectiveSpec, *, micro_size: int,
                   max_grad_norm: float | None, device, value_head=None, world: World = SINGLE) -> dict[str, float]:
    """Accumulate the estimator's gradient over micro-batches of `batch`, then take one optimizer step. Under
    several ranks each backpropagates its share of `batch` (whole groups) normalised by the counts of all of it,
    and the gradients and diagnostics are summed over ranks before the step: the one-process step."""
    mine = batch if world.size == 1 else batch.select(batch.share(world.rank, world.size))
    # every rank of a sharded model runs as many passes as the busiest (FSDP's gathers and reductions pair up)
    passes = world.max_(len(mine.split(micro_size))) if world.sharded else 0
    acc = accumulate_gradients(model, mine, spec, micro_size=micro_size, device=device, value_head=value_head,
                               whole=batch, passes=passes)
    params = [p for p in model.parameters() if p.requires_grad]
    if not world.sharded:  # (FSDP summed the gradients in its backward)
        world.sum_grads(params)
    world.sum_(acc)
    if max_grad_norm is not None or world.sharded:  # (the norm of sharded gradients is a collective)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else math.inf)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    lr = optimizer.param_groups[0]["lr"]
    # The one sync of the step, before the optimizer: a NaN/inf loss or gradient must not reach the weights
    # or Adam's moments, so such a step is skipped (the schedule still advances with the step count).
    values = torch.cat([acc, grad_norm.detach().reshape(1).to(acc)]).tolist()
    stats = dict(zip(STAT_KEYS + STREAM_KEYS + ("grad_norm",), values))
    finite = math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])
    if finite:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    record = step_record(stats, spec, lr, has_sampler=batch.sampler_logp is not None)
    if not finite:
        record["nonfinite"] = 1
    return record


def step_record(stats: dict, spec: ObjectiveSpec, lr: float, *, has_sampler: bool) -> dict[str, float]:
    """The metrics of one optimizer step from the summed diagnostics."""
    pg = sum(stats[f"pg/{n}"] for n in STREAMS)
    out = {"loss": stats["loss"], "pg_loss": pg, "lr": lr, "grad_norm": stats["grad_norm"],
           # compute of this update: sequences and loss tokens trained on, tokens forwarded with gradients
           "samples": int(stats["samples"]), "trained_tokens": int(stats["tokens"]),
           "forward_tokens": int(stats["forward_tokens"])}
    if stats["clip_tokens"]:
        out["clipfrac"] = stats["clipped"] / stats["clip_tokens"]
    if stats["ratio_tokens"] and any(c.weight != "one" or c.clip != "none" for c in spec.streams.values()):
        out["ratio_mean"] = stats["ratio_sum"] / stats["ratio_tokens"]
    if stats["nll_tokens"]:  # mean NLL of the demonstration tokens, whatever the method's own objective (DFT's)
        out["nll"] = stats["nll_sum"] / stats["nll_tokens"]
    if stats["pairs"]:  # preference: the share of pairs ranked right, the mean margin and implicit rewards
        n = stats["pairs"]
        out.update(pref_accuracy=stats["pref_correct"] / n, margin=stats["margin_sum"] / n)
        if stats["chosen_n"]:
            out["reward_chosen"] = stats["chosen_reward_sum"] / stats["chosen_n"]
        if stats["rejected_n"]:
            out["reward_rejected"] = stats["rejected_reward_sum"] / stats["rejected_n"]
    if spec.kl_beta_loss:
        out["kl"] = stats["kl"]
    if spec.with_entropy:
        out["entropy"] = stats["entropy"]
    if has_sampler and stats["mismatch_tokens"]:
        out["sampler_mismatch"] = stats["mismatch_sum"] / stats["mismatch_tokens"]
    if len(spec.streams) > 1:
        tokens = max(stats["tokens"], 1.0)
        for k, n in enumerate(STREAMS):
            if k in spec.streams:
                out[f"loss/{n}"] = stats[f"pg/{n}"]
        out["demo_token_share"] = (stats["tokens/demo"] + stats["tokens/prefix"]) / tokens
    return out
