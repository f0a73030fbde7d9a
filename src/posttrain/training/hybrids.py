"""The hybrid methods' extra rows: demonstrations decided per question after scoring, and prefixed rollouts.

    _add_demonstrations   HPT's switch (hard gate or soft table), SRFT's demonstration per question, CHORD's
                          expert rows with their mu schedule, ReLIFT's buffer of questions every rollout failed
    _prefixed             prefix-guided RL: rollouts continuing a cosine-scheduled share of each demonstration

A mixin of `training.experience.Experience` (its stage `s`, preset `p`, rows, demonstrations and buffer).
"""
from __future__ import annotations

import math

import torch

from ..data.batch import DEMO, ROLLOUT, Row
from ..objective import mixers
from ..objective.advantages import group_success
from .assembly import _Rows


class _Questions:
    """Per-question statistics of scored rows: each row's group, stream, and its question's rollout successes."""

    def __init__(self, part: _Rows, threshold: float):
        R = torch.tensor(part.rewards, dtype=torch.float64)
        self.group = torch.tensor([r.group for r in part.rows])
        self.stream = torch.tensor([r.stream for r in part.rows])
        rollout_R = torch.where(self.stream == ROLLOUT, R, torch.full_like(R, math.nan))
        self.hits, self.count = group_success(rollout_R, self.group, threshold)  # (N,) each
        self.keys = {r.group: r.meta["key"] for r in part.rows}  # group -> the question's row key
        self.first_hits = {g: float(h) for g, h in zip(self.group.tolist(), self.hits.tolist())}
        self.first_count = {g: float(c) for g, c in zip(self.group.tolist(), self.count.tolist())}


class HybridRows:
    """Rows the hybrid mixers add to a step (see the module docstring)."""

    def prefix_share(self, step: int) -> float:
        """The share of each demonstration copied as a prefix at `step`: a cosine from prefix_start to prefix_end."""
        src = self.s.sources
        return mixers.cosine_schedule(step, start=src.prefix_start, end=src.prefix_end, warmup=0,
                                      decay=max(1, self.total_steps - 1))

    def _prefixed(self, model, keys, g0, step, generator, part: _Rows, owners: list[int]) -> None:
        share = self.prefix_share(step)
        prompts, lens = [], []
        for k in keys:
            enc = self.paired.get(k, self.rows[k])
            a, b = Row(enc.input_ids, enc.loss_mask, DEMO, 0).completion_span()
            n = min(int(share * (b - a)), b - a - 1)  # the policy always writes at least the last token
            prompts.append(list(enc.input_ids[:a + n]))
            lens.append((a, n))
        ro = self._sample(model, prompts, self.s.sources.prefixed_rows, generator)
        for i, j in enumerate(ro.prompt_index):
            a, n = lens[j]
            p, c = ro.prompt_ids[i], ro.completion_ids[i]
            part.rows.append(Row(p + c, [0] * a + [1] * (n + len(c)), ROLLOUT, g0 + j, prefix_len=n,
                                 sampler_logp=ro.sampler_logp[i], truncated=ro.truncated[i],
                                 meta={"key": keys[j], "sampled": len(c)}))
            part.free.append(False)
            owners.append(keys[j])

    # ---- per-question gates and extra rows ------------------------------------------------------------

    def _add_demonstrations(self, part: _Rows, step: int, g_next: int, values: dict) -> torch.Tensor:
        """Demonstration rows decided after scoring (HPT, SRFT, CHORD, ReLIFT) appended to `part`; returns every
        row's mix. `g_next` is the first group id no question uses (rows outside the questions' groups)."""
        q = _Questions(part, self.s.success_threshold)
        fresh = iter(range(g_next, g_next + 10 ** 9))
        mixer = self.p.mixer
        if mixer in ("hpt", "hpt_soft"):
            mix = self._hpt(part, q, values)
        elif mixer == "srft":  # every question's demonstration; its weights come from the update's entropy
            for g, k in sorted(q.keys.items()):
                part.add(self._demo_row(k, g))
            mix = torch.ones(len(part.rows), dtype=torch.float64)
        elif mixer == "chord":
            mix = self._chord(part, step, fresh, values)
        else:
            mix = torch.ones(len(part.rows), dtype=torch.float64)
        if self.buffer is not None:
            mix = self._relift(part, q, mix, fresh, values)
        if "prefixed" in self.p.sources:
            lens = [r.prefix_len for r in part.rows if r.prefix_len]
            values["prefix_share"] = self.prefix_share(step)
            values["prefix_len"] = sum(lens) / len(lens) if lens else 0.0
        return mix

    def _hpt(self, part: _Rows, q: "_Questions", values: dict) -> torch.Tensor:
        """HPT's gate (or soft table) per question: rollout weights, and the demonstrations it switches to SFT."""
        s = self.s
        if self.p.mixer == "hpt":
            mix, switched = mixers.hpt_gate(q.hits, q.count, q.stream, gamma=s.mix.hpt_gamma, sft_coef=s.mix.sft_coef)
            demo_w = {g: s.mix.sft_coef for g in set(q.group[switched].tolist())}
        else:
            table = tuple(tuple(r) for r in s.mix.soft_table)
            mix = mixers.hpt_soft(q.hits, q.count, q.stream, table=table)
            sft_w = mixers.hpt_soft(q.hits, q.count, torch.full_like(q.stream, DEMO), table=table)
            first = {}
            for g, w, c in zip(q.group.tolist(), sft_w.tolist(), q.count.tolist()):
                first.setdefault(g, (w, c))
            demo_w = {g: w for g, (w, c) in first.items() if w > 0 and c > 0}
        for g, w in sorted(demo_w.items()):
            part.add(self._demo_row(q.keys[g], g))
            mix = torch.cat([mix, torch.tensor([w], dtype=mix.dtype)])
        values["switch_frac"] = len(demo_w) / max(len(q.keys), 1)
        return mix

    def _chord(self, part: _Rows, step: int, fresh, values: dict) -> torch.Tensor:
        """CHORD: expert rows (demo_share as many as the question rows), mix 1 - mu on rollouts and mu on them."""
        s = self.s
        mu = mixers.cosine_schedule(step, start=s.mix.mu_peak, end=s.mix.mu_valley, warmup=s.mix.mu_warmup,
                                    decay=s.mix.mu_decay)
        k = max(1, round(s.sources.demo_share * len(part.rows))) if s.sources.demo_share > 0 else 0
        for enc in self.demos.take(k):
            part.add(Row(list(enc.input_ids), list(enc.loss_mask), DEMO, next(fresh)))
        values["mu"] = mu
        return mixers.chord(torch.tensor([r.stream for r in part.rows]), mu).to(torch.float64)

    def _relift(self, part: _Rows, q: "_Questions", mix: torch.Tensor, fresh, values: dict) -> torch.Tensor:
        """ReLIFT: questions whose rollouts all failed enter the buffer; a full buffer adds their demonstrations."""
        failed = [q.keys[g] for g in sorted(q.keys) if q.first_hits[g] == 0 and q.first_count[g] > 0]
        self.buffer.add(failed)
        values["buffer_fill"] = len(self.buffer.keys) / self.buffer.size
        values["buffer_sft"] = float(self.buffer.full())
        if self.buffer.full():
            for k in self.buffer.drain():
                part.add(self._demo_row(k, next(fresh)))
            mix = torch.cat([mix, torch.full((len(part.rows) - len(mix),), self.s.mix.sft_coef, dtype=mix.dtype)])
        return mix
