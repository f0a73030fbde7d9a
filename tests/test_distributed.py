"""torchrun with 2 processes on gloo (training/world.py): a 2-rank run is the 1-rank run with the same global
batch, step for step, for SFT, GRPO, a hybrid (HPT: demonstration rows appended to their questions' groups) and
DPO after SFT; a killed rank fails the run instead of hanging it; a 2-rank checkpoint resumes on 1 rank.

The runs go through the CLI that users launch (`torchrun -m posttrain train`), so every part of the trainer is
the one under test. Samples use keyed noise (`rollout.seeding: row`, what `auto` means under torchrun), which
makes the 1-rank run's samples the same as the 2-rank run's.
"""
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from posttrain.data.batch import Batch
from posttrain.rollout.sampler import _choose, row_key, sample

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

QUIET = ["eval=null", "checkpoint.every=0"]
# (recipe, overrides, steps): small batches keep each pair of runs under half a minute on 2 cores
CASES = {
    "sft": ("builtin:sft", [], 3),
    "grpo": ("builtin:grpo", ["stages.0.batch.size=4"], 3),
    "grpo_shared": ("builtin:grpo", ["stages.0.batch.size=4", "stages.0.batch.share_prompts=true"], 3),
    "hpt": ("builtin:hpt", ["stages.0.batch.size=4", "stages.0.rollout.group_size=4"], 3),
    "sft_then_dpo": ("builtin:sft_then_dpo", [], 2),
    "ppo": ("builtin:ppo", ["stages.0.batch.size=4"], 2),  # the value model's gradients summed like the policy's
    # under fsdp: adapters on the sharded layers, and the LM head in chunks after the root's forward
    "grpo_lora": ("builtin:grpo_lora", ["stages.0.batch.size=4", "stages.0.batch.logits_chunk_mb=0.05"], 3),
    "ppo_shared": ("builtin:ppo", ["stages.0.batch.size=4", "stages.0.critic.shared=true"], 2),  # a head on the policy
    "rm_then_ppo": ("builtin:rm_then_ppo", ["stages.0.batch.size=4", "stages.1.batch.size=4"], 2),
    "distill": ("builtin:distill", ["stages.0.batch.size=4", "stages.1.batch.size=4"], 2),  # KD, then on-policy
    "iterative_dpo": ("builtin:online_dpo", ["stages.0.batch.size=4", "stages.0.preference.refresh_every=1"], 3),
}
# Adam's first steps move a weight whose gradient is near 0 by up to lr whatever its size, so two sums of the same
# gradient in another order can part by a little more than 1e-5 after two stages (2.1e-5 for distill under ddp and
# fsdp alike, 1.1e-5 for rm_then_ppo; the losses of every step agree to 1e-5). The kernels' order of summation
# depends on the CPU: on an Intel Xeon (AVX-512) distill's sharded run parted by 6.0e-5, and LoRA under fsdp resumed
# on one rank by 1.4e-5 in its merged weights (on an AMD EPYC under 5e-5 and 1e-5)
WEIGHTS_ATOL = {"rm_then_ppo": 5e-5, "distill": 1e-4, "grpo_lora": 5e-5}
# shared prompts: a micro-batch's groups run in rows as long as its longest group, so the attention sums over other
# lengths on one rank than on two; measured 1.4e-5 apart in the grad norm by step 3 (weights 1.2e-6). LoRA under
# fsdp, resumed on one rank: 1.1e-5 apart in the grad norm by step 3 on the Xeon, under 1e-5 on the EPYC
REL = {"grpo_shared": 1e-4, "grpo_lora": 5e-5}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTTRAIN_FAULTS")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    return env


def _train(out, recipe, overrides, steps, *, ranks: int, env=None, timeout=240) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] \
        if ranks > 1 else [sys.executable]
    cmd = launcher + ["-m", "posttrain", "train", recipe, "--out", str(out), "--max-steps", str(steps), *QUIET,
                      *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=timeout)


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out) -> dict:
    return load_file(str(out / "final" / "model.safetensors"))


def _assert_same_run(one, two, rel=1e-5, atol=1e-5):
    a, b = _records(one), _records(two)
    assert [(r["stage"], r["step"]) for r in a] == [(r["stage"], r["step"]) for r in b]
    for r, s in zip(a, b):
        for key in ("loss", "grad_norm", "samples", "trained_tokens", "reward_mean", "response_len", "value_loss",
                    "value_grad_norm"):
            if key in r:
                assert math.isclose(r[key], s[key], rel_tol=rel, abs_tol=1e-7), (r["step"], key, r[key], s[key])
    wa, wb = _weights(one), _weights(two)
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < atol


