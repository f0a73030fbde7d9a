"""On-policy experience: sample G completions per prompt, score them, compute advantages -> Batch.

Order of operations for one rollout batch (algorithms.md §3, §4.2):
  sample -> rewards (errors masked) -> + soft overlong penalty -> dynamic-sampling filter (refill rounds)
  -> [k1 in the reward: R -= beta * sum_t (log q - log b)] -> advantages -> Batch (+ old_logp, ref_logp).
The sampler's ids are used as they are: text is decoded only for the reward functions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..data.encode import completion_text, encode_prompt
from ..objective.components import (SEQUENCE_ADVANTAGES, global_normalize, overlong_penalty, token_returns)
from ..rollout.sampler import sample
from .experience import Batch, rollout_batch
from .logprobs import token_logprobs


@dataclass
class RolloutStats:
    values: dict[str, float] = field(default_factory=dict)
    errors: list = field(default_factory=list)


class RolloutMaker:
    """Builds one RL batch per call. Holds no model: the policy is passed in, the reference is optional."""

    def __init__(self, stage, tokenizer, scorer, *, stop_ids, pad_id, device, ref_model=None):
        self.s = stage
        self.tok = tokenizer
        self.scorer = scorer
        self.stop_ids = list(stop_ids)
        self.pad_id = pad_id
        self.device = device
        self.ref_model = ref_model
        self._prompt_cache: dict[int, list[int]] = {}

    def _prompt_ids(self, row_key: int, prompt) -> list[int]:
        if row_key not in self._prompt_cache:
            self._prompt_cache[row_key] = encode_prompt(prompt, self.tok)
        return self._prompt_cache[row_key]

    def _sample_and_score(self, model, rows, keys, generator):
        s = self.s
        G = s.rollout.group_size
        prompt_ids = [self._prompt_ids(k, r["prompt"]) for k, r in zip(keys, rows)]
        t0 = time.perf_counter()
        ro = sample(model, prompt_ids, num_samples=G, max_new_tokens=s.rollout.max_new_tokens,
                    temperature=s.rollout.temperature, top_p=s.rollout.top_p, stop_ids=self.stop_ids,
                    pad_id=self.pad_id, generator=generator)
        t1 = time.perf_counter()
        exp_rows = [rows[i] for i in ro.prompt_index]
        prompts = [r["prompt"] for r in exp_rows]
        completions = [completion_text(p, c, self.tok) for p, c in zip(prompts, ro.completion_ids)]
        columns = {k: [r.get(k) for r in exp_rows] for k in exp_rows[0] if k != "prompt"}
        row_ids = [r.get("id", keys[i]) for r, i in zip(exp_rows, ro.prompt_index)]
        scored = self.scorer(prompts, completions, columns=columns, completion_ids=ro.completion_ids, row_ids=row_ids)
        t2 = time.perf_counter()
        return ro, scored, t1 - t0, t2 - t1

    def make(self, model, rows: list[dict], keys: list[int], generator, refill) -> tuple[Batch, RolloutStats]:
        """rows/keys: the step's prompts; refill() -> (rows, keys) more prompts for dynamic sampling."""
        s = self.s
        G = s.rollout.group_size
        P = len(rows)
        stats = RolloutStats()
        parts, t_gen, t_rew, rounds = [], 0.0, 0.0, 0
        kept_groups = 0
        while True:
            ro, scored, tg, tr = self._sample_and_score(model, rows, keys, generator)
            t_gen, t_rew, rounds = t_gen + tg, t_rew + tr, rounds + 1
            R = scored.total.clone()  # (N,) float64, NaN where a reward failed
            lengths = torch.tensor([len(c) for c in ro.completion_ids])
            if s.overlong.soft_penalty:
                R = R + overlong_penalty(lengths, s.rollout.max_new_tokens, s.overlong.cache)
            keep = torch.ones(len(rows), dtype=torch.bool)
            if s.dynamic_sampling.enabled:
                g = R.view(-1, G)
                valid = ~torch.isnan(g)
                lo = torch.where(valid, g, torch.full_like(g, float("inf"))).min(1).values
                hi = torch.where(valid, g, torch.full_like(g, float("-inf"))).max(1).values
                keep = (valid.sum(1) >= 2) & (hi > lo)  # mixed outcome: some signal in the group
                room = P - kept_groups
                keep &= keep.cumsum(0) <= room
            parts.append((ro, scored, R, keep))
            kept_groups += int(keep.sum())
            if not s.dynamic_sampling.enabled or kept_groups >= P or rounds > s.dynamic_sampling.max_rounds:
                break
            rows, keys = refill(P - kept_groups)
        stats.values.update(t_rollout=t_gen, t_reward=t_rew)
        if s.dynamic_sampling.enabled:
            stats.values.update(fill_ratio=kept_groups / P, sample_rounds=rounds)
        return self._assemble(model, parts, stats)

    def _assemble(self, model, parts, stats: RolloutStats) -> tuple[Batch, RolloutStats]:
        s = self.s
        G = s.rollout.group_size
        prompt_ids, comp_ids, slp, R_all, trunc = [], [], [], [], []
        per_fn: dict[str, list] = {}
        for ro, scored, R, keep in parts:
            stats.errors.extend(scored.errors)
            for name, v in scored.per_fn.items():
                per_fn.setdefault(name, []).append(v)
            keep_tok = keep.repeat_interleave(G)
            for i in torch.nonzero(keep_tok).flatten().tolist():
                prompt_ids.append(ro.prompt_ids[i])
                comp_ids.append(ro.completion_ids[i])
                slp.append(ro.sampler_logp[i])
                trunc.append(ro.truncated[i])
            R_all.append(R[keep_tok])
        R = torch.cat(R_all) if R_all else torch.zeros(0, dtype=torch.float64)
        valid = ~torch.isnan(R)
        if s.overlong.mask_truncated:  # DAPO overlong filtering: no gradient, and out of the group statistics
            valid &= ~torch.tensor(trunc, dtype=torch.bool)
        all_R = torch.cat([p[2] for p in parts])
        lengths = torch.tensor([len(c) for p in parts for c in p[0].completion_ids], dtype=torch.float64)
        stats.values.update(
            reward_mean=float(torch.nanmean(all_R)) if (~torch.isnan(all_R)).any() else float("nan"),
            reward_std=float(all_R[~torch.isnan(all_R)].std()) if (~torch.isnan(all_R)).sum() > 1 else 0.0,
            response_len=float(lengths.mean()),
            truncated_frac=float(torch.tensor([t for p in parts for t in p[0].truncated], dtype=torch.float).mean()),
            reward_errors=len(stats.errors),
        )
        first = next(iter(per_fn), None)
        for name, vs in per_fn.items():
            v = torch.cat(vs)
            ok = ~torch.isnan(v)
            stats.values[f"reward/{name}"] = float(v[ok].mean()) if ok.any() else float("nan")
            if name == first:
                stats.values["accuracy"] = stats.values[f"reward/{name}"]
        if not comp_ids:  # every group filtered: an empty batch (the loop skips the update and logs it)
            return None, stats
        batch = rollout_batch(prompt_ids, comp_ids, torch.zeros(len(comp_ids)), valid, self.pad_id, slp)
        needs_old = s.ppo_epochs * s.minibatches > 1 or (s.kl.beta and s.kl.placement == "reward")
        if needs_old:
            batch.old_logp = self._logp(model, batch, s.rollout.temperature)
        if s.kl.beta:
            batch.ref_logp = self._logp(self.ref_model, batch, s.rollout.temperature)
        self._advantages(batch, R, valid, stats)
        return batch, stats

    def _advantages(self, batch: Batch, R, valid, stats) -> None:
        s = self.s
        G = s.rollout.group_size
        R = torch.where(valid, R, torch.full_like(R, float("nan")))
        kl_reward = s.kl.beta and s.kl.placement == "reward"
        if kl_reward:
            k1 = (batch.old_logp - batch.ref_logp) * batch.loss_mask  # (N, T) detached, q in place of p
            stats.values["kl"] = float(k1.sum() / batch.loss_mask.sum().clamp(min=1))
        kind = s.advantage.kind
        if kind == "reinforce_pp":
            base = SEQUENCE_ADVANTAGES["group_center" if G > 1 else "raw"](R.view(-1, G)).flatten()
            adv_tok = base[:, None].expand_as(batch.loss_mask).clone()
            if kl_reward:
                adv_tok = token_returns(base, k1, batch.loss_mask, s.kl.beta)
            batch.advantages = global_normalize(adv_tok, batch.loss_mask)
            return
        if kl_reward:
            R = R - s.kl.beta * k1.sum(1).to(R)
        fn = SEQUENCE_ADVANTAGES[kind]
        adv = fn(R.view(-1, G), std_eps=s.advantage.std_eps) if kind == "group_zscore" else fn(R.view(-1, G))
        adv = adv.flatten().to(batch.advantages.dtype)  # (N,)
        batch.advantages = adv[:, None] * batch.loss_mask

    @torch.no_grad()
    def _logp(self, model, batch: Batch, temperature: float) -> torch.Tensor:
        out = torch.zeros_like(batch.loss_mask)
        micro = self.s.batch.micro_size or batch.size
        for start in range(0, batch.size, micro):
            mb = batch.select(slice(start, start + micro)).to(self.device)
            lp, _ = token_logprobs(model, mb.input_ids, mb.attention_mask, temperature=temperature)
            out[start:start + micro, : lp.shape[1]] = lp.float().cpu()
        return out
