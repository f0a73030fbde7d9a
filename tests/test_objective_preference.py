"""Preference presets against their papers' formulas (research/algorithms.md §4.3; oracles O13, O14, O15), in
float64 on the tabular policy, through the trainer's path: `load_recipe` -> `pair_batch` -> `ObjectiveSpec` ->
`batch_counts` -> `micro_loss`. The references below are the textbook losses written from the papers, each
differentiated by autograd; the trainer's loss must match their value and their gradient.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle_policy import DTYPE, assert_close, token_logp
from trainer_path import Pool, stage

from posttrain.data.batch import demo_batch, mismatched, pair_batch, unpaired_batch
from posttrain.training.update import ObjectiveSpec, batch_counts, micro_loss

LENGTHS = [3, 5, 4, 2, 6, 3]  # pool rows: pairs (0, 1), (2, 3), (4, 5): chosen and rejected of unequal lengths
PAIRS = [(0, 1), (2, 3), (4, 5)]


def trainer(method: str, pool: Pool, ref: torch.Tensor | None = None, pairs=PAIRS, **overrides):
    """(loss terms, logp, batch) of the trainer on the pool's pairs; `ref` (N, T) reference log-probs."""
    st = stage(method, **overrides)
    b = pair_batch([(pool.encoded(w), pool.encoded(lo)) for w, lo in pairs], pad_id=0, dtype=DTYPE)
    b.ref_logp = ref
    sel = [m for pair in pairs for m in pair]
    logits = pool.logits[sel][:, : b.input_ids.shape[1]]
    logp = token_logp(logits, b.input_ids) * (b.attention_mask > 0)
    spec = ObjectiveSpec.from_stage(st)
    return micro_loss(logp, None, b, spec, batch_counts(b, spec)), logp, b, st


def grad(value: torch.Tensor, pool: Pool) -> torch.Tensor:
    pool.logits.grad = None
    value.backward(retain_graph=True)
    return pool.logits.grad.clone()


def sums(logp, b):
    """(s_w, s_l, n_w, n_l): summed log-probs and lengths of chosen and rejected, per pair."""
    m = b.loss_mask
    s, n = (logp * m).sum(1), m.sum(1)
    return s[0::2], s[1::2], n[0::2], n[1::2]


def textbook(method, logp, ref, b, st):
    """The paper's loss, mean over pairs, from summed or averaged log-probs (autograd differentiates it)."""
    s_w, s_l, n_w, n_l = sums(logp, b)
    p = st.preference
    if method == "dpo":  # Rafailov et al.: -log sigma(beta [(s_w - b_w) - (s_l - b_l)])
        r_w, r_l, _, _ = sums(ref, b)
        return -F.logsigmoid(p.beta * ((s_w - r_w) - (s_l - r_l))).mean()
    if method == "ipo":  # Azar et al. with TRL's length-averaged log-ratios: (h - 1/(2 tau))^2
        r_w, r_l, _, _ = sums(ref, b)
        h = (s_w - r_w) / n_w - (s_l - r_l) / n_l
        return ((h - 1 / (2 * p.beta)) ** 2).mean()
    if method == "simpo":  # Meng et al.: -log sigma(beta (avg_w - avg_l) - gamma)
        return -F.logsigmoid(p.beta * (s_w / n_w - s_l / n_l) - p.gamma).mean()
    # orpo, Hong et al.: NLL (token mean over chosen tokens) - lambda log sigma(log odds_w - log odds_l)
    a_w, a_l = s_w / n_w, s_l / n_l
    odds = lambda a: a - torch.log(1 - torch.exp(a))  # noqa: E731
    return -s_w.sum() / n_w.sum() - p.lam * F.logsigmoid(odds(a_w) - odds(a_l)).mean()


@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo", "orpo"])
def test_each_preset_has_its_textbook_losss_value_and_gradient(method):
    pool = Pool.make(LENGTHS, seed=1)
    ref = None
    if method in ("dpo", "ipo"):  # a reference away from the policy: the margins are not 0
        g = torch.Generator().manual_seed(7)
        ref_pool = Pool.make(LENGTHS, seed=1)
        with torch.no_grad():
            ref_pool.logits += 0.7 * torch.randn(ref_pool.logits.shape, generator=g, dtype=DTYPE)
        _, ref_logp, _, _ = trainer("simpo", ref_pool)
        ref = ref_logp.detach()
    terms, logp, b, st = trainer(method, pool, ref)
    expect = textbook(method, logp, ref, b, st)
    assert_close(terms.loss.detach(), expect.detach(), f"{method} value")
    assert_close(grad(terms.loss, pool), grad(expect, pool), f"{method} gradient")
    pr = terms.preference
    assert pr.margin.shape == (3,) and (pr.margin != 0).all()