# ---- the pieces, in one process ----------------------------------------------------------------------------


def test_shares_cover_every_row_once_in_whole_groups():
    group = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 0, 2])  # demonstration rows of groups 0 and 2 at the end
    n = len(group)
    batch = Batch(input_ids=torch.zeros(n, 3, dtype=torch.long), attention_mask=torch.ones(n, 3, dtype=torch.long),
                  loss_mask=torch.ones(n, 3), advantages=torch.zeros(n, 3), group=group,
                  stream=torch.zeros(n, dtype=torch.long), mix=torch.ones(n, dtype=torch.float64))
    for size in (1, 2, 3, 5):
        shares = [batch.share(r, size).tolist() for r in range(size)]
        assert sorted(i for s in shares for i in s) == list(range(n))
        for s in shares:  # a group lies on one rank
            for g in set(group[s].tolist()):
                assert set((group == g).nonzero().flatten().tolist()) <= set(s)
    assert batch.share(0, 2).tolist() == [0, 1, 2, 10, 3, 4, 5, 11]  # first rows 0, 3, 5 fall in the first half
    assert batch.share(1, 2).tolist() == [6, 7, 8, 9]


def test_keyed_samples_do_not_depend_on_the_rows_beside_them(make_model, tokenizer):
    model = make_model("llama", seed=3)
    prompts = [tokenizer.encode(t) for t in ("what is 12 + 7?", "A B C", "the lazy dog")]
    keys = [row_key(5, j, k) for j in range(3) for k in range(2)]
    kw = dict(num_samples=2, max_new_tokens=12, stop_ids=[tokenizer.eos_token_id], pad_id=0)
    together = sample(model, prompts, keys=keys, **kw)
    apart = [sample(model, prompts[:1], keys=keys[:2], **kw), sample(model, prompts[1:], keys=keys[2:], **kw)]
    assert together.completion_ids == apart[0].completion_ids + apart[1].completion_ids
    chunked = sample(model, prompts, keys=keys, batch_size=2, **kw)  # one prompt per decoding batch
    assert chunked.completion_ids == together.completion_ids
    other = sample(model, prompts, keys=[row_key(6, i) for i in range(6)], **kw)
    assert other.completion_ids != together.completion_ids  # the keys are the noise


def test_keyed_draws_follow_the_distribution():
    """The inverse-CDF draw at keyed uniforms: frequencies within 4 standard errors of the probabilities over 40000
    draws (a zero-probability token, cut by top-p, is never drawn)."""
    probs = torch.tensor([0.05, 0.0, 0.5, 0.3, 0.15])
    z = probs.clamp(min=1e-30).log().expand(40_000, 5).clone()
    z[:, 1] = float("-inf")
    ids = _choose(z, greedy=False, top_p=1.0, generator=None, keys=[row_key(9, i) for i in range(40_000)], step=4)
    freq = torch.bincount(ids, minlength=5).double() / len(ids)
    se = (probs.double() * (1 - probs.double()) / len(ids)).sqrt()
    assert freq[1] == 0
    assert bool(((freq - probs.double()).abs() <= 4 * se + 1e-12).all()), freq


# ---- two processes -----------------------------------------------------------------------------------------


def _overrides(case: str) -> list[str]:
    from posttrain.recipe import load_recipe

    recipe, overrides, _ = CASES[case]
    # the per-tensor AdamW on every side, as fsdp recipes resolve to (the fused kernel rounds apart from it, and
    # over a few RL steps that exceeds these tolerances: tests/test_optim.py checks the kernel itself)
    n = len(load_recipe(recipe).stages)
    # and the padded rows: shared prompts lay a micro-batch's groups out in rows as long as its longest group, so
    # one rank and two part at float32 rounding there (the "grpo_shared" case, at its own tolerance)
    return overrides + [f"stages.{i}.rollout.seeding=row" for i in range(n)] + \
        [f"stages.{i}.optim.fused=false" for i in range(n)] + \
        [f"stages.{i}.batch.share_prompts=false" for i in range(n) if case != "grpo_shared"]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """The 1-rank run of each case, made once for both strategies."""
    done = {}

    def get(case: str):
        if case not in done:
            out = tmp_path_factory.mktemp(f"one-{case}")
            p = _train(out, CASES[case][0], _overrides(case), CASES[case][2], ranks=1)
            assert p.returncode == 0, p.stderr[-3000:]
            done[case] = out
        return done[case]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("case,strategy", [("sft", "ddp"), ("grpo", "ddp"), ("hpt", "ddp"), ("sft_then_dpo", "ddp"),
                                           ("ppo", "ddp"), ("grpo_shared", "ddp"),
                                           ("sft", "fsdp"), ("grpo", "fsdp"), ("sft_then_dpo", "fsdp"),
                                           ("sft_then_dpo", "fsdp-shard"), ("ppo_shared", "fsdp"),
                                           ("rm_then_ppo", "fsdp"), ("distill", "fsdp-shard")])
