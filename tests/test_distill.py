"""On-policy distillation: the teacher term of the advantage, A_t = lambda (log pi_T(y_t) - log q(y_t)) on the
student's own tokens, follows the reverse KL to the teacher (exactly, in expectation over the student's
samples); composed with a reward advantage as A - lambda (log pi - log pi_T); a run needs a teacher with the
student's tokenizer, and no rewards."""
import copy

import pytest
import torch

import posttrain
from posttrain.data.batch import ROLLOUT, Row, collate
from posttrain.recipe import RecipeError, load_recipe
from posttrain.training.experience import token_advantages
from test_train_e2e import RL_ROWS, metrics, model_dirs  # noqa: F401  (model_dirs: a fixture)

V = 6


def one_token_batch(logp: torch.Tensor, teacher: torch.Tensor, group=None):
    """V rows, row v a one-token completion y = v after a one-token prompt; old and teacher log-probs set."""
    b = collate([Row([0, v], [0, 1], ROLLOUT, 0 if group is None else group[v]) for v in range(V)], pad_id=0,
                dtype=torch.float64)
    b.old_logp = torch.stack([torch.zeros(V, dtype=torch.float64), logp]).T.contiguous()
    b.teacher_logp = torch.stack([torch.zeros(V, dtype=torch.float64), teacher]).T.contiguous()
    return b


def test_the_teacher_term_is_the_reverse_kl_gradient_over_the_students_samples():
    """sum_y pi(y) A_y grad log pi(y) == -grad KL(pi || pi_T), with A from the trainer's token_advantages."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    log_t = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), 0)
    logp = torch.log_softmax(z, 0)
    st = load_recipe({"model": "m", "teacher": "t", "stages": [{"method": "opd", "data": {"path": "x"}}]}).stages[0]
    A, _ = token_advantages(one_token_batch(logp.detach(), log_t), torch.zeros(V, dtype=torch.float64), st)
    surrogate = -(logp.exp().detach() * A[:, 1] * logp).sum()
    (g_trainer,) = torch.autograd.grad(surrogate, z, retain_graph=True)
    kl = (logp.exp() * (logp - log_t)).sum()
    (g_kl,) = torch.autograd.grad(kl, z)
    torch.testing.assert_close(g_trainer, g_kl, rtol=1e-9, atol=1e-12)
    assert kl > 0.05  # not a trivial case


def test_with_rewards_the_teacher_term_adds_to_the_reward_advantage():
    """A = A_group - lambda (log q - log pi_T), slime's composition; lambda from distill.coef."""
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), 0)
    log_t = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), 0)
    R = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    group = [0, 0, 0, 1, 1, 1]
    recipe = {"model": "m", "teacher": "t", "stages": [{"method": "opd", "data": {"path": "x"},
                                                        "rewards": [{"fn": "exact"}], "distill": {"coef": 0.5},
                                                        "advantage": {"kind": "group_zscore"}}]}
    st = load_recipe(recipe).stages[0]
    A, _ = token_advantages(one_token_batch(logp, log_t, group), R, st)
    plain = copy.deepcopy(st)
    plain.distill.coef = 0.0
    A_group, _ = token_advantages(one_token_batch(logp, log_t, group), R, plain)
    torch.testing.assert_close(A[:, 1], A_group[:, 1] - 0.5 * (logp - log_t), rtol=1e-6, atol=1e-7)
    assert A_group[:, 1].abs().sum() > 0


def test_an_opd_run_needs_a_teacher_with_the_students_tokenizer_and_no_rewards(tmp_path, model_dirs, tokenizer):
    stage = {"method": "opd", "data": {}, "steps": 3, "batch": {"size": 2}, "optim": {"lr": 1e-2},
             "rollout": {"group_size": 2, "max_new_tokens": 6}}
    r = {"model": model_dirs["llama"], "device": "cpu", "stages": [stage]}
    with pytest.raises(RecipeError, match="distils from a teacher: set `teacher:`"):
        posttrain.train(r, out=tmp_path / "none", data=RL_ROWS, progress=False)
    from transformers import AutoModelForCausalLM

    sharp = AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"])  # a peaked teacher, far from the student
    with torch.no_grad():
        sharp.get_output_embeddings().weight.mul_(8.0)
    sharp.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    summary = posttrain.train({**r, "teacher": str(tmp_path / "teacher")}, out=tmp_path / "run", data=RL_ROWS,
                              progress=False)
    recs = metrics(tmp_path / "run")
    assert summary["stages"]["opd"]["steps"] == 3 and all(x["teacher_kl"] > 0.1 for x in recs)  # (learning:
    # tests/test_learning_arith.py, from the built-in teacher)
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<extra>"])
    teacher = tmp_path / "other"
    sharp.save_pretrained(teacher)
    other.save_pretrained(teacher)
    with pytest.raises(RecipeError, match="has another tokenizer than the model"):
        posttrain.train({**r, "teacher": str(teacher)}, out=tmp_path / "bad", data=RL_ROWS, progress=False)


