"""Oracles O17-O20 and the other hybrids, in float64 through the trainer's own path (tests/trainer_path.py):
the recipe resolution, the experience builder's gates and mixers, advantages by group id, and `micro_loss`.

Each `check_*` raises AssertionError when its property fails; tests/test_objective_mutants.py runs them
again against broken components (gate inverted, shaping dropped, mu schedule off by one, ...).
"""
from __future__ import annotations

import math

import pytest
import torch
import trainer_path as TP
from oracle_policy import DTYPE, agg_tok, assert_close, grad, log_ratio_offsets, ppo_clip_ref, token_logp
from torch import Tensor

from posttrain.data.batch import DEMO, ROLLOUT, Row
from posttrain.objective import components as C
from posttrain.objective import mixers as MX
from posttrain.training.assembly import _Rows
from posttrain.training.rejection import verified
from posttrain.training.sources import Demonstrations

LENGTHS = [3, 5, 2, 4, 5, 1, 3, 4, 4, 2]
MAX_LEN = TP.MAX_LEN


def old_logp_for(tb: TP.TrainerBatch) -> Tensor:
    """q != p on rollout tokens (clip exercised), q = p elsewhere."""
    lp = tb.logp.detach()
    own = tb.batch.loss_mask * (tb.batch.token_stream() == ROLLOUT)
    return lp - log_ratio_offsets(*lp.shape) * own


def zscore(R: Tensor, eps: float = 1e-4) -> Tensor:
    return (R - R.mean()) / (R.std() + eps)


def grads_equal(a: Tensor, b: Tensor, logits: Tensor, msg: str) -> None:
    assert_close(grad(a, logits), grad(b, logits), msg)


# ---- O17: LUFFY ------------------------------------------------------------------------------------------


