"""token_logprobs against a plain per-position log_softmax reference, under padding and chunking."""
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
