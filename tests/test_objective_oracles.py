"""Exact test oracles of the one estimator (research/algorithms.md §6) on a tabular softmax policy.

Each oracle is a plain `check_oN(...)` function that raises AssertionError when the property fails; the tests
below call them, and tests/test_objective_mutants.py calls them again on deliberately broken components to
prove they can fail. The library is always reached through module attributes (`C.x`, `E.estimator_loss`) so
a monkeypatched component is the one exercised.
"""
from __future__ import annotations

import math

import pytest
import torch
from oracle_policy import (DTYPE, TabularBatch, agg_seq, agg_sum, agg_tok, aggregate,
                           assert_close, center_ref, grad, grad_log_p, kl_k3_ref, log_ratio_offsets, loo_ref,
                           make_batch, ppo_clip_ref, token_logp, zscore_ref)
from torch import Tensor

import trainer_path as TP
from posttrain.data.batch import DEMO, ROLLOUT
from posttrain.objective import advantages as A
from posttrain.objective import components as C
from posttrain.objective import estimator as E
from posttrain.objective.preference import PREFERENCE_LOSSES
from posttrain.objective.presets import PRESETS, Preset

LENGTHS = [3, 5, 2, 4, 5, 1, 3, 4]  # two groups of G = 4, ragged (right padding to T = 5)
MAX_LEN = TP.MAX_LEN  # L_max of the CONST normaliser, deliberately larger than the padded width
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, -1.0, 2.0, 0.0]], dtype=DTYPE)  # (P, G)
GREEDY = torch.tensor([1.0, -0.5], dtype=DTYPE)  # (P,) ReMax: the reward of each question's greedy decode
# (preference presets have their own oracles, O13-O16: tests/test_objective_preference.py; on-policy
# distillation its reverse-KL oracle: tests/test_distill.py; the reward model tests/test_reward_model.py)
SINGLE_STREAM = sorted(n for n, p in PRESETS.items() if len(p.streams) == 1 and "verified" not in p.sources
                       and p.advantage not in PREFERENCE_LOSSES + ("bradley_terry",) and not p.distill_coef)


def flat(R: Tensor) -> tuple[Tensor, Tensor]:
    """(P, G) rewards -> flat (N,) rewards and their group ids."""
    P, G = R.shape
    return R.reshape(-1), torch.arange(P).repeat_interleave(G)


def by_group(fn, R: Tensor, **kw) -> Tensor:
    """A group-keyed advantage of (P, G) rewards, back in (P, G)."""
    r, g = flat(R)
    return fn(r, g, **kw).reshape(R.shape)


def rl_batch(seed: int = 0) -> tuple[TabularBatch, Tensor, Tensor]:
    """(batch, old_logp, ref_logp): q != p on most tokens (see LOG_RATIO_CYCLE); sequence 0 has r = 1 and
    sequence 1 has log r = 1e-4 on every token, so GSPO's tiny sequence clip leaves some sequences unclipped."""
    b = make_batch(LENGTHS, seed=seed)
    lp = b.logp.detach()
    d = log_ratio_offsets(*lp.shape)
    d[0], d[1] = 0.0, 1e-4
    ref = lp + 0.4 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=DTYPE)
    return b, lp - d, ref


def seq_to_tok(a: Tensor, mask: Tensor) -> Tensor:
    """(P, G) sequence advantages -> (N, T) on response tokens."""
    return a.reshape(-1, 1) * mask


# ---- O1: every single-stream preset's gradient and value against the paper's own loss ------------------