def test_o13_dpo_at_init_is_half_beta_times_the_log_likelihood_gap():
    """pi == pi_ref: h = 0, loss log 2, grad = -(beta/2) mean_pairs (grad log pi(y_w) - grad log pi(y_l))."""
    pool = Pool.make(LENGTHS, seed=2)
    _, logp, _, _ = trainer("simpo", pool)
    terms, logp, b, st = trainer("dpo", pool, ref=logp.detach())
    assert_close(terms.loss.detach(), torch.tensor(torch.log(torch.tensor(2.0, dtype=DTYPE)).item(), dtype=DTYPE))
    s_w, s_l, _, _ = sums(logp, b)
    expect = -(st.preference.beta / 2) * (s_w - s_l).mean()
    assert_close(grad(terms.loss, pool), grad(expect, pool), "O13")
    assert (terms.preference.margin == 0).all()


def test_o14_ipo_at_init_is_minus_one_over_tau_times_the_averaged_gap():
    pool = Pool.make(LENGTHS, seed=3)
    _, logp, _, _ = trainer("simpo", pool)
    terms, logp, b, st = trainer("ipo", pool, ref=logp.detach())
    s_w, s_l, n_w, n_l = sums(logp, b)
    expect = -(1 / st.preference.beta) * (s_w / n_w - s_l / n_l).mean()
    assert_close(grad(terms.loss, pool), grad(expect, pool), "O14")


def test_o15_simpo_without_margin_is_length_averaged_dpo_without_reference_and_orpo_without_or_is_sft():
    pool = Pool.make(LENGTHS, seed=4)
    simpo, logp, b, st = trainer("simpo", pool, **{"preference.gamma": 0.0, "preference.beta": 0.3})
    s_w, s_l, n_w, n_l = sums(logp, b)
    expect = -F.logsigmoid(0.3 * (s_w / n_w - s_l / n_l)).mean()
    assert_close(grad(simpo.loss, pool), grad(expect, pool), "O15 simpo")
    orpo, _, _, _ = trainer("orpo", pool, **{"preference.lam": 0.0})
    # SFT's own trainer path on the chosen responses alone
    sft_st = stage("sft")
    chosen = demo_batch([pool.encoded(w) for w, _ in PAIRS], pad_id=0, dtype=DTYPE)
    logits = pool.logits[[w for w, _ in PAIRS]][:, : chosen.input_ids.shape[1]]
    sft_logp = token_logp(logits, chosen.input_ids) * (chosen.attention_mask > 0)
    spec = ObjectiveSpec.from_stage(sft_st)
    sft = micro_loss(sft_logp, None, chosen, spec, batch_counts(chosen, spec))
    assert_close(grad(orpo.loss, pool), grad(sft.loss, pool), "O15 orpo")
    assert_close(orpo.loss.detach(), sft.loss.detach())


def test_pairs_split_over_micro_batches_give_the_whole_batchs_gradient():
    """Normalisers (pairs, chosen tokens) count the whole step: two micro-batches sum to the one-batch loss."""
    for method in ("orpo", "simpo"):
        pool = Pool.make(LENGTHS, seed=5)
        whole, _, b, st = trainer(method, pool)
        spec = ObjectiveSpec.from_stage(st)
        counts = batch_counts(b, spec)
        total = 0
        for rows in b.split(2):
            mb = b.select(rows)
            sel = [[m for pair in PAIRS for m in pair][i] for i in rows.tolist()]
            logits = pool.logits[sel][:, : mb.input_ids.shape[1]]
            total = total + micro_loss(token_logp(logits, mb.input_ids) * (mb.attention_mask > 0), None, mb, spec,
                                       counts).loss
        assert len(b.split(2)) == 3
        assert_close(grad(total, pool), grad(whole.loss, pool), method)


def test_a_mutated_sign_or_normaliser_is_caught():
    """The oracle above fails on a plausible bug: the rejected sign flipped, or the pair count halved."""
    import posttrain.objective.preference as P

    pool = Pool.make(LENGTHS, seed=1)
    terms, logp, b, st = trainer("simpo", pool)
    good = grad(terms.loss, pool)
    b.pair_sign = -b.pair_sign  # chosen and rejected swapped
    spec = ObjectiveSpec.from_stage(st)
    swapped = micro_loss(logp, None, b, spec, batch_counts(b, spec))
    assert not torch.allclose(grad(swapped.loss, pool), good)
    b.pair_sign = -b.pair_sign
    counts = batch_counts(b, spec)
    key = next(iter(spec.streams))
    counts[key] = (counts[key][0], counts[key][1] * 2)
    halved = micro_loss(logp, None, b, spec, counts)
    assert not torch.allclose(grad(halved.loss, pool), good)
    with pytest.raises(ValueError, match="one chosen and one rejected row"):
        P.pair_index(torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 1.0, 1.0, -1.0]))


# ---- KTO: unpaired responses against the batch's reference point --------------------------------------------

