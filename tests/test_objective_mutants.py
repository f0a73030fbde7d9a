"""Mutation tests: the oracles must catch plausible bugs in the estimator's components.

Each mutant monkeypatches one component with a subtly wrong version (clip side flipped, clip ignored,
normaliser changed, ratio inverted, KL sign flipped, ...) and the oracle checks of
test_objective_oracles.py / test_objective_accumulation.py are run directly: at least one must raise
AssertionError. Each mutant names the oracles expected to catch it (prefixes of the check names) so a
test stays well under a second; `python tests/test_objective_mutants.py` prints the full kill matrix.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from test_objective_accumulation import ACCUMULATION_CHECKS
from test_objective_hybrids import HYBRID_CHECKS
from test_objective_oracles import ALL_CHECKS
from torch import Tensor

from posttrain.objective import advantages as A
from posttrain.objective import components as C
from posttrain.objective import estimator as E
from posttrain.objective import mixers as MX

MODULES = (C, A, MX)
ORIG = {name: getattr(m, name) for m in MODULES for name in dir(m) if callable(getattr(m, name))}
CHECKS = ALL_CHECKS + ACCUMULATION_CHECKS + HYBRID_CHECKS


def patch(mp: pytest.MonkeyPatch, name: str, fn: Callable) -> None:
    """Replace component `name` wherever the trainer can reach it: its module, the estimator's own import,
    and the WEIGHTS / SEQUENCE_ADVANTAGES tables."""
    for m in MODULES:
        if hasattr(m, name):
            mp.setattr(m, name, fn)
    if hasattr(E, name):
        mp.setattr(E, name, fn)
    for table in (C.WEIGHTS, A.SEQUENCE_ADVANTAGES):
        for key, value in list(table.items()):
            if value is ORIG[name]:
                mp.setitem(table, key, fn)


# ---- the mutants: (component, wrong version, check-name prefixes expected to catch it) -------------


def clip_side_flipped(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> Tensor:
    clipped = ((adv > 0) & (ratio < 1 - eps_low)) | ((adv < 0) & (ratio > 1 + eps_high))
    return (~clipped).to(adv.dtype)


def clip_ignored(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> Tensor:
    return torch.ones_like(adv * ratio)


def clip_eps_swapped(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> Tensor:
    return ORIG["clip_mask"](ratio, adv, eps_high, eps_low)


def agg_seq_as_tok(mask: Tensor, mode: str, **kw) -> Tensor:
    return ORIG["aggregation_weights"](mask, "tok" if mode == "seq" else mode, **kw)


def agg_const_padded_width(mask: Tensor, mode: str, **kw) -> Tensor:
    return ORIG["aggregation_weights"](mask, mode, **{**kw, "max_len": mask.shape[1]})


def agg_tok_microbatch_count(mask: Tensor, mode: str, **kw) -> Tensor:
    return ORIG["aggregation_weights"](mask, mode, **{**kw, "num_tokens": float(mask.sum())})


def zscore_without_eps(rewards: Tensor, group: Tensor, *, std_eps: float, bessel: bool = True) -> Tensor:
    return ORIG["advantage_group_zscore"](rewards, group, std_eps=0.0, bessel=bessel)


def zscore_population_std(rewards: Tensor, group: Tensor, *, std_eps: float, bessel: bool = True) -> Tensor:
    return ORIG["advantage_group_zscore"](rewards, group, std_eps=std_eps, bessel=False)


def center_is_raw(rewards: Tensor, group: Tensor) -> Tensor:
    return torch.nan_to_num(rewards, nan=0.0)


def loo_without_scale(rewards: Tensor, group: Tensor) -> Tensor:
    return ORIG["advantage_group_center"](rewards, group)


def groups_by_row_order(rewards: Tensor, group: Tensor) -> Tensor:
    """Statistics over consecutive blocks of 4 rows, as code that assumes contiguous groups would compute."""
    return ORIG["group_sum"](rewards, torch.arange(len(rewards)) // 4)


def ratio_inverted(logp: Tensor, old_logp: Tensor, **_: float) -> Tensor:
    return torch.exp(old_logp - logp)


def truncation_ignored(logp: Tensor, old_logp: Tensor, **_: float) -> Tensor:
    return torch.exp(logp - old_logp)


def prob_weight_is_one(logp: Tensor, old_logp: Tensor, **_: float) -> Tensor:
    return torch.ones_like(logp)


def shaped_weight_unsquared(logp: Tensor, old_logp: Tensor, *, shaping_gamma: float, **_: float) -> Tensor:
    p = torch.exp(logp)
    return shaping_gamma * p / (p + shaping_gamma)


def shaping_dropped(logp: Tensor, old_logp: Tensor, **_: float) -> Tensor:
    """LUFFY's demonstration tokens weighted like plain SFT tokens (w = 1): the shaping forgotten."""
    return torch.ones_like(logp)