def trainer_o1(name: str, seed: int = 0):
    """(trainer batch, its TabularBatch, q, b) for preset `name` through the trainer's path: 8 ragged rows in two
    questions of 4 rollouts (demonstrations, one group each, for SFT/DFT); q != p on most tokens (row 0 has
    r = 1, row 1 log r = 1e-4, so GSPO's tiny sequence clip leaves some sequences unclipped)."""
    p = PRESETS[name]
    st = TP.stage(name)
    pool = TP.Pool.make(LENGTHS, seed=seed)
    demo = p.data == "demonstrations"
    spec = [(m, DEMO if demo else ROLLOUT, m if demo else m // 4) for m in range(len(LENGTHS))]
    rewards = [math.nan] * 8 if demo else REWARDS.reshape(-1).tolist()
    part = TP.scored_rows(pool, spec, rewards)
    part.scored = [not demo] * 8
    if p.advantage == "remax":  # each question's greedy decode scored GREEDY[q], as Experience leaves it
        for row in part.rows:
            row.meta["baseline"] = float(GREEDY[row.group])
    tb = TP.build(st, part, pool)
    lp = tb.logp.detach()
    d = log_ratio_offsets(*lp.shape)
    d[0], d[1] = 0.0, 1e-4
    old_logp = None if demo and p.streams["demo"].weight == "one" else (lp - d) * tb.batch.loss_mask
    ref = lp + 0.4 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=DTYPE)
    TP.with_logps(tb, st, rewards, old_logp, ref * tb.batch.loss_mask)
    return tb, st, old_logp, tb.batch.ref_logp


def reinforce_pp_advantages(k1: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Token returns (R_i - mean of its group) - beta sum_{t' >= t} k1 by a loop over each row's loss positions,
    whitened over response tokens (population std)."""
    R = REWARDS - REWARDS.mean(1, keepdim=True)
    R, A = R.reshape(-1), torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        pos = [t for t in range(mask.shape[1]) if mask[i, t]]
        for t in pos:
            A[i, t] = R[i] - beta * sum(k1[i, u] for u in pos if u >= t)
    vals = A[mask.bool()]
    return (A - vals.mean()) / (vals.std(unbiased=False) + 1e-8) * mask


def gae_ref(R: Tensor, k1: Tensor, V: Tensor, mask: Tensor, beta: float, gamma: float, lam: float) -> Tensor:
    """PPO's advantages written out: per-token rewards r_t = -beta k1_t (+ R_i at the row's last token),
    delta_t = r_t + gamma V_{t+1} - V_t (0 after the end), A_t = sum_l (gamma lam)^l delta_{t+l}, by explicit sums
    over each row's positions; then whitened over response tokens (population std)."""
    A = torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        pos = [t for t in range(mask.shape[1]) if mask[i, t]]
        r = {t: -beta * k1[i, t] + (R[i] if t == pos[-1] else 0.0) for t in pos}
        v = {t: V[i, t] for t in pos}
        delta = [r[t] + gamma * (v[pos[j + 1]] if j + 1 < len(pos) else 0.0) - v[t] for j, t in enumerate(pos)]
        for j, t in enumerate(pos):
            A[i, t] = sum((gamma * lam) ** l * delta[j + l] for l in range(len(pos) - j))
    vals = A[mask.bool()]
    return (A - vals.mean()) / (vals.std(unbiased=False) + 1e-8) * mask


def paper_loss(p: Preset, b: TabularBatch, old_logp: Tensor, ref_logp: Tensor, values: Tensor | None = None
               ) -> Tensor:
    """Each method's own value-faithful loss, written out from its paper (algorithms.md §4)."""
    m, logp = b.mask, b.logp
    if old_logp is None:
        old_logp = logp.detach()
    r = torch.exp(logp - old_logp)  # differentiable ratio
    el, eh, beta = p.eps_low, p.eps_high, p.kl_beta
    if p.name == "sft":
        return agg_tok(-logp, m)
    if p.name == "dft":
        return agg_tok(-torch.exp(logp), m)
    if p.name == "reinforce":
        return agg_sum(-seq_to_tok(REWARDS, m) * logp, m)
    if p.name == "remax":  # REINFORCE with the greedy decode's reward as baseline, sum over tokens
        return agg_sum(-seq_to_tok(REWARDS - GREEDY[:, None], m) * logp, m)
    if p.name == "rloo":  # k1 in the reward, leave-one-out baseline, clipped ratio, mean over sequences of sums
        R = REWARDS - beta * ((old_logp - ref_logp) * m).sum(1).reshape(REWARDS.shape)
        return agg_sum(-ppo_clip_ref(r, seq_to_tok(loo_ref(R), m), el, eh), m)
    if p.name == "reinforce_pp":  # the group-mean-baseline variant, as the preset says
        A = reinforce_pp_advantages(old_logp - ref_logp, m, beta)
        return agg_tok(-ppo_clip_ref(r, A, el, eh), m)
    if p.name == "psft":  # -TOK(min(r, clip(r))) on demonstrations: A = 1
        return agg_tok(-ppo_clip_ref(r, m, el, eh), m)
    if p.name == "dppo":  # -TOK(M r A): M drops tokens with |p - q| > delta in the direction A pushes them
        A = seq_to_tok(zscore_ref(REWARDS, p.std_eps), m)
        diff = torch.exp(logp.detach()) - torch.exp(old_logp)
        keep = ~(((A > 0) & (diff > p.tv_delta)) | ((A < 0) & (-diff > p.tv_delta)))
        return agg_tok(-(keep * r * A), m)
    if p.name == "ppo":  # -TOK(min(r A, clip(r) A)), A = GAE(gamma 1, lambda 1) over k1-penalised rewards
        A = gae_ref(REWARDS.reshape(-1), old_logp - ref_logp, values, m, beta, gamma=1.0, lam=1.0)
        return agg_tok(-ppo_clip_ref(r, A, el, eh), m)
    if p.name == "grpo":  # -SEQ(min(r A, clip(r) A) - beta k3)
        A = seq_to_tok(zscore_ref(REWARDS, p.std_eps), m)
        return agg_seq(-ppo_clip_ref(r, A, el, eh) + beta * kl_k3_ref(logp, ref_logp), m)
    if p.name == "dr_grpo":
        A = seq_to_tok(center_ref(REWARDS), m)
        return aggregate("const", -ppo_clip_ref(r, A, el, eh), m, MAX_LEN)
    if p.name == "dapo":
        A = seq_to_tok(zscore_ref(REWARDS, p.std_eps), m)
        return agg_tok(-ppo_clip_ref(r, A, el, eh), m)
    if p.name == "gspo":  # -(1/G) sum_i min(s_i A_i, clip(s_i) A_i)
        s = torch.exp(((logp - old_logp) * m).sum(1) / m.sum(1))
        return -ppo_clip_ref(s, zscore_ref(REWARDS, p.std_eps).reshape(-1), el, eh).mean()
    if p.name == "cispo":  # -TOK(sg(min(r, eps_max)) A logp)
        A = seq_to_tok(zscore_ref(REWARDS, p.std_eps), m)
        return agg_tok(-(r.detach().clamp(max=p.eps_max) * A * logp), m)
    if p.name == "maxrl":  # -TOK(min(r A, clip(r) A)), A = (R - mean_G R) / mean_G R
        mean = REWARDS.mean(1, keepdim=True)
        return agg_tok(-ppo_clip_ref(r, seq_to_tok((REWARDS - mean) / mean, m), el, eh), m)
    raise AssertionError(f"preset {p.name!r} has no paper loss in paper_loss(): write its loss out there")


def check_o1(name: str) -> None:
    p = PRESETS[name]
    tb, st, old_logp, ref_logp = trainer_o1(name)
    terms = TP.loss(tb, st)
    b = tb.tab()
    ref = paper_loss(p, b, old_logp, ref_logp, values=tb.batch.values)
    if p.entropy_coef:  # the bonus is aggregated like the PG term
        W = C.aggregation_weights(b.mask, p.streams[p.primary()].aggregation, num_tokens=b.num_tokens,
                                  num_seqs=len(LENGTHS), max_len=MAX_LEN)
        ref = ref - p.entropy_coef * (W * C.entropy_from_logits(b.logits)).sum()
    clipped = sum(t.clipped_tokens for t in terms.streams.values())
    if any(s.clip != "none" for s in p.streams.values()):  # the batch must exercise the clip
        assert 0 < clipped < b.num_tokens, f"{name}: {clipped} clipped tokens"
    assert_close(terms.loss.detach(), ref.detach(), f"O1 {name}: loss value != paper surrogate")
    assert_close(grad(terms.loss, tb.pool.logits), grad(ref, tb.pool.logits), f"O1 {name}: gradient != paper's")


@pytest.mark.parametrize("name", SINGLE_STREAM)
def test_every_preset_gradient_and_value_equal_its_paper_loss(name: str) -> None:
    check_o1(name)


# ---- O2-O4: SFT, DFT, SFT as a policy gradient ------------------------------------------------------


def demo_loss(b: TabularBatch, weight: str, gamma: float = 0.1) -> E.EstimatorTerms:
    m = b.mask
    W = C.aggregation_weights(m, "tok", num_tokens=b.num_tokens, num_seqs=m.shape[0], max_len=m.shape[1])
    return E.estimator_loss(b.logp, advantages=m.clone(), mask=m, agg_weights=W, weight=weight, shaping_gamma=gamma)


def check_o2() -> None:
    b = make_batch(LENGTHS, seed=3)
    terms = demo_loss(b, "one")
    assert_close(terms.loss.detach(), -b.logp.detach()[b.mask.bool()].mean(), "O2: SFT value != mean NLL")
    expected = -grad_log_p(b) * b.mask[..., None] / b.num_tokens  # -(e_y* - p) / N_tok on demo tokens
    assert_close(grad(terms.loss, b.logits), expected, "O2: SFT logit gradient")


def check_o3() -> None:
    b = make_batch(LENGTHS, seed=4)
    g_sft, g_dft = grad(demo_loss(b, "one").loss, b.logits), grad(demo_loss(b, "prob").loss, b.logits)
    p_tok = torch.exp(b.logp.detach())[..., None]  # sg(p_t) per position
    assert_close(g_dft, p_tok * g_sft, "O3: DFT token gradient != sg(p) x SFT's")
    assert_close(g_dft, grad(agg_tok(-torch.exp(b.logp), b.mask), b.logits), "O3: DFT != grad -TOK(p)")
    gamma = 1e12  # LUFFY shaping: gamma * gamma p / (p + gamma)^2 -> p as gamma -> infinity
    assert_close(gamma * grad(demo_loss(b, "shaped", gamma).loss, b.logits), g_dft, "O3: shaped limit")
    for gamma in (0.05, 0.1, 0.7):  # O17: at p == gamma the shaped weight is exactly 1/4
        w = C.weight_shaped(torch.tensor([math.log(gamma)], dtype=DTYPE), None, shaping_gamma=gamma)
        assert_close(w, torch.tensor([0.25], dtype=DTYPE), "O17: shaped weight at p = gamma")


def enumerated(vocab: int, L: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(z (L, V) leaf, every sequence (V^L, L), its token logp (V^L, L)) with the same logit row per position."""
    z = torch.randn(L, vocab, generator=torch.Generator().manual_seed(seed), dtype=DTYPE).requires_grad_(True)
    ys = torch.cartesian_prod(*[torch.arange(vocab)] * L).reshape(-1, L)
    return z, ys, token_logp(z[None].expand(len(ys), L, vocab), ys)


def check_o4(vocab: int = 3, L: int = 2) -> None:
    z, ys, logp = enumerated(vocab, L, seed=5)
    target = torch.tensor([2, 0][:L])
    hit = (ys == target).all(1).to(DTYPE)  # 1{y = y*}
    p_y = torch.exp(logp.detach().sum(1))  # p(y), the enumeration weights
    ones = torch.ones_like(logp)
    for adv, expected in ((hit / p_y, -logp[hit.bool()].sum()), (hit, -torch.exp(logp[hit.bool()].sum()))):
        terms = E.estimator_loss(logp, advantages=adv[:, None] * ones, mask=ones, agg_weights=p_y[:, None] * ones)
        assert_close(grad(terms.loss, z), grad(expected, z), "O4: enumerated PG != SFT / sequence DFT")
    if L == 1:  # without the 1/p weight: one token's DFT gradient
        b = TabularBatch(z[None], target[None], torch.ones(1, 1, dtype=DTYPE))
        terms = E.estimator_loss(logp, advantages=hit[:, None], mask=ones, agg_weights=p_y[:, None])
        assert_close(grad(terms.loss, z), grad(demo_loss(b, "prob").loss, z), "O4: PG(1{y=y*}) != DFT")


def test_sft_is_mean_nll_with_tabular_gradient() -> None:
    check_o2()


def test_dft_gradient_is_prob_weighted_sft_and_shaped_limit() -> None:
    check_o3()


@pytest.mark.parametrize("L", [1, 2])
def test_sft_is_policy_gradient_with_inverse_prob_weight(L: int) -> None:
    check_o4(L=L)


# ---- O5-O10: GRPO family ------------------------------------------------------------------------------


def rl_loss(b: TabularBatch, A: Tensor, agg: str, *, logp: Tensor | None = None, **kw) -> E.EstimatorTerms:
    m = b.mask
    W = C.aggregation_weights(m, agg, num_tokens=b.num_tokens, num_seqs=m.shape[0], max_len=MAX_LEN)
    return E.estimator_loss(b.logp if logp is None else logp, advantages=A, mask=m, agg_weights=W, **kw)


def check_o5(agg: str) -> None:
    b = make_batch(LENGTHS, seed=6)
    A = seq_to_tok(zscore_ref(REWARDS), b.mask)
    g_pg = grad(aggregate(agg, -A * b.logp, b.mask, MAX_LEN), b.logits)  # REINFORCE, same aggregation
    for eps in (1e-9, 0.2, 0.28):
        terms = rl_loss(b, A, agg, weight="ratio", clip="token", eps_low=eps, eps_high=eps)
        assert terms.ratio_sum == b.num_tokens, "O5: ratio at q = sg(p) is not exactly 1"
        assert terms.clipped_tokens == 0, f"O5: eps {eps} clipped {terms.clipped_tokens} tokens at r = 1"
        assert_close(grad(terms.loss, b.logits), g_pg, f"O5 {agg}: GRPO first step != REINFORCE")
        if agg == "seq":
            assert abs(terms.loss.item()) < 1e-6, f"O5: loss {terms.loss.item()} != -(1/G) sum A = 0"
            assert grad(terms.loss, b.logits).abs().max() > 1e-3, "O5: zero gradient at the first step"


def check_o6(eps_low: float = 0.2, eps_high: float = 0.28) -> None:
    b, old_logp, _ = rl_batch(seed=7)
    m, A = b.mask, seq_to_tok(zscore_ref(REWARDS), b.mask)
    terms = rl_loss(b, A, "tok", old_logp=old_logp, weight="ratio", clip="token", eps_low=eps_low,
                    eps_high=eps_high)
    r = torch.exp(b.logp.detach() - old_logp)
    clipped = (((A > 0) & (r > 1 + eps_high)) | ((A < 0) & (r < 1 - eps_low))) & m.bool()  # (N, T)
    assert 0 < clipped.sum() < m.sum(), "O6: the batch must hold clipped and unclipped tokens"
    g = grad(terms.loss, b.logits)
    assert torch.equal(g[clipped], torch.zeros_like(g[clipped])), "O6: clipped tokens carry gradient"
    coef = (m / b.num_tokens) * A * r * (~clipped)  # W * A * r elsewhere
    assert_close(g, -coef[..., None] * grad_log_p(b), "O6: unclipped token gradient != -W A r grad logp")
    assert terms.clipped_tokens == clipped.sum(), "O6: clipped token count"
    # sequence level (GSPO): a clipped sequence has no gradient on any of its tokens
    s = torch.exp(((b.logp.detach() - old_logp) * m).sum(1) / m.sum(1))  # (N,)
    a = zscore_ref(REWARDS).reshape(-1)
    seq_clipped = ((a > 0) & (s > 1 + 4e-4)) | ((a < 0) & (s < 1 - 3e-4))
    assert 0 < seq_clipped.sum() < len(s), "O6: the batch must hold clipped and unclipped sequences"
    g = grad(rl_loss(b, A, "seq", old_logp=old_logp, weight="seq_ratio", clip="sequence", eps_low=3e-4,
                     eps_high=4e-4).loss, b.logits)
    assert torch.equal(g[seq_clipped], torch.zeros_like(g[seq_clipped])), "O6: clipped sequence has gradient"
    coef = (m / (m.sum(1, keepdim=True) * len(s))) * (a * s * ~seq_clipped)[:, None]
    assert_close(g, -coef[..., None] * grad_log_p(b), "O6: unclipped sequence gradient")


def check_o7() -> None:
    R = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=DTYPE)
    for fn, kw in ((A.advantage_group_zscore, {"std_eps": 1e-4}), (A.advantage_group_center, {})):
        a = by_group(fn, R, **kw)
        assert torch.equal(a[[0, 2]], torch.zeros(2, 4, dtype=DTYPE)), f"O7: {fn.__name__} of an all-equal group"
    lengths = [3, 5, 2, 4, 5, 1, 3, 4, 2, 5, 4, 1]
    b = make_batch(lengths, seed=8)
    old_logp = b.logp.detach() - log_ratio_offsets(*b.mask.shape)
    kw = dict(weight="ratio", clip="token", eps_low=0.2, eps_high=0.28)
    g_all = grad(rl_loss(b, seq_to_tok(by_group(A.advantage_group_zscore, R, std_eps=1e-4), b.mask), "tok", old_logp=old_logp,
                         **kw).loss, b.logits)
    keep = torch.arange(4, 8)  # the dynamic-sampling filter keeps the one mixed group
    kb = TabularBatch(b.logits[keep], b.tokens[keep], b.mask[keep])
    terms = rl_loss(kb, seq_to_tok(by_group(A.advantage_group_zscore, R[1:2], std_eps=1e-4), kb.mask), "tok",
                    logp=token_logp(b.logits[keep], b.tokens[keep]), old_logp=old_logp[keep], **kw)
    scale = b.num_tokens / kb.num_tokens
    assert_close(grad(terms.loss, b.logits), g_all * scale, "O7: filtered != unfiltered x tokens_all/kept")
    assert g_all.abs().max() > 1e-3, "O7: the kept group must carry gradient"


def check_o8() -> None:
    R = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, -1.0, 2.0, 0.0], [3.0, 1.0, 1.0, -2.0]], dtype=DTYPE)
    G = R.shape[1]
    assert_close(by_group(A.advantage_loo, R), loo_ref(R), "O8: loo != R_i - mean of the others")
    assert_close(by_group(A.advantage_loo, R), G / (G - 1) * (R - R.mean(1, keepdim=True)),
                 "O8: loo != G/(G-1)(R - mean)")
    assert_close(by_group(A.advantage_group_center, R), center_ref(R), "O8: group_center")
    assert_close(by_group(A.advantage_group_zscore, R, std_eps=1e-4), zscore_ref(R, 1e-4),
                 "O8: zscore (Bessel std, eps 1e-4)")
    pop = (R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True, unbiased=False) + 1e-6)
    assert_close(by_group(A.advantage_group_zscore, R, std_eps=1e-6, bessel=False), pop, "O8: zscore population std")
    Rn = R.clone()
    Rn[2, 1] = float("nan")  # a masked sample: A = 0 there, statistics over the other three
    a = by_group(A.advantage_group_zscore, Rn, std_eps=1e-4)
    assert a[2, 1] == 0, "O8: masked sample must get A = 0"
    assert_close(a[2, [0, 2, 3]], zscore_ref(R[2:3, [0, 2, 3]])[0], "O8: zscore must ignore masked samples")


def check_o9() -> None:
    b = make_batch(LENGTHS, seed=9)
    A = seq_to_tok(zscore_ref(REWARDS), b.mask)
    gspo = rl_loss(b, A, "seq", weight="seq_ratio", clip="sequence", eps_low=3e-4, eps_high=4e-4)
    grpo = rl_loss(b, A, "seq", weight="ratio", clip="token", eps_low=0.2, eps_high=0.2)
    assert_close(grad(gspo.loss, b.logits), grad(grpo.loss, b.logits), "O9: GSPO != GRPO at q = sg(p)")
    assert_close(gspo.loss.detach(), grpo.loss.detach(), "O9: GSPO value != GRPO value at q = sg(p)")


def check_o10() -> None:
    b = make_batch([MAX_LEN] * 8, seed=10)
    old_logp, ref = b.logp.detach() - log_ratio_offsets(*b.mask.shape), b.logp.detach() * 0.9
    A = seq_to_tok(zscore_ref(REWARDS), b.mask)
    terms = [rl_loss(b, A, agg, old_logp=old_logp, weight="ratio", clip="token", eps_low=0.2, eps_high=0.2,
                     ref_logp=ref, kl_beta=0.04)
             for agg in ("tok", "seq", "const")]
    for t in terms[1:]:
        assert_close(t.loss.detach(), terms[0].loss.detach(), "O10: TOK / SEQ / CONST values at equal lengths")
        assert_close(grad(t.loss, b.logits), grad(terms[0].loss, b.logits), "O10: gradients at equal lengths")


@pytest.mark.parametrize("agg", ["tok", "seq", "const", "sum"])
def test_grpo_first_step_equals_reinforce(agg: str) -> None:
    check_o5(agg)


@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28)])
def test_clip_mask_zeroes_exactly_the_clipped_tokens(eps_low: float, eps_high: float) -> None:
    check_o6(eps_low, eps_high)


def test_degenerate_groups_have_zero_advantage_and_filter_rescales() -> None:
    check_o7()


def test_loo_and_zscore_definitions() -> None:
    check_o8()


def test_gspo_equals_grpo_at_first_step() -> None:
    check_o9()


def test_aggregations_agree_when_all_lengths_are_max() -> None:
    check_o10()


# ---- O12, O21-O23: regularisers and shaping ----------------------------------------------------------


def check_o12(estimator: str) -> None:
    lp = torch.tensor([-0.3, -1.2, -2.5], dtype=DTYPE, requires_grad=True)
    ref = torch.tensor([-0.9, -1.2, -0.4], dtype=DTYPE)
    delta = (lp - ref).detach()
    coeff = {"k1": torch.ones_like(delta), "k2": delta, "k3": 1 - torch.exp(-delta), "k3_ratio": delta}
    assert_close(grad(C.kl_penalty(lp, ref, estimator).sum(), lp), coeff[estimator], f"O12: {estimator} coeff")
    at_b = C.kl_penalty(lp, lp.detach(), estimator)
    assert torch.equal(at_b.detach(), torch.zeros(3, dtype=DTYPE)), f"O12: {estimator} != 0 at p == b"
    assert_close(grad(at_b.sum(), lp), torch.full((3,), float(estimator == "k1"), dtype=DTYPE),
                 f"O12: {estimator} gradient at p == b")
    z = torch.tensor([0.3, -1.0, 0.8, 0.1], dtype=DTYPE, requires_grad=True)  # one state, enumerated vocab
    zb = torch.tensor([-0.5, 0.4, 0.2, 1.1], dtype=DTYPE)
    logp, logb = torch.log_softmax(z, -1), torch.log_softmax(zb, -1)
    p, b = logp.exp(), logb.exp()
    expected = {"k1": 0 * z.sum(), "k2": (p * (logp - logb)).sum(), "k3": (b * (logb - logp)).sum()}
    expected["k3_ratio"] = expected["k2"]  # KL(p||b) for k2 and k3_ratio, KL(b||p) for k3, nothing for k1
    enumerated_grad = grad((p.detach() * C.kl_penalty(logp, logb, estimator)).sum(), z)
    assert_close(enumerated_grad, grad(expected[estimator], z), f"O12: {estimator} expected gradient")


def check_o21() -> None:
    lengths = torch.tensor([80, 90, 100, 101, 50])
    expected = torch.tensor([0.0, -0.5, -1.0, -1.0, 0.0], dtype=DTYPE)
    assert_close(C.overlong_penalty(lengths, 100, 20).to(DTYPE), expected, "O21: overlong penalty")


def check_o22() -> None:
    m = make_batch(LENGTHS, seed=11).mask
    adv = torch.randn(m.shape, generator=torch.Generator().manual_seed(12), dtype=DTYPE) * 3 + 1
    adv = torch.where(m.bool(), adv, torch.full_like(adv, 100.0))  # padding must not count
    n = m.sum()
    for eps, tol in ((0.0, 1e-12), (1e-8, 1e-7)):
        a = A.global_normalize(adv, m, eps=eps)
        mean, pop_std = (a * m).sum() / n, ((a * m) ** 2).sum().div(n).sqrt()
        assert abs(mean) < 1e-12 and abs(pop_std - 1) < tol, f"O22: mean {mean}, population std {pop_std}"
        assert torch.equal(a * (1 - m), torch.zeros_like(a)), "O22: padding must stay 0"
    k1 = torch.randn(m.shape, generator=torch.Generator().manual_seed(13), dtype=DTYPE)
    seq_adv = torch.arange(len(LENGTHS), dtype=DTYPE)
    hand = torch.zeros_like(m)
    for i, L in enumerate(LENGTHS):
        for t in range(L):
            hand[i, t] = seq_adv[i] - 0.05 * sum(k1[i, u] for u in range(t, L))
    assert_close(A.token_returns(seq_adv, k1, m, 0.05), hand, "O22: token_returns")


def check_o23(coef: float = 0.01) -> None:
    b = make_batch(LENGTHS, seed=14)
    H = C.entropy_from_logits(b.logits)  # (N, T)
    p, logp = b.probs, torch.log_softmax(b.logits.detach(), -1)
    expected = -p * (logp + H.detach()[..., None])  # dH/dz per position
    assert_close(grad(H.sum(), b.logits), expected, "O23: dH/dz != -p (log p + H)")
    A = seq_to_tok(zscore_ref(REWARDS), b.mask)
    W = C.aggregation_weights(b.mask, "seq", num_tokens=b.num_tokens, num_seqs=8, max_len=MAX_LEN)
    with_bonus = rl_loss(b, A, "seq", weight="ratio", clip="token", eps_low=0.2, eps_high=0.2, entropy=H,
                         entropy_coef=coef)
    without = rl_loss(b, A, "seq", weight="ratio", clip="token", eps_low=0.2, eps_high=0.2)
    assert_close(with_bonus.entropy, (W * H).sum().detach(), "O23: logged entropy")
    assert_close(grad(with_bonus.loss, b.logits) - grad(without.loss, b.logits),
                 -coef * grad((W * H).sum(), b.logits), "O23: entropy bonus gradient")


@pytest.mark.parametrize("estimator", C.KL_ESTIMATORS)
def test_kl_estimator_coefficients_and_expected_gradients(estimator: str) -> None:
    check_o12(estimator)


def test_overlong_penalty_ramp() -> None:
    check_o21()


def test_reinforce_pp_global_normalization_and_returns() -> None:
    check_o22()


def test_entropy_gradient_and_bonus() -> None:
    check_o23()


ALL_CHECKS = (
    [(f"o1[{n}]", lambda n=n: check_o1(n)) for n in SINGLE_STREAM]
    + [("o2", check_o2), ("o3", check_o3), ("o4[1]", lambda: check_o4(L=1)), ("o4[2]", lambda: check_o4(L=2))]
    + [(f"o5[{a}]", lambda a=a: check_o5(a)) for a in ("tok", "seq", "const", "sum")]
    + [("o6", check_o6), ("o6[sym]", lambda: check_o6(0.2, 0.2)), ("o7", check_o7), ("o8", check_o8)]
    + [("o9", check_o9), ("o10", check_o10)]
    + [(f"o12[{e}]", lambda e=e: check_o12(e)) for e in C.KL_ESTIMATORS]
    + [("o21", check_o21), ("o22", check_o22), ("o23", check_o23)]
)


def test_maxrl_advantage_on_binary_rewards_is_n_over_k_minus_one_and_zero_without_a_success():
    """k of n right: a right sample gets n/k - 1, a wrong one -1; a group with nothing right gets 0 (not NaN)."""
    R = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=DTYPE)
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    a = A.advantage_maxrl(R, g)
    assert a.tolist() == [3.0, -1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0]
