"""One step's experience: the stage's sources -> rows -> rewards -> advantages and mix -> Batch.

Order of operations (algorithms.md §3, §4):
  prompts -> [free rollouts, prefixed rollouts, in-group demonstrations] per question (one group id each)
  -> rewards (errors masked) -> + soft overlong penalty -> dynamic-sampling filter (refill rounds)
  -> per-question gates and extra rows (HPT's switch, SRFT's and CHORD's demonstrations, ReLIFT's buffer)
  -> Batch (+ old_logp, ref_logp, a critic's values, a teacher's log-probs) -> [k1 in the reward]
  -> advantages (by group id; GAE for PPO, the greedy baseline for ReMax) and mix.
Stages that read stored data only (SFT, DFT, PSFT, KD; DPO and the other pair losses; KTO) are built in
training/offline.py (the advantage of a preference loss comes later, from the update's forward pass); the
teachers' signals (KD's targets, SDFT's self-teacher) in training/teachers.py; rejection sampling (RFT), which
refills its pool of verified samples once per round, in training/rejection.py; the hybrids' per-question
gates, extra demonstrations and prefixed rollouts in training/hybrids.py. The loop calls `make` and never asks
which method runs.
The sampler's ids are used as they are: text is decoded only for the reward functions.
"""
from __future__ import annotations

import logging
import math
import time

import torch

from .. import faults
from ..data.batch import DEMO, ROLLOUT, Batch, Row, pair_batch
from ..data.encode import completion_text, encode_prompt
from ..logprobs import shared_prompts, token_logprobs
from ..objective.advantages import mixed_outcome
from ..objective.components import overlong_penalty
from ..objective.preference import PAIRED_LOSSES
from ..objective.presets import get_preset
from ..recipe import stage_streams
from ..rewards import reward_columns
from .world import SINGLE, World, full_state_dict, gathered, is_sharded, load_full_state
from ..rollout.sampler import Rollout, row_key, sample
from .assembly import STREAM_IDS, StepData, _Rows, correct_for_sampler, row_baselines, rows_to_batch, \
    token_advantages
from .health import GroupSignal, RewardHealth
from .hybrids import HybridRows
from .offline import OfflineSteps
from .rejection import RejectionSampling
from .teachers import TeacherSignals
from .sources import Buffer, DataCursor, Demonstrations, PackedDemonstrations, PairedDemos, VerifiedPool

log = logging.getLogger("posttrain")


