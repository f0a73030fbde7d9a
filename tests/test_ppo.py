"""PPO with a value model: GAE (oracle O11), the clipped value loss, the critic's alignment with the tokens, and a
PPO stage end to end (the critic learns, its state survives a checkpoint: tests/test_resume.py family `ppo`).
The preset's policy gradient against its paper loss is in test_objective_oracles.py (O1, `ppo`)."""
from __future__ import annotations

import json

import pytest
import torch
from test_train_e2e import metrics, model_dirs  # noqa: F401  (model_dirs: a fixture)

import posttrain
from posttrain.objective.advantages import gae, terminal_rewards
from posttrain.objective.components import value_loss
from posttrain.recipe import RecipeError, load_recipe
from posttrain.reward_model import from_policy, token_values

D = torch.float64


def ragged(seed=0):
    """(token rewards, values, mask): 3 rows whose response spans start after a prompt and end at different places."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(3, 9, dtype=D)
    for i, (a, b) in enumerate([(2, 9), (3, 6), (1, 4)]):
        mask[i, a:b] = 1
    return torch.randn(3, 9, generator=g, dtype=D) * mask, torch.randn(3, 9, generator=g, dtype=D) * mask, mask


def test_gae_with_lambda_1_is_the_return_minus_the_value_and_with_lambda_0_the_td_error():  # O11
    r, V, m = ragged()
    A1, G1 = gae(r, V, m, gamma=1.0, lam=1.0)
    togo = r.flip(1).cumsum(1).flip(1)  # sum_{k >= t} r_k (0 outside the span, so sums past its end add 0)
    torch.testing.assert_close(A1, (togo - V) * m)
    torch.testing.assert_close(G1, togo * m)  # the returns are the rewards to go
    A0, _ = gae(r, V, m, gamma=1.0, lam=0.0)
    V_next = torch.roll(V, -1, 1) * torch.roll(m, -1, 1)  # V(s_{t+1}), 0 after each row's last token
    torch.testing.assert_close(A0, (r + V_next - V) * m)
    Ag, _ = gae(r, V, m, gamma=0.5, lam=0.5)  # a discount: the last token's advantage is its own TD error
    last = [8, 5, 3]
    for i, t in enumerate(last):
        assert float(Ag[i, t]) == pytest.approx(float(r[i, t] - V[i, t]))
        assert float(Ag[i, t - 1]) == pytest.approx(float(r[i, t - 1] + 0.5 * V[i, t] - V[i, t - 1]
                                                          + 0.25 * (r[i, t] - V[i, t])))


def test_with_no_critic_no_kl_no_whitening_and_lambda_1_ppos_advantage_is_the_sequence_reward_on_every_token():  # O11
    _, _, m = ragged()
    R = torch.tensor([1.0, -0.5, 2.0], dtype=D)
    A, _ = gae(terminal_rewards(R, m), torch.zeros_like(m), m, gamma=1.0, lam=1.0)
    torch.testing.assert_close(A, R[:, None] * m)  # REINFORCE's A = R under TOK


def test_the_clipped_value_loss_takes_the_larger_error_and_its_gradient_flows_only_through_the_unclipped_side():
    V = torch.tensor([[0.0, 1.0, 0.5, 0.9]], dtype=D, requires_grad=True)
    V_old = torch.tensor([[0.0, 0.5, 0.5, 0.5]], dtype=D)
    G = torch.tensor([[0.0, 2.0, 0.0, 0.0]], dtype=D)
    m = torch.tensor([[0.0, 1.0, 1.0, 1.0]], dtype=D)
    loss, clipped = value_loss(V, V_old, G, m, clip=0.2, tokens=3.0)
    # t=1: (1-2)^2 = 1 vs (0.7-2)^2 = 1.69 -> clipped; t=2: 0.25 both; t=3: 0.81 vs (0.7)^2 = 0.49 -> unclipped
    assert float(loss.detach()) == pytest.approx(0.5 * (1.69 + 0.25 + 0.81) / 3)
    assert float(clipped) == 1.0
    loss.backward()
    torch.testing.assert_close(V.grad, torch.tensor([[0.0, 0.0, 0.5 / 3, 0.9 / 3]], dtype=D))
    plain, _ = value_loss(V, V_old, G, m, clip=None, tokens=3.0)
    assert float(plain.detach()) == pytest.approx(0.5 * (1.0 + 0.25 + 0.81) / 3)


def test_a_critics_value_at_token_t_reads_only_the_tokens_before_t(make_model, tokenizer_with_pad):
    critic = from_policy(make_model("llama", dtype=D), tokenizer_with_pad.pad_token_id).eval()
    ids = torch.randint(5, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    att = torch.ones_like(ids)
    att[1, 5:] = 0
    v = token_values(critic, ids, att)
    assert v.shape == ids.shape and float(v[0, 0]) == 0.0 and bool((v[1, 5:] == 0).all())
    changed = ids.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 60
    w = token_values(critic, changed, att)
    torch.testing.assert_close(w[:, :5], v[:, :5])  # V(s_t) for t <= 4 does not see token 4
    assert not torch.allclose(w[0, 5:], v[0, 5:])


def _critic_learns_on_its_batch(recs: list[dict]) -> bool:
    """The first batch's 4 updates (2 epochs x 2 minibatches): the value error over its rows is lower in the second
    epoch, after the critic's first two steps, than in the first (seeds 0-4, separate and shared critic: by 7-24 %).
    Records of different batches are no test: the returns' spread changes from batch to batch."""
    mse = [r["value_mse"] for r in recs[:4]]
    return (mse[2] + mse[3]) < (mse[0] + mse[1])


