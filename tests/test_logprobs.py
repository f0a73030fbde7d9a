"""token_logprobs against a plain per-position log_softmax reference, under padding and chunking."""
from types import SimpleNamespace

import pytest
import torch

from posttrain.logprobs import position_ids_from_mask, token_logprobs


def _batch(vocab: int, lengths: list[int], seed: int = 0, pad_value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random ids (B, T) and mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, pad_value), mask


def _naive(model, ids, mask, temperature):
    """Full log_softmax per position, looped over rows and positions: the reference."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logp = torch.zeros(ids.shape, dtype=logits.dtype)
    ent = torch.zeros(ids.shape, dtype=logits.dtype)
    for b in range(ids.shape[0]):
        for t in range(1, int(mask[b].sum())):
            lp = torch.log_softmax(logits[b, t - 1] / temperature, dim=-1)
            logp[b, t] = lp[ids[b, t]]
            ent[b, t] = -(lp.exp() * lp).sum()
    return logp, ent


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equal_naive_log_softmax_fp64(make_model, temperature):
    model = make_model("llama", dtype=torch.float64)
    ids, mask = _batch(model.config.vocab_size, [9, 6, 1])
    with torch.no_grad():
        logp, ent = token_logprobs(model, ids, mask, temperature=temperature, with_entropy=True)
        ref_logp, ref_ent = _naive(model, ids, mask, temperature)
    assert logp.shape == ent.shape == ids.shape
    assert logp.dtype == torch.float64
    torch.testing.assert_close(logp, ref_logp, atol=1e-10, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-10, rtol=0)
    assert (logp[:, 0] == 0).all() and (logp[mask == 0] == 0).all() and (ent[mask == 0] == 0).all()
    assert (logp[mask.bool() & (torch.arange(ids.shape[1]) > 0)] < 0).all()


def test_entropy_is_none_unless_asked(make_model):
    model = make_model("gpt2")
    ids, mask = _batch(model.config.vocab_size, [4, 3])
    assert token_logprobs(model, ids, mask)[1] is None


def test_right_padding_leaves_real_tokens_unchanged(make_model, arch):
    model = make_model(arch).eval()
    lengths = [10, 4, 7]
    ids, mask = _batch(model.config.vocab_size, lengths, pad_value=3)
    with torch.no_grad():
        logp, ent = token_logprobs(model, ids, mask, temperature=0.8, with_entropy=True)
        for b, n in enumerate(lengths):
            alone, alone_ent = token_logprobs(model, ids[b : b + 1, :n], mask[b : b + 1, :n], temperature=0.8,
                                              with_entropy=True)
            torch.testing.assert_close(logp[b, :n], alone[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(ent[b, :n], alone_ent[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [{"chunk_size": 1}, {"chunk_size": 3}, {"chunk_size": 64}, {"chunk_mb": 0.003},
                                   {"chunk_mb": 0.01}, {}])
def test_chunked_equals_plain_values_and_gradients(make_model, arch, chunk):
    """Every chunking (positions; megabytes of logits: at a vocabulary of ~320, 0.003 MB is 1 position of the 2
    rows, 0.01 MB 4; the default and 64 positions hold the whole batch in one chunk, the plain path) gives the
    full-logits values and gradients."""
    model = make_model(arch).eval()  # gpt2 has dropout: both paths must see the same network
    ids, mask = _batch(model.config.vocab_size, [8, 5], seed=1)
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2))

    def run(cs):
        model.zero_grad()
        logp, ent = token_logprobs(model, ids, mask, temperature=0.9, with_entropy=True, **cs)
        ((logp + 0.1 * ent) * weights).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return logp.detach(), ent.detach(), grads

    logp, ent, grads = run({"chunk_size": None, "chunk_mb": None})
    c_logp, c_ent, c_grads = run(chunk)
    torch.testing.assert_close(c_logp, logp, atol=1e-6, rtol=0)
    torch.testing.assert_close(c_ent, ent, atol=1e-6, rtol=0)
    assert len(grads) == len(c_grads) > 0
    for g, cg in zip(grads, c_grads):
        torch.testing.assert_close(cg, g, atol=1e-6, rtol=1e-5)


def test_single_token_rows_give_zero_logp_in_both_paths(make_model):
    model = make_model("mistral")
    ids, mask = _batch(model.config.vocab_size, [1, 1])
    for cs in (None, 2):
        logp, ent = token_logprobs(model, ids, mask, with_entropy=True, chunk_size=cs, chunk_mb=None)
        assert logp.shape == (2, 1) and (logp == 0).all() and (ent == 0).all()


def test_bad_arguments_explain_themselves(make_model):
    model = make_model("llama")
    ids, mask = _batch(model.config.vocab_size, [3])
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(model, ids, mask, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(model, ids, mask, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_mb"):
        token_logprobs(model, ids, mask, chunk_mb=0)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        token_logprobs(model, ids, mask[:, :2])


@pytest.mark.parametrize("chunk", [{"chunk_size": None, "chunk_mb": None}, {"chunk_size": 2}])
def test_shared_prompts_equal_the_padded_rows_values_and_gradients(make_model, arch, chunk):
    """`groups`: each group's common prefix runs once under a tree mask (`shared_prefix_layout`); log-probs and
    entropy equal the padded rows' in float64, whatever the groups share: a prompt and more (rows 0-2), nothing
    but the first token's predictor (row 3 alone), nothing at all (rows 4-5), one token (row 6). Gradients agree
    to float32 rounding: transformers' RMSNorm computes in float32 even in a float64 model, and the shared layout
    sums a prefix's gradients before the norm's backward where the padded rows sum them after (with the norm in
    float64 they agree to 1e-12: the next test)."""
    _shared_prompts_check(make_model(arch, dtype=torch.float64).eval(), chunk, grad_atol=1e-6, grad_rtol=1e-5)


def test_shared_prompts_gradients_are_exact_with_a_float64_norm(make_model, monkeypatch):
    import transformers.models.llama.modeling_llama as llama

    def norm64(self, h):  # RMSNorm in the input's own dtype
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    monkeypatch.setattr(llama.LlamaRMSNorm, "forward", norm64)
    _shared_prompts_check(make_model("llama", dtype=torch.float64).eval(), {"chunk_size": None, "chunk_mb": None},
                          grad_atol=1e-12, grad_rtol=0)


def _shared_prompts_check(model, chunk, *, grad_atol, grad_rtol):
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(3)
    prompt, other = torch.randint(1, V, (6,), generator=g).tolist(), torch.randint(1, V, (4,), generator=g).tolist()
    tail = lambda n: torch.randint(1, V, (n,), generator=g).tolist()  # noqa: E731
    shared_two = tail(2)
    rows = [prompt + shared_two + tail(3), prompt + shared_two + tail(1), prompt + tail(4), other + tail(2),
            [5] + tail(3), [6] + tail(5), [7]]
    groups = torch.tensor([0, 0, 0, 1, 2, 2, 3])
    T = max(map(len, rows))
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    weights = torch.randn(ids.shape, generator=g, dtype=torch.float64)

    def run(**kw):
        model.zero_grad()
        logp, ent = token_logprobs(model, ids, mask, temperature=0.8, with_entropy=True, **chunk, **kw)
        ((logp + 0.1 * ent) * weights).sum().backward()
        return logp.detach(), ent.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    logp, ent, grads = run()
    s_logp, s_ent, s_grads = run(groups=groups)
    torch.testing.assert_close(s_logp, logp, atol=1e-10, rtol=0)
    torch.testing.assert_close(s_ent, ent, atol=1e-10, rtol=0)
    assert len(grads) == len(s_grads) > 0
    for a, b in zip(grads, s_grads):
        torch.testing.assert_close(b, a, atol=grad_atol, rtol=grad_rtol)
    # the layout: rows 0-2 (11, 9 and 10 tokens) run the 6 all three share once, then their own 5, 3 and 4
    from posttrain.logprobs import shared_prefix_layout
    packed, tree, positions, row, at = shared_prefix_layout(ids, mask, groups)
    assert packed.shape[0] == 4 and (row == groups).all()
    assert int((tree[0, 0].diagonal() > 0).sum()) == packed.shape[1]
    assert packed.shape[1] == 6 + 5 + 3 + 4 and (at[1, :6] == torch.arange(6)).all()
    assert (at[0, 6], at[1, 6], at[1, 8], at[2, 6], at[2, 9]) == (6, 11, 13, 14, 17)
    assert (positions[0, 11:14] == torch.arange(6, 9)).all()


def test_shared_prompts_are_used_only_where_they_pay_and_the_attention_allows(make_model, monkeypatch):
    """min_shared: the packed rows must cost at most (1 - min_shared) of the padded rows, positions plus attention's
    query-key pairs weighted by `attention_pair_cost` (2 rows of a 10-token prompt and 2 own tokens: one packed row
    of 14 against 2 of 12); None shares unconditionally; sliding-window attention never takes the tree mask."""
    import posttrain.logprobs as lp
    from transformers import Qwen2Config

    # the benchmarks' small Qwen2: q, o 512 x 512, k, v 512 x 256, MLP 3 x 512 x 1536; a pair 4 x 8 heads x 64
    small = Qwen2Config(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=4)
    assert lp.attention_pair_cost(SimpleNamespace(config=small)) == pytest.approx(2048 / (2 * 3_145_728))
    model = make_model("llama").eval()
    used = []
    real = lp.last_hidden
    monkeypatch.setattr(lp, "last_hidden", lambda m, kw, **k: used.append(kw["attention_mask"].dim()) or real(m, kw, **k))
    ids = torch.tensor([[5] * 10 + [6, 7], [5] * 10 + [8, 9]])
    mask, groups = torch.ones_like(ids), torch.tensor([0, 0])
    pair = lp.attention_pair_cost(model)
    saving = 1 - (14 + pair * 14**2) / (2 * (12 + pair * 12**2))
    assert 0.2 < saving < 0.42  # the pairs' term counts
    for min_shared, tree in ((None, True), (saving - 0.01, True), (saving + 0.01, False)):
        used.clear()
        token_logprobs(model, ids, mask, groups=groups, min_shared=min_shared, chunk_size=2)
        assert used == ([4] if tree else [2]), min_shared
    assert lp.takes_tree_mask(model)
    model.config.sliding_window, model.config.use_sliding_window = 8, True
    assert not lp.takes_tree_mask(model)
    model.config.use_sliding_window = False
    assert lp.takes_tree_mask(model)