class Experience(OfflineSteps, TeacherSignals, RejectionSampling, HybridRows):
    """Builds one Batch per step from a stage's sources. Holds no model: the policy is passed in."""

    def __init__(self, stage, tokenizer, *, pad_id: int, stop_ids=(), device="cpu", seed: int = 0, rows=None,
                 demos: Demonstrations | PackedDemonstrations | None = None, paired: PairedDemos | None = None,
                 scorer=None, ref_model=None, total_steps: int = 1, on_data=None, on_samples=None,
                 pairs: Demonstrations | None = None, teacher=None, critic=None, world: World = SINGLE,
                 engine=None):
        self.s, self.p = stage, get_preset(stage.method)
        self.world, self.seed = world, seed
        self.engine = engine  # another rollout engine (vLLM: rollout/vllm_engine.py); None: the built-in sampler
        # keyed sampling noise (rollout.seeding): samples that do not depend on how rows are split across ranks
        self.keyed = stage.rollout.seeding == "row" or (stage.rollout.seeding == "auto" and world.size > 1)
        self._step, self._calls = 0, 0
        self.tok, self.pad_id, self.stop_ids, self.device = tokenizer, pad_id, list(stop_ids), device
        self.rows = rows or []
        self.columns = reward_columns(self.rows)
        self.prompts = DataCursor(len(self.rows), seed, stage.data.shuffle)
        self.demos, self.paired, self.scorer, self.ref_model = demos, paired, scorer, ref_model
        self.pairs, self.teacher, self.critic = pairs, teacher, critic
        self.buffer = Buffer(stage.sources.buffer_size) if "buffer" in self.p.sources else None
        self.pool = VerifiedPool(math.ceil(total_steps / stage.sources.rounds), seed) \
            if "verified" in self.p.sources else None
        self.total_steps = total_steps
        self.on_data = on_data
        self.on_samples = on_samples  # on_samples(step, records): a few completions for samples.jsonl
        self.streams = {STREAM_IDS[n]: c for n, c in stage_streams(stage).items()}
        self.health = RewardHealth(stage.reward_policy.max_error_rate, stage.reward_policy.window)
        self._signal = GroupSignal()
        self._prompt_cache: dict[int, list[int]] = {}
        self._compute: dict[str, int] = {}

    # ---- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        out = {"prompts": self.prompts.state_dict(), "health": self.health.state_dict(), "keyed": self.keyed}
        for name in ("demos", "buffer", "pool", "pairs"):
            src = getattr(self, name)
            if src is not None:
                out[name] = src.state_dict()
        return out

    def load_state_dict(self, d: dict) -> None:
        self.prompts.load_state_dict(d["prompts"])
        self.health.load_state_dict(d["health"])
        keyed = d.get("keyed", self.keyed)
        if keyed != self.keyed and self.s.rollout.seeding == "auto" and (keyed or self.world.size == 1):
            self.keyed = keyed  # `auto` goes on as the checkpoint's run sampled, on any number of ranks
        elif keyed != self.keyed:
            log.warning("the checkpoint's run sampled with %s noise, this one uses %s (rollout.seeding: %s): the "
                        "continuation differs from a run that was never stopped", "keyed" if keyed else "generator",
                        "keyed" if self.keyed else "generator", self.s.rollout.seeding)
        for name in ("demos", "buffer", "pool", "pairs"):
            if name in d:
                getattr(self, name).load_state_dict(d[name])

    # ---- one step -------------------------------------------------------------------------------------

    def make(self, model, step: int, generator) -> StepData:
        """The experience of optimizer step `step` (0-based count of the steps already taken)."""
        offline = self._offline_step(model)  # demonstrations, pairs, unpaired rows (training/offline.py)
        if offline is not None:
            return StepData(*offline)
        self._compute = {"prefill_tokens": 0, "generated_tokens": 0, "ref_forward_tokens": 0}
        self._step, self._calls = step, 0
        self.refresh_reference(model, step)
        if self.engine is not None:  # the engine samples from the policy as it is now
            self.engine.sync(model)
        data = self._verified(model, generator) if self.pool is not None else self._rollouts(model, step, generator)
        self.health.end_step(step)  # may stop the run: before this step's update, so the state is the last step's
        data.values.update(self._compute)  # what this step's sampling and no-grad passes processed (for FLOPs)
        return data

    def _prompt_ids(self, key: int) -> list[int]:
        if key not in self._prompt_cache:
            self._prompt_cache[key] = encode_prompt(self.rows[key]["prompt"], self.tok)
        return self._prompt_cache[key]

    def _sample(self, model, prompts: list[list[int]], n: int, generator, greedy: bool = False):
        """`n` samples of each prompt. Under several ranks each samples its contiguous share of the prompts and
        every rank gets all of them back, in prompt order."""
        faults.hit("generate")
        r = self.s.rollout
        keys = None
        if self.keyed:  # (seed, step, the step's sampling call, prompt, sample): the same on any number of ranks
            keys = [row_key(self.seed, self._step, self._calls, j, k) for j in range(len(prompts)) for k in range(n)]
        self._calls += 1
        a, b = self.world.span(len(prompts))
        mine = None if keys is None else keys[a * n:b * n]
        if self.engine is not None:
            ro = self.engine.generate(prompts[a:b], num_samples=n, max_new_tokens=r.max_new_tokens,
                                      temperature=r.temperature, top_p=r.top_p, stop_ids=self.stop_ids, greedy=greedy,
                                      keys=mine)
        else:
            with gathered(model):  # (a sharded policy's whole weights: each rank decodes as long as its rows need)
                ro = sample(model, prompts[a:b], num_samples=n, max_new_tokens=r.max_new_tokens,
                            temperature=r.temperature, top_p=r.top_p, stop_ids=self.stop_ids, pad_id=self.pad_id,
                            generator=generator, greedy=greedy, keys=mine, native=r.native_decode,
                            graphs=r.cuda_graphs)
        if self.world.size > 1:
            ro.prompt_index = [a + i for i in ro.prompt_index]
            parts = self.world.gather(ro)  # every rank's share, in prompt order
            ro = Rollout(*([x for part in parts for x in getattr(part, f)]
                           for f in ("prompt_index", "prompt_ids", "completion_ids", "sampler_logp", "truncated")))
        self._compute["prefill_tokens"] += sum(len(p) for p in prompts)  # each distinct prompt is prefilled once
        self._compute["generated_tokens"] += sum(len(c) for c in ro.completion_ids)
        return ro

    def _demo_row(self, key: int, group: int) -> Row:
        enc = self.paired.get(key, self.rows[key])
        return Row(list(enc.input_ids), list(enc.loss_mask), DEMO, group, meta={"key": key})

    def _score(self, part: _Rows, keys: list[int]) -> None:
        """Rewards of `part.rows` (row i answers the prompt of keys[i]); fills rewards, per_fn, errors."""
        if self.scorer is None:  # no reward functions (on-policy distillation alone): every reward 0
            part.rewards, part.per_fn, part.errors = [0.0] * len(part.rows), {}, []
            return
        a, b = self.world.span(len(part.rows))  # each rank scores its share; every rank gets every reward
        shares = self.world.gather(self._score_rows(part.rows[a:b], keys[a:b]) if b > a else None)
        shares = [x for x in shares if x is not None]
        part.rewards = [v for total, _, _ in shares for v in total]
        part.per_fn = {name: [v for _, per_fn, _ in shares for v in per_fn[name]] for name in shares[0][1]} \
            if shares else {}
        part.errors = [e for _, _, errors in shares for e in errors]
        self.health.add(part.rewards, part.errors)

    def _score_rows(self, part_rows: list[Row], keys: list[int]) -> tuple[list[float], dict, list]:
        """(total rewards, {reward fn: rewards}, errors) of rows answering the prompts of `keys`."""
        rows = [self.rows[k] for k in keys]
        prompts = [r["prompt"] for r in rows]
        comp_ids = []
        for row in part_rows:
            a, b = row.completion_span()
            comp_ids.append(row.input_ids[a:b])
        completions = [completion_text(p, c, self.tok) for p, c in zip(prompts, comp_ids)]
        columns = {k: [r.get(k) for r in rows] for k in self.columns}
        row_ids = [r.get("id", k) for r, k in zip(rows, keys)]
        scored = self.scorer(prompts, completions, columns=columns, completion_ids=comp_ids, row_ids=row_ids)
        return scored.total.tolist(), {name: v.tolist() for name, v in scored.per_fn.items()}, list(scored.errors)

    def _question_rows(self, model, keys: list[int], g0: int, step: int, generator, timing: dict) -> _Rows:
        """Every scored row of the questions `keys` (group ids g0, g0 + 1, ...): free rollouts, prefixed
        rollouts and in-group demonstrations."""
        src, G = self.s.sources, self.s.rollout.group_size
        n_prefixed = src.prefixed_rows
        n_free = G - src.demos_per_group - n_prefixed
        part, owners = _Rows(), []
        t0 = time.perf_counter()
        ro = self._sample(model, [self._prompt_ids(k) for k in keys], n_free, generator)
        for i, j in enumerate(ro.prompt_index):
            p, c = ro.prompt_ids[i], ro.completion_ids[i]
            part.rows.append(Row(p + c, [0] * len(p) + [1] * len(c), ROLLOUT, g0 + j, sampler_logp=ro.sampler_logp[i],
                                 truncated=ro.truncated[i], meta={"key": keys[j], "sampled": len(c)}))
            part.free.append(True)
            owners.append(keys[j])
        if n_prefixed:
            self._prefixed(model, keys, g0, step, generator, part, owners)
        for j, k in enumerate(keys):
            for _ in range(src.demos_per_group):
                part.rows.append(self._demo_row(k, g0 + j))
                part.free.append(False)
                owners.append(k)
        timing["t_rollout"] += time.perf_counter() - t0
        t1 = time.perf_counter()
        self._score(part, owners)
        timing["t_reward"] += time.perf_counter() - t1
        part.scored = [True] * len(part.rows)
        if self.s.advantage.kind == "remax":
            self._greedy_baseline(model, keys, g0, part, generator, timing)
        return part

    def _greedy_baseline(self, model, keys: list[int], g0: int, part: _Rows, generator, timing: dict) -> None:
        """ReMax: each question's greedy decode, scored by the same rewards; its reward becomes the baseline of the
        question's rows (row.meta["baseline"]). A question whose greedy reward failed leaves its rows unscored."""
        t0 = time.perf_counter()
        ro = self._sample(model, [self._prompt_ids(k) for k in keys], 1, generator, greedy=True)
        greedy = _Rows()
        for i, j in enumerate(ro.prompt_index):
            p, c = ro.prompt_ids[i], ro.completion_ids[i]
            greedy.rows.append(Row(p + c, [0] * len(p) + [1] * len(c), ROLLOUT, g0 + j, meta={"key": keys[j]}))
        timing["t_rollout"] += time.perf_counter() - t0
        self._score(greedy, [keys[j] for j in ro.prompt_index])
        part.errors.extend(greedy.errors)
        base = {row.group: r for row, r in zip(greedy.rows, greedy.rewards)}
        for i, row in enumerate(part.rows):
            row.meta["baseline"] = base[row.group]
            if math.isnan(base[row.group]):
                part.rewards[i] = math.nan

    def _rollouts(self, model, step: int, generator) -> StepData:
        s = self.s
        P = s.batch.size
        timing = {"t_rollout": 0.0, "t_reward": 0.0}
        kept, all_rows, g0, rounds, n_groups = _Rows(), _Rows(), 0, 0, 0
        keys = self.prompts.take(P)
        while True:
            part = self._question_rows(model, keys, g0, step, generator, timing)
            rounds += 1
            self._shape_rewards(part)
            all_rows.extend(part)
            keep = [True] * len(part.rows)
            if s.dynamic_sampling.enabled:
                R = torch.tensor(part.rewards, dtype=torch.float64)
                group = torch.tensor([r.group for r in part.rows])
                mixed = mixed_outcome(R, group)
                room, order = P - n_groups, []
                for g in sorted(set(group.tolist())):  # keep the first `room` mixed groups
                    if bool(mixed[group == g].any()) and len(order) < room:
                        order.append(g)
                keep = [r.group in order for r in part.rows]
                n_groups += len(order)
            else:
                n_groups += len(keys)
            kept.extend(part, keep)
            g0 += len(keys)
            if not s.dynamic_sampling.enabled or n_groups >= P or rounds > s.dynamic_sampling.max_rounds:
                break
            keys = self.prompts.take(P - n_groups)
        values = dict(timing)
        if s.dynamic_sampling.enabled:
            values.update(fill_ratio=n_groups / P, sample_rounds=rounds)
        values.update(self._rollout_metrics(all_rows))
        values["reward_errors"] = len(all_rows.errors)
        if self.scorer is not None:  # (without rewards every group is flat by construction)
            values["zero_var_frac"] = self._signal.update(all_rows, step)
        every = s.samples.every
        if self.on_samples is not None and every and (step + 1) % every == 0:
            self.on_samples(step + 1, self._sample_records(all_rows, s.samples.n))
        if not kept.rows:  # every group filtered: an empty batch (the loop skips the update and logs it)
            return StepData(None, values, all_rows.errors)
        if self.s.advantage.kind in PAIRED_LOSSES:  # online DPO: a pair from each group's best and worst sample
            return StepData(self._sampled_pairs(kept, values), values, all_rows.errors)
        mix = self._add_demonstrations(kept, step, g0, values)
        batch = self._assemble(model, kept, mix, values)
        return StepData(batch, values, all_rows.errors)

    def _sampled_pairs(self, part: _Rows, values: dict) -> Batch | None:
        """Online DPO's pairs: in each group whose scored rewards differ, its highest-rewarded sample is chosen
        and its lowest rejected (the first of equals); groups without a preference, and samples whose reward
        failed, give no pair."""
        by_group: dict[int, list[int]] = {}
        for i, (row, r) in enumerate(zip(part.rows, part.rewards)):
            if not math.isnan(r):  # (a truncated sample stays: its reward says what it is worth)
                by_group.setdefault(row.group, []).append(i)
        pairs = []
        for idx in by_group.values():
            best = max(idx, key=lambda i: part.rewards[i])
            worst = min(idx, key=lambda i: part.rewards[i])
            if part.rewards[best] > part.rewards[worst]:
                pairs.append((part.rows[best], part.rows[worst]))
        values["pair_frac"] = len(pairs) / max(len({r.group for r in part.rows}), 1)
        if not pairs:
            return None
        batch = pair_batch(pairs, self.pad_id, stream=ROLLOUT)
        batch.ref_logp = self._logp(self.ref_model, batch, temperature=1.0)
        return batch

    def renewed_reference(self):
        """The reference model when this stage renews it (checkpoints save and restore its weights), else None."""
        return self.ref_model if self.s.preference.refresh_every and self.ref_model is not None else None

    def refresh_reference(self, model, step: int) -> None:
        """Iterative DPO: the reference becomes the current policy every `preference.refresh_every` steps."""
        every = self.s.preference.refresh_every
        if every and step and step % every == 0 and self.ref_model is not None:
            weights = full_state_dict(model)  # (collective when the policy is sharded: every rank is here)
            if is_sharded(self.ref_model):
                load_full_state(self.ref_model, None, weights, None)
            else:
                self.ref_model.load_state_dict(weights)

    def _sample_records(self, part: _Rows, n: int) -> list[dict]:
        """The first `n` free rollouts of a step as readable records: prompt, completion, rewards, row id."""
        out = []
        for i in [i for i, f in enumerate(part.free) if f][:n]:
            row, src = part.rows[i], self.rows[part.rows[i].meta["key"]]
            a, b = row.completion_span()
            out.append({"id": src.get("id", row.meta["key"]), "prompt": src["prompt"],
                        "completion": completion_text(src["prompt"], row.input_ids[a:b], self.tok),
                        "reward": part.rewards[i], "rewards": {k: v[i] for k, v in part.per_fn.items()},
                        "truncated": bool(row.truncated)})
        return out

    def _shape_rewards(self, part: _Rows) -> None:
        """Soft overlong penalty on sampled rows' lengths; DAPO's overlong filter masks truncated rows."""
        o = self.s.overlong
        for i, row in enumerate(part.rows):
            if row.stream != ROLLOUT:
                continue
            if o.soft_penalty:
                pen = overlong_penalty(torch.tensor([row.meta["sampled"]]), self.s.rollout.max_new_tokens, o.cache)
                part.rewards[i] += float(pen)
            if o.mask_truncated and row.truncated:
                part.rewards[i] = math.nan  # no gradient, and out of the group statistics

    def _rollout_metrics(self, part: _Rows) -> dict[str, float]:
        free = [i for i, f in enumerate(part.free) if f]
        R = torch.tensor([part.rewards[i] for i in free], dtype=torch.float64)
        ok = ~torch.isnan(R)
        out = {"reward_mean": float(R[ok].mean()) if ok.any() else float("nan"),
               "reward_std": float(R[ok].std()) if ok.sum() > 1 else 0.0,
               "response_len": sum(part.rows[i].meta["sampled"] for i in free) / max(len(free), 1),
               "truncated_frac": sum(part.rows[i].truncated for i in free) / max(len(free), 1)}
        primary, threshold = self._primary()
        for n, (name, vals) in enumerate(part.per_fn.items()):
            v = torch.tensor([vals[i] for i in free], dtype=torch.float64)
            v = v[~torch.isnan(v)]
            out[f"reward/{name}"] = float(v.mean()) if len(v) else float("nan")
            if n == primary:  # accuracy: the share of samples whose primary reward reaches its threshold
                out["accuracy"] = float((v >= threshold).double().mean()) if len(v) else float("nan")
        return out

    def _primary(self) -> tuple[int, float]:
        """(index, threshold) of the reward `accuracy` is read from: the one marked primary, else the first."""
        rewards = self.s.rewards
        i = next((k for k, r in enumerate(rewards) if r.primary), 0)
        return i, (rewards[i].threshold if rewards else 1.0)

    def _assemble(self, model, part: _Rows, mix: torch.Tensor, values: dict) -> Batch:
        """Rows -> Batch with old / reference log-probs, advantages and mix."""
        s = self.s
        batch = rows_to_batch(part.rows, part.rewards, part.scored, mix, self.pad_id)
        needs_old = s.ppo_epochs * s.minibatches > 1 or (s.kl.beta and s.kl.placement == "reward") or s.distill.coef \
            or s.rollout.correction
        if needs_old:
            batch.old_logp = self._logp(model, batch)
        if s.kl.beta:
            batch.ref_logp = self._logp(self.ref_model, batch)
        if self.critic is not None:  # V(s_t) of the old policy's states, for GAE and the clipped value loss
            batch.values = self.critic.values(batch)
        if s.distill.coef:  # the teacher's log-probs of the student's tokens, one no-grad pass
            batch.teacher_logp = self._conditioned_logp(model, part.rows, batch) if self.p.self_teacher else \
                self._logp(self.teacher, batch)
            own = batch.loss_mask * (batch.stream[:, None] == ROLLOUT)
            values["teacher_kl"] = float(((batch.old_logp - batch.teacher_logp) * own).sum() / own.sum().clamp(min=1))
        baseline = row_baselines(part.rows)
        batch.advantages, kl = token_advantages(batch, torch.tensor(part.rewards, dtype=torch.float64), s,
                                                baseline=baseline)
        if s.advantage.kind == "remax":
            values["baseline_reward"] = float(baseline.nanmean())
        if kl is not None:
            values["kl"] = kl
        if s.rollout.correction and batch.sampler_logp is not None:
            values.update(correct_for_sampler(batch, s.rollout.correction, s.rollout.correction_cap))
        return batch

    @torch.no_grad()
    def _logp(self, model, batch: Batch, temperature: float | None = None) -> torch.Tensor:
        """(N, T) log-probs of `batch` under `model`, no gradient; under several ranks each computes its share of
        the rows and the shares are summed (zeros elsewhere), so every rank holds all of them."""
        out = torch.zeros_like(batch.loss_mask)
        temperature = self.s.rollout.temperature if temperature is None else temperature
        micro = self.s.batch.micro_size or batch.size
        self._compute["ref_forward_tokens"] += int(batch.attention_mask.sum())
        mine = batch.share(self.world.rank, self.world.size)  # (whole groups)
        with gathered(model):
            share = batch if self.world.size == 1 else batch.select(mine)
            for rows in (share.split(micro) if len(mine) else []):
                rows = mine[rows]
                mb = batch.select(rows).to(self.device)
                lp, _ = token_logprobs(model, mb.input_ids, mb.attention_mask, temperature=temperature,
                                       chunk_mb=self.s.batch.logits_chunk_mb,
                                       **shared_prompts(self.s.batch.share_prompts, mb))
                out[rows, : lp.shape[1]] = lp.float().cpu()
        return self.world.sum_(out)