def test_a_ppo_stage_trains_its_critic_beside_the_policy(tmp_path, model_dirs):
    rows = [{"prompt": f"Say {c}.", "answer": c} for c in "ABCDEFGH"]
    r = {"model": model_dirs["llama"], "device": "cpu", "seed": 0, "stages": [
        {"method": "ppo", "data": {}, "steps": 6, "batch": {"size": 4}, "ppo_epochs": 2, "minibatches": 2,
         "rollout": {"group_size": 2, "max_new_tokens": 4}, "optim": {"lr": 1e-3},
         "critic": {"lr": 1e-2}, "rewards": [{"fn": "reward_fns:length"}]}]}
    posttrain.train(r, out=tmp_path / "run", data=rows, progress=False)
    recs = metrics(tmp_path / "run")
    assert len(recs) == 6  # 3 batches x 2 epochs x 2 minibatches, and every update trains the critic too
    assert all({"value_loss", "value_mean", "value_clipfrac", "value_mse", "clipfrac"} <= set(x) for x in recs)
    assert all("kl" in x for x in recs[::4])  # the batch's k1 (in the reward) is logged with its first update
    assert _critic_learns_on_its_batch(recs)
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"]  # final/ is the policy; the critic is not published


def test_ppo_with_lora_trains_adapters_on_the_policy_and_a_full_critic(tmp_path, model_dirs):
    """With `lora` the policy trains its adapters only; the critic is a full copy of the model from before the
    adapters were attached (the value head needs trained features), with its own optimizer."""
    rows = [{"prompt": f"Say {c}.", "answer": c} for c in "ABCD"]
    r = {"model": model_dirs["llama"], "device": "cpu", "stages": [
        {"method": "ppo", "data": {}, "steps": 3, "batch": {"size": 2}, "lora": {"r": 4, "alpha": 8.0},
         "rollout": {"group_size": 2, "max_new_tokens": 4}, "optim": {"lr": 1e-3},
         "rewards": [{"fn": "reward_fns:length"}]}]}
    posttrain.train(r, out=tmp_path / "run", data=rows, progress=False)
    recs = metrics(tmp_path / "run")
    assert len(recs) == 3 and all("value_loss" in x for x in recs)
    assert (tmp_path / "run" / "final" / "adapter").is_dir()