LABELS = [True, False, True, True, False, False]


def kto_trainer(pool: Pool, ref: torch.Tensor, z0: float, **overrides):
    st = stage("kto", **overrides)
    b = unpaired_batch([(pool.encoded(m), good) for m, good in enumerate(LABELS)], pad_id=0, dtype=DTYPE)
    b.ref_logp, b.ref_point = ref, torch.full((b.size,), z0, dtype=DTYPE)
    logits = pool.logits[: b.size][:, : b.input_ids.shape[1]]
    logp = token_logp(logits, b.input_ids) * (b.attention_mask > 0)
    spec = ObjectiveSpec.from_stage(st)
    return micro_loss(logp, None, b, spec, batch_counts(b, spec)), logp, b, st


def test_kto_has_its_textbook_losss_value_and_gradient_and_o16_at_init():
    """Ethayarajh et al. / TRL: lam_D (1 - sigma(beta (r - z0))) for desirable, lam_U (1 - sigma(beta (z0 - r)))
    for undesirable responses, mean over rows; at init (r = 0, z0 = 0) the gradient is -lam_D (beta/4) grad log
    pi(y) for desirable and +lam_U (beta/4) grad log pi(y) for undesirable rows (O16)."""
    pool = Pool.make(LENGTHS, seed=6)
    ref_pool = Pool.make(LENGTHS, seed=6)
    with torch.no_grad():
        ref_pool.logits += 0.5 * torch.randn(ref_pool.logits.shape, generator=torch.Generator().manual_seed(3),
                                             dtype=DTYPE)
    zeros = torch.zeros(len(LABELS), max(LENGTHS) + 1, dtype=DTYPE)
    _, ref, _, _ = kto_trainer(ref_pool, zeros, 0.0)
    ref = ref.detach()
    over = {"preference.desirable_weight": 1.5, "preference.undesirable_weight": 0.7, "preference.beta": 0.3}
    terms, logp, b, st = kto_trainer(pool, ref, 0.2, **over)
    m, good = b.loss_mask, torch.tensor(LABELS)
    r = ((logp - ref) * m).sum(1)
    u = torch.where(good, 0.3 * (r - 0.2), 0.3 * (0.2 - r))
    lam = torch.where(good, torch.tensor(1.5, dtype=DTYPE), torch.tensor(0.7, dtype=DTYPE))
    expect = (lam * (1 - torch.sigmoid(u))).mean()
    assert_close(terms.loss.detach(), expect.detach(), "kto value")
    assert_close(grad(terms.loss, pool), grad(expect, pool), "kto gradient")
    _, own, _, _ = kto_trainer(pool, zeros, 0.0, **over)
    init, logp, b, st = kto_trainer(pool, own.detach(), 0.0, **over)  # the reference is the policy itself
    s = (logp * b.loss_mask).sum(1)
    o16 = (-(1.5 * 0.3 / 4) * s[good].sum() + (0.7 * 0.3 / 4) * s[~good].sum()) / len(LABELS)
    assert_close(grad(init.loss, pool), grad(o16, pool), "O16")
    assert_close(init.loss.detach(), torch.tensor(0.5 * (1.5 * 3 + 0.7 * 3) / 6, dtype=DTYPE))


def test_kto_reference_point_is_the_clamped_mean_kl_of_mismatched_pairs():
    """Experience.reference_point: prompt i with response i + 1, sum (log pi - log pi_ref), mean, clamped at 0."""
    from types import SimpleNamespace

    from posttrain.data.encode import Encoded
    from posttrain.training.experience import Experience

    items = [(Encoded([1, 2, 3, 4], [0, 0, 1, 1]), True), (Encoded([5, 6, 7], [0, 1, 1]), False),
             (Encoded([8, 9, 10, 11, 12], [0, 0, 0, 1, 1]), True)]
    mis = mismatched(items)
    assert [e.input_ids for e in mis] == [[1, 2, 6, 7], [5, 11, 12], [8, 9, 10, 3, 4]]
    assert [e.loss_mask for e in mis] == [[0, 0, 1, 1], [0, 1, 1], [0, 0, 0, 1, 1]]
    exp = Experience.__new__(Experience)

    def fake_logp(model, batch, temperature=None):
        return batch.input_ids.to(torch.float32) * (0.1 if model == "policy" else 0.05)

    exp._logp, exp.pad_id, exp.ref_model = fake_logp, 0, "ref"
    kl = [0.05 * (6 + 7), 0.05 * (11 + 12), 0.05 * (3 + 4)]
    assert exp.reference_point("policy", items) == pytest.approx(sum(kl) / 3)
    exp._logp = lambda model, batch, temperature=None: batch.input_ids.float() * (0.05 if model == "p" else 0.1)
    assert exp.reference_point("p", items) == 0.0  # a negative mean is clamped
