"""Offline steps: a batch from stored data instead of the policy's samples (DESIGN.md §2), with what other
models add to it without gradients.

  demonstrations  SFT and DFT; PSFT's q (the policy before the batch's updates, with several updates per
                  batch); KD's teacher targets (training/teachers.py)
  pairs           DPO, IPO, SimPO, ORPO, reward models: chosen and rejected in one batch, the reference's
                  log-probs once per batch where the loss needs them
  unpaired        KTO: labelled responses and the batch's reference point z0

A mixin of `Experience` (training/experience.py), which owns the sources, the models and `_logp`.
"""
from __future__ import annotations

import torch

from ..data.batch import Batch, demo_batch, mismatched, packed_demo_batch, packed_rows_batch, pair_batch, \
    unpaired_batch


class OfflineSteps:
    def _offline_step(self, model) -> tuple[Batch, dict] | None:
        """(batch, values) of this step when the stage reads stored data only, else None (the stage samples)."""
        if self.p.sources == ("demonstrations",):
            if self.s.batch.pack == "rows":  # rows packed a window of documents at a time (PackedDemonstrations)
                batch = packed_rows_batch(self.demos.take_rows(self.s.batch.size), self.pad_id)
            elif self.s.batch.pack:
                batch = packed_demo_batch(self.demos.take(self.s.batch.size), self.pad_id, self.s.data.max_len)
            else:
                batch = demo_batch(self.demos.take(self.s.batch.size), self.pad_id)
            self._compute = {"ref_forward_tokens": 0}
            if self.s.ppo_epochs * self.s.minibatches > 1 and self.s.weight != "one":  # PSFT's q: the policy
                batch.old_logp = self._logp(model, batch, temperature=1.0)              # before the batch
            if self.s.distill.coef:  # KD: the teacher's top-k distribution is (a share of) each token's target
                self._teacher_targets(batch)
            return batch, dict(self._compute) if self._compute["ref_forward_tokens"] else {}
        if self.p.sources == ("pairs",):
            self._compute = {"ref_forward_tokens": 0}
            batch = pair_batch(self.pairs.take(self.s.batch.size), self.pad_id)
            if self.p.needs_reference:  # once per batch, without gradients
                batch.ref_logp = self._logp(self.ref_model, batch, temperature=1.0)
            return batch, dict(self._compute)
        if self.p.sources == ("unpaired",):  # KTO: labelled responses and the batch's reference point z0
            self._compute = {"ref_forward_tokens": 0}
            items = self.pairs.take(self.s.batch.size)
            batch = unpaired_batch(items, self.pad_id)
            batch.ref_logp = self._logp(self.ref_model, batch, temperature=1.0)
            batch.ref_point = torch.full((batch.size,), self.reference_point(model, items))
            return batch, dict(self._compute)
        return None

    def reference_point(self, model, items) -> float:
        """KTO's z0 = max(0, mean_i KL estimate), sum_t (log pi - log pi_ref) of prompt i with the response of
        item i + 1: the policy and the reference on mismatched pairs, without gradients."""
        mis = demo_batch(mismatched(items), self.pad_id)
        kl = ((self._logp(model, mis, temperature=1.0) - self._logp(self.ref_model, mis, temperature=1.0))
              * mis.loss_mask).sum(1)
        return max(0.0, float(kl.mean()))
