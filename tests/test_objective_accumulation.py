"""Gradient accumulation invariance (oracle O10, second half, for every aggregation).

An optimizer step over 8 ragged sequences, split into 8 micro-batches of one sequence each (each padded only
to its own length), must give the one-batch gradient when every micro-batch is weighted with the step's
global counts: aggregation_weights(mask_mb, mode, num_tokens=GLOBAL, num_seqs=GLOBAL, max_len=L_max).
Settings mimic grpo, dr_grpo, dapo and sft with the clip and a KL term (and an entropy bonus) switched on.
"""
from __future__ import annotations

import pytest
import torch
from oracle_policy import TabularBatch, assert_close, grad, log_ratio_offsets, make_batch, token_logp
from torch import Tensor

from posttrain.objective import advantages as ADV
from posttrain.objective import components as C
from posttrain.objective import estimator as E

LENGTHS = [3, 5, 2, 4, 5, 1, 3, 4]
MAX_LEN = 8  # L_max of the CONST normaliser, larger than any micro-batch's padded width
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, -1.0, 2.0, 0.0]], dtype=torch.float64)
AGGREGATIONS = ("tok", "seq", "const", "sum")
SETTINGS = {  # advantage, estimator keywords
    "grpo": ("group_zscore", dict(weight="ratio", clip="token", eps_low=0.2, eps_high=0.2, kl_estimator="k3")),
    "dr_grpo": ("group_center", dict(weight="ratio", clip="token", eps_low=0.2, eps_high=0.2, kl_estimator="k2")),
    "dapo": ("group_zscore", dict(weight="ratio", clip="token", eps_low=0.2, eps_high=0.28,
                                  kl_estimator="k3_ratio")),
    "sft": ("one", dict(weight="one", clip="none", kl_estimator="k3")),
}


def step_inputs(seed: int) -> tuple[TabularBatch, Tensor, Tensor]:
    """(batch, old_logp, ref_logp) for one optimizer step; q != p so the clip is active."""
    b = make_batch(LENGTHS, seed=seed)
    lp = b.logp.detach()
    ref = lp + 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=lp.dtype)
    return b, lp - log_ratio_offsets(*lp.shape), ref


def micro_loss(b: TabularBatch, rows: slice, width: int, adv: Tensor, old_logp: Tensor, ref_logp: Tensor,
               mode: str, kw: dict) -> E.EstimatorTerms:
    """The estimator on rows[:, :width] of the step, normalised by the step's global counts."""
    logits, mask = b.logits[rows, :width], b.mask[rows, :width]
    W = C.aggregation_weights(mask, mode, num_tokens=b.num_tokens, num_seqs=len(LENGTHS), max_len=MAX_LEN)
    return E.estimator_loss(token_logp(logits, b.tokens[rows, :width]), advantages=adv[rows, :width],
                            mask=mask, agg_weights=W, old_logp=old_logp[rows, :width],
                            ref_logp=ref_logp[rows, :width], kl_beta=0.04,
                            entropy=C.entropy_from_logits(logits), entropy_coef=0.01, **kw)


def check_accumulation(setting: str, mode: str) -> None:
    adv_kind, kw = SETTINGS[setting]
    b, old_logp, ref_logp = step_inputs(seed=20)
    group = torch.arange(REWARDS.shape[0]).repeat_interleave(REWARDS.shape[1])
    adv = ADV.advantages(adv_kind, REWARDS.reshape(-1), group, b.mask, std_eps=1e-4, threshold=1.0)
    whole = micro_loss(b, slice(None), b.mask.shape[1], adv, old_logp, ref_logp, mode, kw)
    if kw["clip"] != "none":
        assert 0 < whole.clipped_tokens < b.num_tokens, "the step must exercise the clip"
    g_acc, value = torch.zeros_like(b.logits), 0.0
    for i, n in enumerate(LENGTHS):  # one sequence per micro-batch, padded to its own length
        part = micro_loss(b, slice(i, i + 1), n, adv, old_logp, ref_logp, mode, kw)
        g_acc, value = g_acc + grad(part.loss, b.logits), value + part.loss.detach()
    assert_close(g_acc, grad(whole.loss, b.logits), f"{setting}/{mode}: accumulated gradient != one batch")
    assert_close(value, whole.loss.detach(), f"{setting}/{mode}: accumulated loss != one batch")


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_gradient_accumulation_is_invariant(setting: str, mode: str) -> None:
    check_accumulation(setting, mode)


ACCUMULATION_CHECKS = [(f"acc[{s}/{m}]", lambda s=s, m=m: check_accumulation(s, m))
                       for s in sorted(SETTINGS) for m in AGGREGATIONS]