def test_kd_gradient_is_the_forward_kl_to_the_teachers_distribution_on_the_demonstrations(make_model, tokenizer):
    """KD through the trainer's path (Experience's teacher targets, ObjectiveSpec, accumulate_gradients over
    micro-batches) with top_k = the whole vocabulary: the gradient equals autograd of the textbook loss
    (1 - lam) NLL + lam (1/N) sum_t KL(pi_T(.|y_<t) || pi(.|y_<t)) over the demonstration tokens."""
    from posttrain.data.encode import encode_sft
    from posttrain.recipe import load_recipe
    from posttrain.training.experience import Experience
    from posttrain.training.sources import Demonstrations
    from posttrain.training.update import ObjectiveSpec, accumulate_gradients

    student, teacher = make_model("llama", seed=0, dtype=torch.float64), make_model("llama", seed=5, dtype=torch.float64)
    V = student.get_output_embeddings().out_features
    rows = [{"prompt": f"Say {c}.", "completion": c * (i + 1)} for i, c in enumerate("ABCDE")]
    demos = [encode_sft(r, "prompt_completion", tokenizer) for r in rows]
    for lam in (1.0, 0.25):
        st = load_recipe({"model": "m", "teacher": "t", "stages": [
            {"method": "kd", "data": {"path": "x"}, "batch": {"size": 5, "micro_size": 2},
             "distill": {"coef": lam, "top_k": 10_000}}]}).stages[0]
        exp = Experience(st, tokenizer, pad_id=tokenizer.eos_token_id, demos=Demonstrations(demos, 0, False),
                         teacher=teacher)
        batch = exp.make(student, 0, None).batch
        assert batch.teacher_ids.shape[-1] == V
        student.zero_grad()
        accumulate_gradients(student, batch, ObjectiveSpec.from_stage(st), micro_size=2, device="cpu")
        got = [p.grad.clone() for p in student.parameters()]

        student.zero_grad()
        ids, att, m = batch.input_ids, batch.attention_mask, batch.loss_mask.double()
        log_pi = torch.log_softmax(student(input_ids=ids, attention_mask=att).logits[:, :-1].double(), -1)
        with torch.no_grad():
            log_t = torch.log_softmax(teacher(input_ids=ids, attention_mask=att).logits[:, :-1].double(), -1)
        kl = (log_t.exp() * (log_t - log_pi)).sum(-1)  # (N, T-1) forward KL at each position
        nll = -log_pi.gather(-1, ids[:, 1:, None]).squeeze(-1)
        mm = m[:, 1:]
        loss = ((1 - lam) * nll + lam * kl).mul(mm).sum() / mm.sum()
        loss.backward()
        for g, p in zip(got, student.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-8)  # (the batch's masks are fp32)


def test_sdft_teacher_is_the_policy_shown_the_demonstration_and_its_term_is_the_advantage(tokenizer):
    """SDFT through the experience builder: each sampled token's teacher log-prob is the policy's own, computed
    here again on the teacher prompt (the question with its demonstration) followed by the same completion; the
    advantage is coef (log pi_T - log q) on those tokens (no reward)."""
    from posttrain.data.encode import encode_prompt
    from posttrain.logprobs import token_logprobs
    from posttrain.recipe import load_recipe
    from posttrain.tiny import tiny_model
    from posttrain.training.experience import Experience
    from posttrain.training.sources import PairedDemos

    rows = [{"prompt": [{"role": "user", "content": f"Say {c}."}],
             "completion": [{"role": "assistant", "content": c * 3}]} for c in "ABCD"]
    r = load_recipe({"model": "m", "stages": [{"method": "sdft", "data": {"path": "x"}, "batch": {"size": 2},
                                               "rollout": {"group_size": 2, "max_new_tokens": 5}}]})
    assert r.teacher is None  # the policy is its own teacher: no `teacher:` needed
    st = r.stages[0]
    model = tiny_model("llama", tokenizer, seed=0)
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    exp = Experience(st, tokenizer, pad_id=tokenizer.eos_token_id, stop_ids=stop, rows=rows,
                     paired=PairedDemos(tokenizer))
    data = exp.make(model, 0, torch.Generator().manual_seed(0))
    b = data.batch
    assert "teacher_kl" in data.values and b.size == 4
    teacher_prompt = exp.teacher_prompt(1)
    assert "Say B." in teacher_prompt[-1]["content"] and "BBB" in teacher_prompt[-1]["content"]
    for i in range(b.size):
        m = b.loss_mask[i] > 0
        completion = b.input_ids[i][m].tolist()
        key = next(k for k, row in enumerate(rows) if encode_prompt(row["prompt"], tokenizer) ==
                   b.input_ids[i][: int(m.nonzero()[0])].tolist())
        ctx = encode_prompt(exp.teacher_prompt(key), tokenizer)
        ids = torch.tensor([ctx + completion])
        lp, _ = token_logprobs(model, ids, torch.ones_like(ids))
        torch.testing.assert_close(b.teacher_logp[i][m], lp[0, len(ctx):].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.advantages[i][m], (b.teacher_logp[i][m] - b.old_logp[i][m]), rtol=1e-5,
                                   atol=1e-6)