@pytest.mark.parametrize("stage, message", [
    ({"method": "grpo", "critic": {"lr": 1e-4}}, "`critic` configures the value model of advantage gae"),
])
def test_ppo_recipes_that_cannot_mean_anything_are_refused(stage, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe({"model": "m", "stages": [{"data": {"path": "x.jsonl"}, "rewards": [{"fn": "exact"}], **stage}]})


def test_remax_baselines_each_question_with_the_reward_of_its_greedy_decode(tokenizer):
    """ReMax through the experience builder: each row's baseline is the reward of its prompt's greedy decode
    (decoded here again from the same model), and its advantage is its own reward minus that baseline."""
    from posttrain.data.encode import completion_text
    from posttrain.rewards import RewardScorer, RewardSpec
    from posttrain.rollout.sampler import sample
    from posttrain.tiny import tiny_model
    from posttrain.training.experience import Experience

    rows = [{"prompt": f"Say {c}.", "answer": c} for c in "ABCD"]
    st = load_recipe({"model": "m", "stages": [{"method": "remax", "data": {"path": "x"}, "batch": {"size": 2},
                                                "rollout": {"group_size": 3, "max_new_tokens": 5},
                                                "rewards": [{"fn": "exact"}]}]}).stages[0]
    model = tiny_model("llama", tokenizer, seed=0)
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with RewardScorer([RewardSpec(fn="reward_fns:length")], in_process=True) as scorer:
        exp = Experience(st, tokenizer, pad_id=tokenizer.eos_token_id, stop_ids=stop, rows=rows, scorer=scorer)
        timing = {"t_rollout": 0.0, "t_reward": 0.0}
        exp._compute = {"prefill_tokens": 0, "generated_tokens": 0, "ref_forward_tokens": 0}  # as make() starts
        part = exp._question_rows(model, [1, 3], 0, 0, torch.Generator().manual_seed(0), timing)
        batch = exp._assemble(model, part, torch.ones(len(part.rows), dtype=torch.float64), {})
    for key, g in ((1, 0), (3, 1)):
        ro = sample(model, [exp._prompt_ids(key)], num_samples=1, max_new_tokens=5, temperature=1.0,
                    stop_ids=stop, pad_id=tokenizer.eos_token_id, greedy=True)
        greedy = float(len(completion_text(rows[key]["prompt"], ro.completion_ids[0], tokenizer)))
        mine = [i for i, r in enumerate(part.rows) if r.group == g]
        assert len(mine) == 3 and all(part.rows[i].meta["baseline"] == greedy for i in mine)
        for i in mine:
            m = batch.loss_mask[i] > 0
            torch.testing.assert_close(batch.advantages[i][m], torch.full((int(m.sum()),), part.rewards[i] - greedy))


def test_a_shared_value_heads_gradient_is_the_policy_loss_plus_coef_times_the_clipped_value_loss(make_model):
    """critic.shared through the trainer's path (SharedCritic, ObjectiveSpec, accumulate_gradients over two
    micro-batches): the gradient on the backbone, the LM head and the value head equals autograd, float64, of
    L = -(1/T) sum_t A_t r_t + coef (1/2T) sum_t max((V - G)^2, (V_old + clip(V - V_old, eps_v) - G)^2) from a
    plain forward pass (decoder, LM head, value head by hand), T the minibatch's sampled tokens."""
    from posttrain.data.batch import ROLLOUT, Row, collate
    from posttrain.training.critic import SharedCritic
    from posttrain.training.update import ObjectiveSpec, accumulate_gradients

    policy = make_model("llama", dtype=torch.float64)
    st = load_recipe({"model": "m", "stages": [{"method": "ppo", "data": {"path": "x"}, "rewards": [{"fn": "exact"}],
                                                "critic": {"shared": True, "coef": 0.3, "clip": 0.05}}]}).stages[0]
    g = torch.Generator().manual_seed(0)
    V = policy.config.vocab_size
    rows = [Row(torch.randint(0, V, (n,), generator=g).tolist(), [0, 0] + [1] * (n - 2), ROLLOUT, i // 2)
            for i, n in enumerate([6, 4, 7, 5])]
    b = collate(rows, 0, torch.float64)
    m = b.loss_mask
    b.advantages = torch.randn(m.shape, generator=g, dtype=torch.float64) * m
    b.returns = torch.randn(m.shape, generator=g, dtype=torch.float64) * m
    critic = SharedCritic(policy, st.critic, lr=1e-3, micro_size=2, device="cpu")
    # V_old: the head's values now (its no-grad path), moved a little, so that the clip binds on some tokens only
    b.values = (critic.values(b).double() + 0.08 * torch.randn(m.shape, generator=g, dtype=torch.float64)) * m
    with torch.no_grad():  # q = p: the policy as it is
        from posttrain.logprobs import token_logprobs
        b.old_logp = token_logprobs(policy, b.input_ids, b.attention_mask)[0]
    params = list(policy.parameters()) + list(critic.model.parameters())
    for p in params:
        p.grad = None
    accumulate_gradients(policy, b, ObjectiveSpec.from_stage(st), micro_size=2, device="cpu", value_head=critic)
    got = [p.grad.clone() for p in params]

    for p in params:
        p.grad = None
    pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)
    h = policy.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos).last_hidden_state
    logp = torch.log_softmax(policy.lm_head(h[:, :-1]), -1).gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
    logp = torch.nn.functional.pad(logp, (1, 0))
    T = m.sum()
    pg = -(b.advantages * torch.exp(logp - b.old_logp) * m).sum() / T
    v = torch.nn.functional.pad(critic.model.score(h[:, :-1]).squeeze(-1), (1, 0)) * b.attention_mask
    clipped = b.values + (v - b.values).clamp(-0.05, 0.05)
    lv = 0.5 * (torch.maximum((v - b.returns) ** 2, (clipped - b.returns) ** 2) * m).sum() / T
    (pg + 0.3 * lv).backward()
    outside = ((v - b.values).abs() > 0.05)[m > 0]
    assert outside.any() and not outside.all()  # the value clip matters on some tokens and not on others
    for a, e in zip(got, [p.grad for p in params]):  # (the estimator's own math runs in fp32)
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)
    assert critic.model.score.weight.grad is not None  # the head's own step reads it
    stats = critic.update(b)
    assert stats["value_loss"] == pytest.approx(float(lv), rel=1e-9) and 0 < stats["value_clipfrac"] < 1