def luffy_batch(entropy: float = 0.001):
    """Two questions: 3 rollouts + 1 demonstration each (demonstrations scored and inside their group)."""
    st = TP.stage("luffy", **{"entropy.coef": entropy})
    pool = TP.Pool.make(LENGTHS, seed=1)
    spec = [(0, ROLLOUT, 0), (1, ROLLOUT, 0), (2, ROLLOUT, 0), (3, DEMO, 0),
            (4, ROLLOUT, 1), (5, ROLLOUT, 1), (6, ROLLOUT, 1), (7, DEMO, 1)]
    rewards = [0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    tb = TP.build(st, TP.scored_rows(pool, spec, rewards), pool)
    tb.batch.old_logp = old_logp_for(tb)
    return st, tb, torch.tensor(rewards, dtype=DTYPE)


def check_o17() -> None:
    st, tb, R = luffy_batch()
    b, m = tb.tab(), tb.batch.loss_mask
    demo = (tb.batch.stream == DEMO)[:, None].to(DTYPE) * m
    own = m - demo
    A = torch.cat([zscore(R[:4]), zscore(R[4:])])[:, None] * m  # over the mixed group, demo included
    r = torch.exp(b.logp - tb.batch.old_logp)
    p = torch.exp(b.logp)
    g = st.shaping_gamma
    paper = agg_tok(-ppo_clip_ref(r, A, 0.2, 0.2) * own - A * (p / (p + g)) * demo, m)  # one token mean
    paper = paper - 0.001 * agg_tok(C.entropy_from_logits(b.logits), m)
    terms = TP.loss(tb, st)
    assert_close(terms.loss.detach(), paper.detach(), "O17: LUFFY value != its loss")
    grads_equal(terms.loss, paper, tb.pool.logits, "O17: LUFFY gradient != its loss's")
    # the demonstration-token coefficient is exactly A gamma p / (p + gamma)^2
    st0, tb0, _ = luffy_batch(entropy=0.0)
    gz = grad(TP.loss(tb0, st0).loss, tb0.pool.logits)[tb0.sel][:, : m.shape[1]]  # (N, T, V) per batch row
    b0 = tb0.tab()
    p0 = torch.exp(b0.logp.detach())
    coef = A * g * p0 / (p0 + g) ** 2 / m.sum()  # (N, T)
    onehot = torch.nn.functional.one_hot(b0.tokens, b0.logits.shape[-1]).to(DTYPE)
    expected = -(coef * demo)[..., None] * (onehot - b0.probs)
    assert_close(gz * demo[..., None], expected, "O17: demonstration-token coefficient != A g p/(p+g)^2")


# ---- O18: CHORD --------------------------------------------------------------------------------------------


def chord_batch(method: str, mu: float | None = None, step: int = 0, values: dict | None = None):
    """Two questions of 4 rollouts, plus round(0.2 * 8) = 2 expert rows from the demonstrations source."""
    over = {} if mu is None else {"mix.mu_peak": mu, "mix.mu_valley": mu}
    st = TP.stage(method, **over)
    pool = TP.Pool.make(LENGTHS, seed=2)
    exp = TP.experience(st, pool)
    exp.demos = Demonstrations([pool.encoded(8), pool.encoded(9)], seed=0)
    spec = [(m, ROLLOUT, m // 4) for m in range(8)]
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, -1.0, 2.0, 0.0]
    part = TP.scored_rows(pool, spec, rewards)
    tb = TP.build(st, part, pool, exp=exp, step=step, values=values)
    by_tokens = {tuple(pool.tokens[m, : pool.lengths[m] + 1].tolist()): m for m in (8, 9)}
    tb.sel = [r.meta["tab"] if "tab" in r.meta else by_tokens[tuple(r.input_ids)] for r in part.rows]
    tb.batch.old_logp = old_logp_for(tb)
    return st, tb


def rl_only(method: str, pool_seed: int, rewards: list[float], rows: list[tuple[int, int, int]], old_from=None,
            **over):
    """The same rollouts through another preset (the RL limit of a hybrid)."""
    st = TP.stage(method, **over)
    pool = old_from.pool if old_from is not None else TP.Pool.make(LENGTHS, seed=pool_seed)
    tb = TP.build(st, TP.scored_rows(pool, rows, rewards), pool)
    tb.batch.old_logp = old_logp_for(tb)
    return st, tb


def check_o18() -> None:
    # mu = 1, phi off: CHORD == the SFT preset on its expert rows
    st, tb = chord_batch("chord_mu", mu=1.0)
    demo_rows = [i for i, s in enumerate(tb.batch.stream.tolist()) if s == DEMO]
    assert len(demo_rows) == 2, "O18: 20% of 8 rollout rows is 2 expert rows"
    sft = TP.stage("sft")
    tb_sft = TP.build(sft, TP.demo_rows(tb.pool, [tb.sel[i] for i in demo_rows]), tb.pool)
    grads_equal(TP.loss(tb, st).loss, TP.loss(tb_sft, sft).loss, tb.pool.logits, "O18: CHORD mu=1 != SFT")
    # mu = 0: CHORD == its RL part, GRPO with a token mean and no KL
    st0, tb0 = chord_batch("chord_mu", mu=0.0)
    rows = [(m, ROLLOUT, m // 4) for m in range(8)]
    st_rl, tb_rl = rl_only("grpo", 2, [1.0, 0.0, 0.0, 1.0, 0.5, -1.0, 2.0, 0.0], rows, old_from=tb0,
                           **{"aggregation": "tok", "kl.beta": 0.0})
    grads_equal(TP.loss(tb0, st0).loss, TP.loss(tb_rl, st_rl).loss, tb0.pool.logits, "O18: CHORD mu=0 != GRPO")
    # phi = p (1 - p) peaks at p = 0.5 with value 1/4
    assert_close(C.weight_phi(torch.tensor([math.log(0.5)], dtype=DTYPE), None),
                 torch.tensor([0.25], dtype=DTYPE), "O18: phi(0.5) != 1/4")
    # the mu schedule the trainer logs, with the preset's constants (0.9 -> 0.05 over 200 steps, no warm-up)
    for step, expected in ((0, 0.9), (100, 0.475), (200, 0.05), (250, 0.05)):
        values: dict = {}
        chord_batch("chord_mu", step=step, values=values)
        assert abs(values["mu"] - expected) < 1e-12, f"O18: mu({step}) = {values['mu']} != {expected}"
    W, D, hi, lo = 10, 40, 0.8, 0.2
    assert MX.cosine_schedule(0, start=hi, end=lo, warmup=W, decay=D) == 0.0, "O18: mu(0) with a warm-up != 0"
    assert abs(MX.cosine_schedule(W + D // 2, start=hi, end=lo, warmup=W, decay=D) - (hi + lo) / 2) < 1e-12
    assert MX.cosine_schedule(W + D, start=hi, end=lo, warmup=W, decay=D) == lo


# ---- O19: HPT ----------------------------------------------------------------------------------------------


HPT_ROWS = [(m, ROLLOUT, m // 4) for m in range(8)]
HPT_REWARDS = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]  # question 0: all wrong; question 1: 2 of 4 right


def hpt_batch(gamma: float, sft_coef: float = 0.7, entropy: float = 0.0, values: dict | None = None):
    st = TP.stage("hpt", **{"mix.hpt_gamma": gamma, "mix.sft_coef": sft_coef, "entropy.coef": entropy})
    pool = TP.Pool.make(LENGTHS, seed=3)
    tb = TP.build(st, TP.scored_rows(pool, HPT_ROWS, HPT_REWARDS), pool, demo_rows={0: 8, 1: 9}, values=values)
    tb.batch.old_logp = old_logp_for(tb)
    return st, tb


def check_o19() -> None:
    # gamma < 0 never switches: HPT == the RL preset (Dr. GRPO components, HPT's entropy bonus) exactly
    st, tb = hpt_batch(-1.0, entropy=0.001)
    assert tb.batch.size == 8 and bool((tb.batch.mix == 1).all()), "O19: gamma < 0 switched a question"
    st_rl, tb_rl = rl_only("dr_grpo", 3, HPT_REWARDS, HPT_ROWS, old_from=tb, **{"entropy.coef": 0.001})
    a, b = TP.loss(tb, st).loss, TP.loss(tb_rl, st_rl).loss
    assert_close(a.detach(), b.detach(), "O19: HPT(gamma < 0) value != RL")
    grads_equal(a, b, tb.pool.logits, "O19: HPT(gamma < 0) != RL")
    # gamma = 0 (SuperRL): grad(HPT) - grad(RL) == c_sft * grad(SFT on the all-wrong question's demonstration)
    values: dict = {}
    st0, tb0 = hpt_batch(0.0, values=values)
    demo = [i for i, s in enumerate(tb0.batch.stream.tolist()) if s == DEMO]
    assert [tb0.sel[i] for i in demo] == [8], f"O19: switched demos {[tb0.sel[i] for i in demo]} != question 0's"
    assert values["switch_frac"] == 0.5
    st_rl, tb_rl = rl_only("dr_grpo", 3, HPT_REWARDS, HPT_ROWS, old_from=tb0)
    sft = TP.stage("sft")
    tb_sft = TP.build(sft, TP.demo_rows(tb0.pool, [8]), tb0.pool)
    diff = grad(TP.loss(tb0, st0).loss, tb0.pool.logits) - grad(TP.loss(tb_rl, st_rl).loss, tb0.pool.logits)
    assert_close(diff, 0.7 * grad(TP.loss(tb_sft, sft).loss, tb0.pool.logits), "O19: HPT(0) - RL != c_sft SFT")
    # the rule: SFT iff k / n <= gamma (question 1 has 2 of 4 right)
    for gamma, switched in ((0.49, [8]), (0.5, [8, 9])):
        st_g, tb_g = hpt_batch(gamma)
        demo = sorted(tb_g.sel[i] for i, s in enumerate(tb_g.batch.stream.tolist()) if s == DEMO)
        assert demo == switched, f"O19: gamma {gamma} switched {demo}, expected {switched}"


# ---- O20: RFT ----------------------------------------------------------------------------------------------


def check_o20() -> None:
    """TOK-RFT gradient == REINFORCE(A = 1{correct}, no baseline, TOK over every sampled token) x all/kept."""
    pool = TP.Pool.make(LENGTHS[:8], seed=4)
    rewards = [1.0, 0.0, 1.0, 0.2, 1.0, 0.0, 0.0, 1.0]
    rows = [pool.row(m, ROLLOUT, m // 4, key=m // 4) for m in range(8)]
    kept = verified(rows, rewards, 1.0, set())
    assert [r.meta["tab"] for r, _ in kept] == [0, 2, 4, 7], "O20: the verified set != {R >= 1}"
    st = TP.stage("rft")
    part = _Rows()
    for i, (row, _) in enumerate(kept):  # what the pool serves: the verified samples as demonstrations
        part.rows.append(Row(row.input_ids, row.loss_mask, DEMO, i, meta=row.meta))
        part.rewards.append(math.nan)
        part.scored.append(False)
        part.free.append(False)
    tb_rft = TP.build(st, part, pool)
    st_pg = TP.stage("reinforce", **{"advantage.kind": "indicator", "aggregation": "tok"})
    tb_pg = TP.build(st_pg, TP.scored_rows(pool, [(m, ROLLOUT, m // 4) for m in range(8)], rewards), pool)
    tokens_all = float(tb_pg.batch.loss_mask.sum())
    tokens_kept = float(tb_rft.batch.loss_mask.sum())
    assert_close(grad(TP.loss(tb_rft, st).loss, pool.logits),
                 grad(TP.loss(tb_pg, st_pg).loss, pool.logits) * tokens_all / tokens_kept, "O20: RFT != REINFORCE")


# ---- SRFT, ReLIFT, prefix-guided RL --------------------------------------------------------------------------


def check_srft() -> None:
    st = TP.stage("srft")
    pool = TP.Pool.make(LENGTHS, seed=5)
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    tb = TP.build(st, TP.scored_rows(pool, [(m, ROLLOUT, m // 4) for m in range(8)], rewards), pool,
                  demo_rows={0: 8, 1: 9})
    tb.batch.old_logp = old_logp_for(tb)
    assert sorted(tb.sel[i] for i, s in enumerate(tb.batch.stream.tolist()) if s == DEMO) == [8, 9]
    b, m = tb.tab(), tb.batch.loss_mask
    demo = (tb.batch.stream == DEMO)[:, None].to(DTYPE) * m
    own = m - demo
    H = C.entropy_from_logits(b.logits).detach()
    row_h = (H * m).sum(1) / m.sum(1)
    R = torch.tensor(rewards, dtype=DTYPE)
    A_roll = torch.cat([R[:4] - R[:4].mean(), R[4:] - R[4:].mean()])
    A = torch.cat([A_roll, torch.zeros(2, dtype=DTYPE)])[:, None] * own
    positive = torch.cat([A_roll, torch.zeros(2, dtype=DTYPE)]) > 0
    w_row = torch.where(tb.batch.stream == DEMO, 0.5 * torch.exp(-row_h),
                        torch.where(positive, 0.1 * torch.exp(row_h), torch.ones_like(row_h)))[:, None]
    r = torch.exp(b.logp - tb.batch.old_logp)
    paper = agg_tok(-w_row * ppo_clip_ref(r, A, 0.2, 0.2), own) + agg_tok(-w_row * b.logp, demo)
    grads_equal(TP.loss(tb, st).loss, paper, tb.pool.logits, "SRFT: gradient != entropy-weighted SFT + RL")


def check_relift() -> None:
    """A question whose rollouts all fail enters the buffer; a full buffer adds its SFT term (sft_coef x token
    mean NLL of the buffered demonstrations) to that step's RL loss."""
    st = TP.stage("relift", **{"sources.buffer_size": 1, "mix.sft_coef": 0.5})
    pool = TP.Pool.make(LENGTHS, seed=6)
    rows = [(m, ROLLOUT, m // 4) for m in range(8)]
    rewards = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    exp = TP.experience(st, pool, {0: 8, 1: 9})
    values: dict = {}
    tb = TP.build(st, TP.scored_rows(pool, rows, rewards), pool, exp=exp, demo_rows={0: 8, 1: 9}, values=values)
    tb.batch.old_logp = old_logp_for(tb)
    assert [tb.sel[i] for i, s in enumerate(tb.batch.stream.tolist()) if s == DEMO] == [8]
    assert exp.buffer.keys == [] and values["buffer_sft"] == 1.0
    st_rl, tb_rl = rl_only("grpo", 6, rewards, rows, old_from=tb, **{"kl.beta": 0.0})
    sft = TP.stage("sft")
    tb_sft = TP.build(sft, TP.demo_rows(pool, [8]), pool)
    diff = grad(TP.loss(tb, st).loss, pool.logits) - grad(TP.loss(tb_rl, st_rl).loss, pool.logits)
    assert_close(diff, 0.5 * grad(TP.loss(tb_sft, sft).loss, pool.logits), "ReLIFT: RL + SFT(buffer)")


def check_prefix() -> None:
    """Prefix tokens carry the row's advantage with weight 1, own tokens the clipped ratio; one CONST normaliser."""
    st = TP.stage("prefix_rft")
    pool = TP.Pool.make(LENGTHS[:8], seed=7)
    part = TP.scored_rows(pool, [(m, ROLLOUT, m // 4) for m in range(8)], [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    for m in (2, 3, 6):  # rows continuing a demonstration prefix of 2 tokens
        part.rows[m].prefix_len = 2
        part.free[m] = False
    tb = TP.build(st, part, pool)
    tb.batch.old_logp = old_logp_for(tb)
    b, m = tb.tab(), tb.batch.loss_mask
    pre = tb.batch.prefix_mask.to(DTYPE)
    assert pre.sum() == 6, "prefix: three rows with 2 copied tokens each"
    own = m - pre
    R = torch.tensor(part.rewards, dtype=DTYPE)
    A = torch.cat([R[:4] - R[:4].mean(), R[4:] - R[4:].mean()])[:, None] * m
    r = torch.exp(b.logp - tb.batch.old_logp)
    paper = (-(ppo_clip_ref(r, A, 0.2, 0.2) * own) - A * b.logp * pre).sum() / (8 * MAX_LEN)
    terms = TP.loss(tb, st)
    assert_close(terms.loss.detach(), paper.detach(), "prefix: value")
    grads_equal(terms.loss, paper, pool.logits, "prefix: gradient")


# ---- groups come from ids, not row order ------------------------------------------------------------------


def check_groups() -> None:
    """Rows of a question scattered through the batch: the same loss as contiguous groups; micro-batch and
    minibatch splits keep groups whole and accumulate to the whole batch's gradient (1e-9)."""
    st = TP.stage("grpo")
    pool = TP.Pool.make(LENGTHS[:8], seed=8)
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, -1.0, 2.0, 0.0]
    tb = TP.build(st, TP.scored_rows(pool, [(m, ROLLOUT, m // 4) for m in range(8)], rewards), pool)
    order = [0, 4, 1, 5, 2, 6, 3, 7]
    tb2 = TP.build(st, TP.scored_rows(pool, [(m, ROLLOUT, m // 4) for m in order], [rewards[m] for m in order]),
                   pool)
    for t in (tb, tb2):
        t.batch.ref_logp = t.logp.detach() * 0.9
    assert_close(tb2.batch.advantages, tb.batch.advantages[order], "groups: advantages depend on row order")
    whole = TP.loss(tb2, st).loss
    grads_equal(whole, TP.loss(tb, st).loss, pool.logits, "groups: loss depends on row order")
    for parts in (tb2.batch.split(3), tb2.batch.minibatches(2, torch.Generator().manual_seed(0))):
        for rows in parts:
            g = tb2.batch.group[rows]
            assert all(int((g == x).sum()) == int((tb2.batch.group == x).sum()) for x in g.tolist()), \
                "groups: a split cut a group"
    from posttrain.objective.estimator import stream_counts
    from posttrain.training.update import ObjectiveSpec, micro_loss

    spec = ObjectiveSpec.from_stage(st)
    b = tb2.batch
    counts = stream_counts(b.loss_mask, b.token_stream(), spec.streams, joint=spec.joint)
    acc = torch.zeros_like(pool.logits)
    for rows in b.split(3):
        mb = b.select(rows)
        sel = [tb2.sel[i] for i in rows.tolist()]
        lp = token_logp(pool.logits[sel][:, : mb.input_ids.shape[1]], mb.input_ids) * (mb.attention_mask > 0)
        acc = acc + grad(micro_loss(lp, None, mb, spec, counts).loss, pool.logits)
    assert_close(acc, grad(whole, pool.logits), "groups: accumulated micro-batches != whole batch")


HYBRID_CHECKS = [("o17", check_o17), ("o18", check_o18), ("o19", check_o19), ("o20", check_o20),
                 ("srft", check_srft), ("relift", check_relift), ("prefix", check_prefix), ("groups", check_groups)]


@pytest.mark.parametrize("name,check", HYBRID_CHECKS, ids=[n for n, _ in HYBRID_CHECKS])
def test_hybrid_oracle(name, check) -> None:
    check()
