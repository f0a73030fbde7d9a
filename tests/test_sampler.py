"""The KV-cached sampler: its log-probs match a fresh forward, greedy matches transformers, stopping and seeding."""
import pytest
import torch

from posttrain.rollout.sampler import sample, top_p_filter
from posttrain.logprobs import token_logprobs

PROMPTS = [[5, 17, 33, 8, 90, 12], [41], [7, 7, 200, 64]]
# Many stop ids, so that rows of a random model finish at different steps and the batch shrinks mid-decode.
STOPS = list(range(40, 90))
PAD = 0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rescore(model, rollout, temperature):
    """token_logprobs of a fresh right-padded forward on prompt + completion -> list of (len(completion),)."""
    seqs = [p + c for p, c in zip(rollout.prompt_ids, rollout.completion_ids)]
    T = max(map(len, seqs))
    ids = torch.tensor([s + [PAD] * (T - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    logp, _ = token_logprobs(model, ids, mask, temperature=temperature)
    return [logp[i, len(p) : len(p) + len(c)] for i, (p, c) in enumerate(zip(rollout.prompt_ids, rollout.completion_ids))]


def test_sampler_logp_equals_fresh_forward(make_model, arch):
    model = make_model(arch)
    with torch.no_grad():
        # top_p < 1: the recorded log-probs must still be those of the full tempered distribution.
        out = sample(model, PROMPTS, num_samples=3, max_new_tokens=12, temperature=0.7, top_p=0.9, stop_ids=STOPS,
                     pad_id=PAD, generator=_gen(0), batch_size=6)  # 2 prompts of lengths 6 and 1, then 1
        ref = _rescore(model.eval(), out, 0.7)
    assert out.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert out.prompt_ids == [PROMPTS[i] for i in out.prompt_index]
    lengths = {len(c) for c in out.completion_ids}
    assert len(lengths) > 1, "rows should finish at different steps to exercise the shrinking batch"
    for lp, r, c in zip(out.sampler_logp, ref, out.completion_ids):
        assert lp.dtype == torch.float32 and lp.shape == (len(c),)
        torch.testing.assert_close(lp, r, atol=1e-5, rtol=0)


def test_greedy_matches_transformers_generate(make_model):
    model = make_model("llama").eval()
    out = sample(model, PROMPTS, max_new_tokens=10, stop_ids=STOPS, pad_id=PAD, greedy=True)
    for p, c in zip(PROMPTS, out.completion_ids):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             do_sample=False, max_new_tokens=10, eos_token_id=STOPS, pad_token_id=PAD)
        ref = ref[0, len(p) :].tolist()
        ends = [i for i, x in enumerate(ref) if x in STOPS]
        assert c == (ref[: ends[0] + 1] if ends else ref)
    assert {len(c) for c in out.completion_ids} != {10}, "at least one row should stop early"


def test_stops_at_a_stop_id_and_keeps_it(make_model):
    model = make_model("qwen2")
    free = sample(model, PROMPTS, max_new_tokens=6, stop_ids=[], pad_id=PAD, greedy=True)
    assert all(len(c) == 6 for c in free.completion_ids) and all(free.truncated)
    # Stop on the third greedy token of the first prompt: that row ends there, the stop id included.
    stop = free.completion_ids[0][2]
    out = sample(model, PROMPTS, max_new_tokens=6, stop_ids=[stop], pad_id=PAD, greedy=True)
    first = free.completion_ids[0].index(stop)
    assert out.completion_ids[0] == free.completion_ids[0][: first + 1]
    assert out.truncated[0] is False
    for full, c, t in zip(free.completion_ids, out.completion_ids, out.truncated):
        assert c == (full[: full.index(stop) + 1] if stop in full else full)
        assert t == (stop not in full)


def test_sampled_rows_end_exactly_at_their_first_stop(make_model):
    out = sample(make_model("mistral"), PROMPTS, num_samples=4, max_new_tokens=8, stop_ids=STOPS, pad_id=PAD,
                 generator=_gen(3))
    assert any(out.truncated) and not all(out.truncated)
    for c, t in zip(out.completion_ids, out.truncated):
        assert not any(x in STOPS for x in c[:-1])
        assert t == (c[-1] not in STOPS)
        assert len(c) == 8 or not t


def test_same_seed_same_samples_different_seed_differs(make_model):
    model = make_model("gpt2")
    kw = dict(num_samples=2, max_new_tokens=8, stop_ids=STOPS, pad_id=PAD)
    a = sample(model, PROMPTS, generator=_gen(11), **kw)
    b = sample(model, PROMPTS, generator=_gen(11), **kw)
    c = sample(model, PROMPTS, generator=_gen(12), **kw)
    assert a.completion_ids == b.completion_ids
    assert all(torch.equal(x, y) for x, y in zip(a.sampler_logp, b.sampler_logp))
    assert a.completion_ids != c.completion_ids


def test_tiny_top_p_is_greedy(make_model):
    model = make_model("llama")
    greedy = sample(model, PROMPTS, max_new_tokens=8, temperature=0.5, stop_ids=STOPS, pad_id=PAD, greedy=True)
    nucleus = sample(model, PROMPTS, num_samples=2, max_new_tokens=8, temperature=0.5, top_p=1e-6, stop_ids=STOPS,
                     pad_id=PAD, generator=_gen(0))
    assert nucleus.completion_ids == [c for c in greedy.completion_ids for _ in range(2)]
    for x, y in zip(nucleus.sampler_logp, [lp for lp in greedy.sampler_logp for _ in range(2)]):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_first_token_frequencies_follow_the_tempered_softmax(make_model):
    """4000 draws of one token: empirical frequencies within 4 standard errors of softmax(logits / T)."""
    model = make_model("llama").eval()
    prompt = [5, 17, 33]
    out = sample(model, [prompt], num_samples=4000, max_new_tokens=1, temperature=0.3, stop_ids=[], pad_id=PAD,
                 generator=_gen(5))
    with torch.no_grad():
        probs = (model(torch.tensor([prompt])).logits[0, -1] / 0.3).softmax(-1)
    counts = torch.bincount(torch.tensor([c[0] for c in out.completion_ids]), minlength=probs.numel()).double()
    freq = counts / counts.sum()
    stderr = (probs * (1 - probs) / 4000).sqrt().double()
    assert ((freq - probs.double()).abs() <= 4 * stderr + 1e-3).all()


def test_generator_draws_follow_the_distribution_and_skip_zero_mass():
    """The inverse-CDF draw at the generator's uniforms (one per row): frequencies within 4 standard errors over
    40000 draws; a token of zero probability (cut by top-p) is never drawn."""
    from posttrain.rollout.sampler import _choose

    probs = torch.tensor([0.05, 0.0, 0.5, 0.3, 0.15])
    z = probs.clamp(min=1e-30).log().expand(40_000, 5).clone()
    z[:, 1] = float("-inf")
    ids = _choose(z, greedy=False, top_p=1.0, generator=_gen(3))
    freq = torch.bincount(ids, minlength=5).double() / len(ids)
    se = (probs.double() * (1 - probs.double()) / len(ids)).sqrt()
    assert freq[1] == 0
    assert bool(((freq - probs.double()).abs() <= 4 * se + 1e-12).all()), freq
    assert torch.equal(ids, _choose(z, greedy=False, top_p=1.0, generator=_gen(3)))  # the generator is the noise


def test_top_p_filter_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]]))
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].nonzero().squeeze(-1).tolist()  # noqa: E731
    assert kept(0.35) == [1]
    assert kept(0.399) == [1]
    assert sorted(kept(0.41)) == [1, 3]
    assert sorted(kept(0.699)) == [1, 3]
    assert sorted(kept(0.71)) == [1, 3, 4]
    assert sorted(kept(1.0)) == [0, 1, 2, 3, 4]


def test_batch_size_does_not_change_greedy_output(make_model):
    model = make_model("qwen2")
    kw = dict(num_samples=2, max_new_tokens=6, stop_ids=STOPS, pad_id=PAD, greedy=True)
    assert sample(model, PROMPTS, batch_size=1, **kw).completion_ids == sample(model, PROMPTS, **kw).completion_ids


def test_restores_training_mode(make_model):
    model = make_model("gpt2").train()
    sample(model, PROMPTS, max_new_tokens=2, stop_ids=STOPS, pad_id=PAD, greedy=True)
    assert model.training
    model.eval()
    sample(model, PROMPTS, max_new_tokens=2, stop_ids=STOPS, pad_id=PAD, greedy=True)
    assert not model.training


def test_bad_arguments_explain_themselves(make_model):
    model = make_model("llama")
    kw = dict(max_new_tokens=2, stop_ids=STOPS, pad_id=PAD)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sample(model, [[3], []], **kw)
    with pytest.raises(ValueError, match="greedy=True"):
        sample(model, PROMPTS, temperature=0, **kw)
    with pytest.raises(ValueError, match="pad_id"):
        sample(model, PROMPTS, max_new_tokens=2, stop_ids=STOPS, pad_id=10**6)
