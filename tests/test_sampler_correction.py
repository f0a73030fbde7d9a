"""Truncated importance weights for a sampler that is not the trainer's policy (`rollout.correction`), on CPU
with synthetic mismatched sampler log-probs: the weights by hand in float64, and the trainer's gradient with
them against the textbook truncated-IS policy gradient."""
import math

import pytest
import torch
from oracle_policy import DTYPE, assert_close, grad
from trainer_path import Pool, build, scored_rows, stage

from posttrain.data.batch import ROLLOUT
from posttrain.objective.components import sampler_correction
from posttrain.recipe import RecipeError, load_recipe
from posttrain.training.experience import correct_for_sampler
from posttrain.training.update import ObjectiveSpec, batch_counts, micro_loss


def test_weights_by_hand_token_and_sequence_level():
    old = torch.tensor([[0.0, -1.0, -2.0, -0.5], [0.0, -0.3, -0.1, 0.0]], dtype=DTYPE)
    mu = torch.tensor([[0.0, -1.5, -0.2, -0.5], [0.0, -0.1, -2.0, 0.0]], dtype=DTYPE)
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]], dtype=DTYPE)
    tok = sampler_correction(old, mu, mask, level="token", cap=2.0)
    want = torch.tensor([[1.0, math.exp(0.5), math.exp(-1.8), 1.0], [1.0, math.exp(-0.2), 2.0, 1.0]], dtype=DTYPE)
    assert_close(tok, want)  # q / mu per token, capped at C = 2 (exp(1.9) > 2), 1 off the mask
    seq = sampler_correction(old, mu, mask, level="sequence", cap=2.0)
    s0, s1 = math.exp(0.5 - 1.8 + 0.0), min(math.exp(-0.2 + 1.9), 2.0)
    assert_close(seq, torch.tensor([[1.0, s0, s0, s0], [1.0, s1, s1, 1.0]], dtype=DTYPE))
    with pytest.raises(ValueError, match="token"):
        sampler_correction(old, mu, mask, level="row", cap=2.0)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_trainer_gradient_is_the_truncated_is_policy_gradient(level):
    """GRPO through the trainer's path (rows_to_batch, token_advantages, correct_for_sampler, micro_loss) with the
    sampler's log-probs off the policy's: grad = -(1/T) sum_t min(w, C) A_i grad log p_t, token mean."""
    st = stage("grpo", **{"rollout.correction": level, "rollout.correction_cap": 1.2, "aggregation": "tok",
                          "kl.beta": 0.0})
    pool = Pool.make([3, 4, 2, 3])
    part = scored_rows(pool, [(0, ROLLOUT, 0), (1, ROLLOUT, 0), (2, ROLLOUT, 1), (3, ROLLOUT, 1)], [1.0, 0.0, 0.0, 1.0])
    tb = build(st, part, pool)
    b = tb.batch
    A = b.advantages.clone()
    logp = tb.logp
    b.old_logp = logp.detach()  # on-policy: q = p at the batch
    g = torch.Generator().manual_seed(5)
    b.sampler_logp = (b.old_logp + 0.8 * torch.randn(b.old_logp.shape, generator=g, dtype=DTYPE)) * b.loss_mask
    logged = correct_for_sampler(b, level, 1.2)
    spec = ObjectiveSpec.from_stage(st)
    loss = micro_loss(logp, None, b, spec, batch_counts(b, spec)).loss
    got = grad(loss, pool.logits)

    m = b.loss_mask
    log_w = (b.old_logp - b.sampler_logp) * m
    if level == "sequence":
        log_w = log_w.sum(1, keepdim=True).expand_as(m)
    w = torch.minimum(log_w.exp(), torch.tensor(1.2, dtype=DTYPE))
    textbook = -(w * A * logp * m).sum() / m.sum()  # on-policy: grad of r_t is grad log p_t
    assert_close(got, grad(textbook, pool.logits))
    assert 0 < logged["is_truncated"] < 1 and logged["is_weight"] == pytest.approx(float((w * m).sum() / m.sum()))


def test_correction_is_refused_where_nothing_was_sampled():
    for method in ("sft", "dpo"):
        with pytest.raises(RecipeError, match="rollout.correction"):
            load_recipe({"model": "m", "stages": [{"method": method, "data": {"path": "x"},
                                                   "rollout": {"correction": "token"}}]})


def test_a_grpo_run_with_the_correction_logs_weights_near_one_for_its_own_sampler(tmp_path):
    """The built-in sampler is the policy (fp32, same temperature): q / mu = 1 up to float error, nothing
    truncated; the run logs both figures."""
    import json

    from posttrain.run import train

    train("builtin:grpo", out=tmp_path / "run", max_steps=2, progress=False,
          overrides={"stages.0.rollout.correction": "token", "stages.0.batch.size": 2, "stages.0.rollout.group_size": 2,
                     "stages.0.rollout.max_new_tokens": 8, "eval": None})
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    weights = [r["is_weight"] for r in records if "is_weight" in r]
    assert len(weights) == 2 and all(abs(w - 1) < 1e-4 for w in weights), records
    assert all(r["is_truncated"] == 0 for r in records if "is_truncated" in r)