def schedule_off_by_one(step: int, **kw) -> float:
    return ORIG["cosine_schedule"](step + 1, **kw)


def hpt_gate_inverted(successes: Tensor, count: Tensor, stream: Tensor, *, gamma: float, sft_coef: float):
    acc = successes / count.clamp(min=1)
    switched = (acc > gamma) & (count > 0)
    mix = torch.where(stream == 1, (~switched).to(acc.dtype), switched.to(acc.dtype) * sft_coef)
    return mix, switched


def hpt_gate_strict(successes: Tensor, count: Tensor, stream: Tensor, *, gamma: float, sft_coef: float):
    """k / n < gamma instead of <=: SuperRL (gamma = 0) never switches."""
    acc = successes / count.clamp(min=1)
    switched = (acc < gamma) & (count > 0)
    mix = torch.where(stream == 1, (~switched).to(acc.dtype), switched.to(acc.dtype) * sft_coef)
    return mix, switched


def chord_mix_swapped(stream: Tensor, mu: float) -> Tensor:
    return ORIG["stream_weights"](stream, demo=1.0 - mu, rollout=mu)


def srft_signs_swapped(row_entropy: Tensor, stream: Tensor, positive: Tensor, *, w_sft: float, w_rl: float) -> Tensor:
    return ORIG["srft"](-row_entropy, stream, positive, w_sft=w_sft, w_rl=w_rl)


def indicator_keeps_everything(rewards: Tensor, group: Tensor, *, threshold: float) -> Tensor:
    return (~torch.isnan(rewards)).to(rewards.dtype)