def test_two_ranks_train_as_one(tmp_path, one_rank, case, strategy):
    """Loss, gradient norm, samples and rewards of every step, and the final weights: 2 ranks = 1 rank, with the
    model replicated (ddp) or sharded (fsdp: FSDP2 over gloo; fsdp-shard: DPO's reference model and the
    distillation teacher sharded too).
    LoRA and iterative DPO under fsdp: in the resume test below, whose runs are 2 ranks, then 1."""
    recipe, _, steps = CASES[case]
    extra = ["distributed.strategy=fsdp", "distributed.reference=shard", "distributed.teacher=shard"] \
        if strategy == "fsdp-shard" else [f"distributed.strategy={strategy}"]
    two = _train(tmp_path / "two", recipe, _overrides(case) + extra, steps, ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    _assert_same_run(one_rank(case), tmp_path / "two", rel=REL.get(case, 1e-5), atol=WEIGHTS_ATOL.get(case, 1e-5))


@pytest.mark.slow
def test_two_nodes_through_a_rendezvous_train_as_one(tmp_path, one_rank):
    """Two torchrun launchers, one process each, meeting at a c10d rendezvous endpoint: what two machines run
    (here both on this one), equal to the 1-rank run."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    recipe, _, steps = CASES["grpo"]
    nodes = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=t",
               "-m", "posttrain", "train", recipe, "--out", str(tmp_path / "two"), "--max-steps", str(steps),
               *QUIET, *_overrides("grpo")]
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()))
    for p in nodes:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    _assert_same_run(one_rank("grpo"), tmp_path / "two")


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_instead_of_hanging_it(tmp_path):
    t0 = time.time()
    p = _train(tmp_path / "run", "builtin:grpo", ["stages.0.batch.size=4", "distributed.timeout_s=60"], 6, ranks=2,
               env=_env(POSTTRAIN_FAULTS="step@3=kill", POSTTRAIN_FAULTS_RANK="1"), timeout=200)
    assert p.returncode != 0
    assert time.time() - t0 < 120
    assert "SIGKILL" in p.stderr or "Signal 9" in p.stderr or "exitcode  : -9" in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("case,strategy,seeding", [("grpo", "ddp", "row"), ("grpo", "ddp", "auto"),
                                                   ("grpo_lora", "fsdp", "row"),  # an adapters-only checkpoint
                                                   ("iterative_dpo", "fsdp-shard", "row")])  # whole weights too
def test_a_two_rank_checkpoint_resumes_on_one_rank(tmp_path, one_rank, case, strategy, seeding):
    """Stopped after step 2 of 3 on 2 ranks, resumed on 1: the run equals the 1-rank run (a sharded run's
    checkpoint holds whole tensors, like any other: a LoRA stage's its adapters, iterative DPO's its renewed
    reference too; `auto` seeding goes on keyed, as the checkpoint's run did)."""
    recipe, _, steps = CASES[case]
    overrides = _overrides(case)  # (stage 0's seeding is set again below)
    every = ["checkpoint.every=2", f"stages.0.rollout.seeding={seeding}"] + \
        (["distributed.strategy=fsdp", "distributed.reference=shard"] if strategy == "fsdp-shard" else
         [f"distributed.strategy={strategy}"])
    # both ranks fail as step 3 starts: the checkpoint of step 2 is the last thing saved
    stopped = _train(tmp_path / "run", recipe, overrides + every, steps, ranks=2,
                     env=_env(POSTTRAIN_FAULTS="step@3=raise"))
    assert stopped.returncode != 0 and "injected fault" in stopped.stderr
    assert [r["step"] for r in _records(tmp_path / "run")] == [1, 2]
    resumed = _train(tmp_path / "run", recipe, overrides + every, steps, ranks=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 2" in resumed.stderr
    _assert_same_run(one_rank(case), tmp_path / "run", rel=REL.get(case, 1e-5), atol=WEIGHTS_ATOL.get(case, 1e-5))


def test_what_cannot_be_split_is_refused_before_anything_loads():
    from posttrain.recipe import RecipeError, load_recipe
    from posttrain.training.world import check_distributed

    with pytest.raises(RecipeError, match=r"stages.0.rollout.seeding: 'batch'"):
        check_distributed(load_recipe("builtin:grpo", overrides=["stages.0.rollout.seeding=batch"]))
    with pytest.raises(RecipeError, match=r"stages.0: lora.quantize .* does not run under distributed.strategy: fsdp"):
        check_distributed(load_recipe("builtin:grpo_lora", overrides=["distributed.strategy=fsdp",
                                                                      "stages.0.lora.quantize=4bit"]))
    check_distributed(load_recipe("builtin:grpo_lora", overrides=["distributed.strategy=fsdp"]))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_on_nccl_train_as_one(tmp_path, strategy):
    """The same equality on 2 GPUs (NCCL), in float32: GRPO, each rank on its own device."""
    recipe, _, steps = CASES["grpo"]
    args = _overrides("grpo") + ["dtype=float32", "device=cuda"]
    one = _train(tmp_path / "one", recipe, args, steps, ranks=1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _train(tmp_path / "two", recipe, args + [f"distributed.strategy={strategy}"], steps, ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    _assert_same_run(tmp_path / "one", tmp_path / "two", rel=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path, one_rank):
    """SIGTERM to rank 1 during step 2: both ranks finish the step, rank 0 saves its checkpoint, the run exits with
    the interrupted code, and a rerun on 1 rank ends where the unstopped run ends."""
    from posttrain.errors import EXIT_INTERRUPTED

    recipe, _, steps = CASES["grpo"]
    p = _train(tmp_path / "run", recipe, _overrides("grpo") + ["checkpoint.every=0"], steps, ranks=2,
               env=_env(POSTTRAIN_FAULTS="step@2=term", POSTTRAIN_FAULTS_RANK="1"))
    assert p.returncode != 0
    assert f"exitcode  : {EXIT_INTERRUPTED}" in p.stderr or "stopped by SIGTERM at step 2" in p.stderr, p.stderr[-2000:]
    assert [r["step"] for r in _records(tmp_path / "run")] == [1, 2]
    resumed = _train(tmp_path / "run", recipe, _overrides("grpo"), steps, ranks=1)
    assert resumed.returncode == 0 and "resuming at step 2" in resumed.stderr, resumed.stderr[-3000:]
    _assert_same_run(one_rank("grpo"), tmp_path / "run")


@pytest.mark.slow
def test_fsdp_finds_the_blocks_of_any_architecture(tmp_path, tokenizer):
    """A user's GPT-2 (blocks in `transformer.h`, not `model.layers`) under fsdp: its units are the classes
    transformers keeps whole (`_no_split_modules`), and 2 ranks train as 1."""
    import yaml

    from posttrain.models import save_pretrained
    from posttrain.tiny import tiny_model

    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    # (no dropout: its masks come from each process's own generator, so they differ between 1 and 2 ranks)
    model = tiny_model("gpt2", tokenizer, seed=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    save_pretrained(model, tokenizer, tmp_path / "gpt2", stop_ids=stop)
    rows = [{"messages": [{"role": "user", "content": f"{a} + {b} = ?"}, {"role": "assistant", "content": str(a + b)}]}
            for a in range(10, 18) for b in range(3)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"model": str(tmp_path / "gpt2"), "stages": [{
        "method": "sft", "data": {"path": str(tmp_path / "data.jsonl")}, "steps": 3, "batch": {"size": 4}}]}))
    for name, ranks, extra in (("one", 1, []), ("two", 2, ["distributed.strategy=fsdp"])):
        p = _train(tmp_path / name, str(tmp_path / "recipe.yaml"), extra, 3, ranks=ranks)
        assert p.returncode == 0, p.stderr[-3000:]
    _assert_same_run(tmp_path / "one", tmp_path / "two")