def test_ppo_with_a_shared_value_head_learns_its_values_and_resumes_its_head(tmp_path, model_dirs):
    rows = [{"prompt": f"Say {c}.", "answer": c} for c in "ABCDEFGH"]
    r = {"model": model_dirs["llama"], "device": "cpu", "seed": 0, "stages": [
        {"method": "ppo", "data": {}, "steps": 6, "batch": {"size": 4}, "ppo_epochs": 2, "minibatches": 2,
         "rollout": {"group_size": 2, "max_new_tokens": 4}, "optim": {"lr": 1e-3},
         "critic": {"shared": True, "coef": 0.5, "lr": 1e-2}, "rewards": [{"fn": "reward_fns:length"}]}]}
    posttrain.train(r, out=tmp_path / "run", data=rows, progress=False)
    recs = metrics(tmp_path / "run")
    assert len(recs) == 6 and all({"value_loss", "value_mse"} <= set(x) for x in recs)
    assert _critic_learns_on_its_batch(recs)
    with pytest.raises(RecipeError, match="critic.shared"):
        load_recipe({"model": "m", "stages": [{**r["stages"][0], "data": {"path": "x"},
                                               "lora": {"r": 4, "alpha": 8.0}}]})
    with pytest.raises(RecipeError, match="critic.coef"):
        load_recipe({"model": "m", "stages": [{**r["stages"][0], "data": {"path": "x"}, "critic": {"coef": 0.5}}]})
