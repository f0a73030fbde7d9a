"""Teacher signals computed without gradients when a batch is built (DESIGN.md §2):

  KD    the teacher's top-k distribution at every demonstration position (`distill.top_k`), the soft target
        of `objective.components.soft_target_loss`
  SDFT  the policy itself as the teacher, shown the question's demonstration (`distill.context`): its
        log-probs of each rollout's tokens
(On-policy distillation's teacher log-probs are one `_logp` pass of the recipe's `teacher:`.)

A mixin of `Experience` (training/experience.py), which owns the teacher, the rows and `_logp`.
"""
from __future__ import annotations

import torch

from ..data.batch import ROLLOUT, Batch, Row, collate
from ..data.encode import encode_prompt
from ..logprobs import position_ids_from_mask
from .world import gathered


class TeacherSignals:
    @torch.no_grad()
    def _teacher_targets(self, batch: Batch) -> None:
        """batch.teacher_ids / teacher_probs (N, T, K): the teacher's top_k tokens and probabilities at each
        position (aligned like log-probs: position t is the distribution token t was drawn from); the hard
        target keeps weight 1 - coef (batch.advantages)."""
        k = min(self.s.distill.top_k, self.teacher.get_output_embeddings().out_features)
        N, T = batch.input_ids.shape
        dt = torch.promote_types(next(self.teacher.parameters()).dtype, torch.float32)
        ids, probs = torch.zeros((N, T, k), dtype=torch.long), torch.zeros((N, T, k), dtype=dt)
        self._compute["ref_forward_tokens"] += int(batch.attention_mask.sum())
        with gathered(self.teacher):  # (a sharded teacher's whole weights)
            for rows in batch.split(self.s.batch.micro_size or N):
                mb = batch.select(rows).to(self.device)
                z = self.teacher(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False,
                                 position_ids=position_ids_from_mask(mb.attention_mask)).logits[:, :-1].to(dt)
                p, i = torch.softmax(z, -1).topk(k, dim=-1)  # (n, t-1, k)
                t = p.shape[1]
                ids[rows, 1: t + 1], probs[rows, 1: t + 1] = i.cpu(), p.cpu()
        batch.teacher_ids, batch.teacher_probs = ids, probs * batch.loss_mask[..., None].to(dt)
        batch.advantages = batch.advantages * (1 - self.s.distill.coef)

    def teacher_prompt(self, key: int):
        """SDFT's teacher prompt of row `key`: its last user turn (or its string prompt) in `distill.context`,
        with the row's demonstration."""
        row = self.rows[key]
        demo, template = self.paired.text(key, row), self.s.distill.context
        prompt = row["prompt"]
        if isinstance(prompt, str):
            return template.format(prompt=prompt, demonstration=demo)
        last = max(i for i, m in enumerate(prompt) if m.get("role") == "user")
        turn = dict(prompt[last], content=template.format(prompt=prompt[last]["content"], demonstration=demo))
        return [*prompt[:last], turn, *prompt[last + 1:]]

    def _conditioned_logp(self, model, rows: list[Row], batch: Batch) -> torch.Tensor:
        """(N, T) SDFT's teacher log-probs: the policy itself, without gradients, on each rollout's completion
        after its question's teacher prompt, placed at the completion's positions in `batch`."""
        out = torch.zeros_like(batch.loss_mask)
        seqs, spans = [], []
        for i, row in enumerate(rows):
            if row.stream == ROLLOUT:
                a, b = row.completion_span()
                ctx = encode_prompt(self.teacher_prompt(row.meta["key"]), self.tok)
                seqs.append(Row(ctx + row.input_ids[a:b], [0] * len(ctx) + [1] * (b - a), ROLLOUT, len(seqs)))
                spans.append((i, a, b, len(ctx)))
        if seqs:
            lp = self._logp(model, collate(seqs, self.pad_id))
            for j, (i, a, b, c) in enumerate(spans):
                out[i, a:b] = lp[j, c: c + b - a]
        return out
