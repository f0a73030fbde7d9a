"""Rejection-sampling fine-tuning's source (RFT): once per round, sample K completions of each prompt, keep the
verified ones (distinct per prompt) in a pool, and train on the pool like demonstrations.

A mixin of `Experience` (training/experience.py), which owns the prompts, the sampler (`_sample`), the rewards
(`_score`) and the pool.
"""
from __future__ import annotations

import time

import torch

from ..data.batch import ROLLOUT, Row, collate
from ..data.encode import completion_text
from ..objective import advantages as adv_fns
from .assembly import StepData, _Rows


class RejectionSampling:
    def _verified(self, model, generator) -> StepData:
        values: dict[str, float] = {}
        errors: list = []
        if self.pool.needs_round():
            errors = self._rft_round(model, generator, values)
        rows = self.pool.take(self.s.batch.size)
        values["pool_size"] = len(self.pool.pool)
        if not rows:
            return StepData(None, values, errors)
        batch = collate(rows, self.pad_id)
        batch.advantages = batch.loss_mask.clone()
        return StepData(batch, values, errors)

    def _rft_round(self, model, generator, values: dict) -> list:
        """Sample K per prompt for `round_prompts` prompts, keep the verified samples (distinct per prompt)."""
        s = self.s
        n = s.sources.round_prompts or len(self.rows)
        keys = self.prompts.take(n)
        timing = {"t_rollout": 0.0, "t_reward": 0.0}
        pool, seen, out_rows, all_rows = [], set(), [], _Rows()
        chunk = max(1, 256 // s.rollout.group_size)
        for start in range(0, len(keys), chunk):
            ks = keys[start:start + chunk]
            t0 = time.perf_counter()
            ro = self._sample(model, [self._prompt_ids(k) for k in ks], s.rollout.group_size, generator)
            part = _Rows()
            for i, j in enumerate(ro.prompt_index):
                p, c = ro.prompt_ids[i], ro.completion_ids[i]
                part.rows.append(Row(p + c, [0] * len(p) + [1] * len(c), ROLLOUT, j, truncated=ro.truncated[i],
                                     meta={"key": ks[j], "sampled": len(c)}))
                part.free.append(True)
            timing["t_rollout"] += time.perf_counter() - t0
            t1 = time.perf_counter()
            self._score(part, [r.meta["key"] for r in part.rows])
            timing["t_reward"] += time.perf_counter() - t1
            part.scored = [True] * len(part.rows)
            all_rows.extend(part)
            for row, r in verified(part.rows, part.rewards, s.success_threshold, seen):
                pool.append((row.input_ids, row.loss_mask))
                a, b = row.completion_span()
                src = self.rows[row.meta["key"]]
                answer = {"answer": src["answer"]} if "answer" in src else {}
                out_rows.append({"prompt": src["prompt"], "completion": completion_text(
                    src["prompt"], row.input_ids[a:b], self.tok), **answer, "id": src.get("id", row.meta["key"]),
                    "reward": r})
        self.pool.start_round(pool)
        if self.on_data is not None:
            self.on_data(self.pool.round, out_rows)
        values.update(timing)
        values.update(self._rollout_metrics(all_rows))
        values.update(rft_round=self.pool.round, verified_frac=len(pool) / max(len(all_rows.rows), 1),
                      reward_errors=len(all_rows.errors))
        return all_rows.errors


def verified(rows: list[Row], rewards: list[float], threshold: float, seen: set) -> list[tuple[Row, float]]:
    """Rejection sampling's filter: the rows whose indicator advantage 1{R >= threshold} is 1, not truncated,
    and not already in `seen` (a (question, ids) pair kept earlier; updated)."""
    R = torch.tensor(rewards, dtype=torch.float64)
    keep = adv_fns.advantage_indicator(R, torch.zeros(len(rows), dtype=torch.long), threshold=threshold)
    out = []
    for row, r, k in zip(rows, rewards, keep.tolist()):
        ident = (row.meta.get("key"), tuple(row.input_ids))
        if k and not row.truncated and ident not in seen:
            seen.add(ident)
            out.append((row, r))
    return out