def sequence_ratio_of_sums(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    return torch.exp(((logp - old_logp) * mask).sum(1))


def kl_sign_flipped(logp: Tensor, ref_logp: Tensor, estimator: str, old_logp: Tensor | None = None) -> Tensor:
    return -ORIG["kl_penalty"](logp, ref_logp, estimator, old_logp)


def kl_k2_without_half(logp: Tensor, ref_logp: Tensor, estimator: str, old_logp: Tensor | None = None) -> Tensor:
    if estimator == "k2":
        return (logp - ref_logp) ** 2
    return ORIG["kl_penalty"](logp, ref_logp, estimator, old_logp)


def kl_k3_ratio_detached(logp: Tensor, ref_logp: Tensor, estimator: str,
                         old_logp: Tensor | None = None) -> Tensor:
    """The bug fixed in commit d6bd510: a detached ratio leaves k3's gradient, i.e. grad KL(b||p)."""
    if estimator == "k3_ratio":
        old = logp.detach() if old_logp is None else old_logp
        return torch.exp(logp.detach() - old) * ORIG["kl_penalty"](logp, ref_logp, "k3")
    return ORIG["kl_penalty"](logp, ref_logp, estimator, old_logp)


def global_normalize_bessel(adv: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    n = mask.sum()
    mean = (adv * mask).sum() / n
    var = (((adv - mean) * mask) ** 2).sum() / (n - 1)
    return (adv - mean) / (var.sqrt() + eps) * mask


def token_returns_forward(seq_adv: Tensor, kl_tokens: Tensor, mask: Tensor, beta: float) -> Tensor:
    return (seq_adv[:, None] - beta * (kl_tokens * mask).cumsum(1)) * mask


def overlong_ramp_over_max_len(lengths: Tensor, max_len: int, cache: int) -> Tensor:
    return ORIG["overlong_penalty"](lengths, max_len, cache) * cache / max_len


def entropy_sign_flipped(logits: Tensor) -> Tensor:
    return -ORIG["entropy_from_logits"](logits)


def tv_side_flipped(logp: Tensor, old_logp: Tensor, adv: Tensor, delta: float) -> Tensor:
    diff = torch.exp(logp) - torch.exp(old_logp)
    out = ((adv > 0) & (-diff > delta)) | ((adv < 0) & (diff > delta))
    return (~out).to(adv.dtype)


def gae_lambda_ignored(token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float):
    return ORIG["gae"](token_rewards, values, mask, gamma=gamma, lam=0.0)


def gae_values_off_by_one(token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float):
    return ORIG["gae"](token_rewards, torch.roll(values, 1, 1) * mask, mask, gamma=gamma, lam=lam)


def terminal_reward_at_the_first_token(rewards: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(torch.float64)
    first = m.argmax(1)
    r = torch.zeros_like(m)
    r[torch.arange(len(first)), first] = rewards.to(m.dtype)
    return r * m


MUTANTS: dict[str, tuple[str, Callable, tuple[str, ...]]] = {
    "dppo_mask_side_flipped": ("tv_mask", tv_side_flipped, ("o1[dppo]",)),
    "ppo_gae_lambda_ignored": ("gae", gae_lambda_ignored, ("o1[ppo]",)),
    "ppo_values_off_by_one": ("gae", gae_values_off_by_one, ("o1[ppo]",)),
    "ppo_reward_at_the_first_token": ("terminal_rewards", terminal_reward_at_the_first_token, ("o1[ppo]",)),
    "clip_side_flipped": ("clip_mask", clip_side_flipped, ("o6", "o1[grpo]")),
    "clip_ignored": ("clip_mask", clip_ignored, ("o6", "o1[grpo]")),
    "clip_eps_swapped": ("clip_mask", clip_eps_swapped, ("o1[dapo]", "o6")),
    "seq_normalised_as_tok": ("aggregation_weights", agg_seq_as_tok, ("o5[seq]", "o1[grpo]")),
    "const_uses_padded_width": ("aggregation_weights", agg_const_padded_width, ("o1[dr_grpo]", "acc[sft/const]")),
    "tok_counts_microbatch_tokens": ("aggregation_weights", agg_tok_microbatch_count, ("acc[sft/tok]",)),
    "zscore_without_eps": ("advantage_group_zscore", zscore_without_eps, ("o8", "o1[grpo]")),
    "zscore_population_std": ("advantage_group_zscore", zscore_population_std, ("o8", "o1[grpo]")),
    "group_center_is_raw_reward": ("advantage_group_center", center_is_raw, ("o8", "o1[dr_grpo]")),
    "loo_without_scale": ("advantage_loo", loo_without_scale, ("o1[rloo]", "o8")),
    "ratio_inverted": ("weight_ratio", ratio_inverted, ("o6", "o1[grpo]")),
    "truncation_ignored": ("weight_truncated", truncation_ignored, ("o1[cispo]",)),
    "dft_weight_is_one": ("weight_prob", prob_weight_is_one, ("o1[dft]", "o3", "o4")),
    "shaped_weight_unsquared": ("weight_shaped", shaped_weight_unsquared, ("o3", "o17")),
    "luffy_shaping_dropped": ("weight_shaped", shaping_dropped, ("o17",)),
    "group_stats_by_row_order": ("group_sum", groups_by_row_order, ("o8", "groups")),
    "mu_schedule_off_by_one": ("cosine_schedule", schedule_off_by_one, ("o18",)),
    "chord_mu_on_the_wrong_stream": ("chord", chord_mix_swapped, ("o18",)),
    "hpt_gate_inverted": ("hpt_gate", hpt_gate_inverted, ("o19",)),
    "hpt_gate_strict_inequality": ("hpt_gate", hpt_gate_strict, ("o19",)),
    "srft_entropy_sign_flipped": ("srft", srft_signs_swapped, ("srft",)),
    "rft_keeps_unverified": ("advantage_indicator", indicator_keeps_everything, ("o20",)),
    "gspo_ratio_of_sums": ("sequence_ratio", sequence_ratio_of_sums, ("o1[gspo]", "o6")),
    "kl_sign_flipped": ("kl_penalty", kl_sign_flipped, ("o1[grpo]", "o12")),
    "kl_k2_without_half": ("kl_penalty", kl_k2_without_half, ("o12",)),
    "kl_k3_ratio_detached": ("kl_penalty", kl_k3_ratio_detached, ("o12",)),
    "global_normalize_bessel": ("global_normalize", global_normalize_bessel, ("o1[reinforce_pp]", "o22")),
    "token_returns_forward_cumsum": ("token_returns", token_returns_forward, ("o1[reinforce_pp]", "o22")),
    "overlong_ramp_over_max_len": ("overlong_penalty", overlong_ramp_over_max_len, ("o21",)),
    "entropy_sign_flipped": ("entropy_from_logits", entropy_sign_flipped, ("o23",)),
}


def failing_checks(prefixes: tuple[str, ...] = ("",), first: bool = False) -> list[str]:
    """Names of the checks (among those starting with a prefix) that raise AssertionError; `first` stops
    at the first one."""
    failed = []
    for name, check in CHECKS:
        if name.startswith(prefixes):
            try:
                check()
            except AssertionError:
                failed.append(name)
                if first:
                    break
    return failed


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_oracles_catch_mutant(mutant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    component, fn, catchers = MUTANTS[mutant]
    patch(monkeypatch, component, fn)
    assert failing_checks(catchers, first=True), f"mutant {mutant} of {component} survived the checks {catchers}"


def test_every_mutant_targets_a_real_component_and_named_checks() -> None:
    for mutant, (component, _, catchers) in MUTANTS.items():
        assert component in ORIG, f"{mutant}: components has no {component}"
        assert all(any(n.startswith(c) for n, _ in CHECKS) for c in catchers), f"{mutant}: unknown check"


if __name__ == "__main__":  # the full kill matrix: every mutant against every check
    for mutant, (component, fn, _) in sorted(MUTANTS.items()):
        with pytest.MonkeyPatch.context() as mp:
            patch(mp, component, fn)
            print(f"{mutant:32s} killed by {', '.join(failing_checks()) or 'NOTHING'}")
