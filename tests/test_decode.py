"""The native decode step (rollout/decode.py) against the model's own forward; the models it leaves to the forward."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from posttrain.rollout import decode
from posttrain.rollout.sampler import row_key, sample
from posttrain.tiny import tiny_model

PROMPTS = [[5, 17, 33, 8, 90, 12, 6], [41], [7, 7, 200, 64]]  # left padding of 6 and 3 positions
STOPS = list(range(40, 90))  # rows of a random model finish at different steps: the batch shrinks mid-decode
PAD = 0
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256)

# (architecture, overrides): grouped and plain heads, biases on every projection, Qwen3's q/k norms, a scaled rope
CASES = {
    "llama-gqa": ("llama", dict(num_key_value_heads=2)),
    "llama-bias-mha": ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "llama-rope-linear": ("llama", dict(num_key_value_heads=2, rope_parameters={"rope_type": "linear", "factor": 3.0,
                                                                                  "rope_theta": 500.0})),
    "qwen2": ("qwen2", dict(num_key_value_heads=2)),
    "qwen3": ("qwen3", dict(num_key_value_heads=2, head_dim=12)),
    "mistral": ("mistral", dict(num_key_value_heads=1, sliding_window=None)),
}


def _model(arch: str, vocab: int, seed: int = 0, **kw) -> torch.nn.Module:
    config = AutoConfig.for_model(arch, vocab_size=vocab, bos_token_id=None, eos_token_id=1, pad_token_id=PAD,
                                  tie_word_embeddings=False, **{**SMALL, **kw})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    with torch.no_grad():  # biases and norm weights away from their 0 / 1 initialisation, so that using them shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return model


def _both(model, monkeypatch, noise=dict, **kw):
    """sample(...) through the native step and through the model's forward (`noise()` adds the sampling noise's
    arguments afresh to each) -> both rollouts and the number of native steps taken; asserts the forward took none."""
    calls = []
    step = decode.NativeDecoder.step
    monkeypatch.setattr(decode.NativeDecoder, "step", lambda self, *a: calls.append(1) or step(self, *a))
    monkeypatch.setattr(decode, "_FIRST_ROOM", 3)  # the key / value buffers grow several times in a rollout
    native = sample(model, PROMPTS, native=True, **kw, **noise())
    n_native = len(calls)
    forward = sample(model, PROMPTS, native=False, **kw, **noise())
    assert len(calls) == n_native, "native=False must not use the native step"
    return native, forward, n_native


@pytest.mark.parametrize("case", list(CASES))
def test_native_step_decodes_exactly_as_the_forward(case, tokenizer, monkeypatch):
    arch, kw = CASES[case]
    model = _model(arch, len(tokenizer), **kw)
    assert decode.unsupported(model, 64) is None
    keys = [row_key(9, i) for i in range(len(PROMPTS) * 3)]
    for noise in (lambda: dict(generator=torch.Generator().manual_seed(3)),  # a fresh, equal generator per side
                  lambda: dict(keys=keys, temperature=0.8, top_p=0.9)):
        native, forward, n_steps = _both(model, monkeypatch, num_samples=3, max_new_tokens=14, stop_ids=STOPS,
                                         pad_id=PAD, noise=noise)
        assert n_steps > 0
        assert native.completion_ids == forward.completion_ids
        assert len({len(c) for c in native.completion_ids}) > 1, "rows should finish at different steps"
        assert native.truncated == forward.truncated
        for a, b in zip(native.sampler_logp, forward.sampler_logp):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_static_step_a_cuda_graph_replays_decodes_exactly_as_the_forward(case, tokenizer, monkeypatch):
    """GraphDecoder's step without the capture (fixed buffers, the column from a tensor, attention over every
    column under the mask, finished rows decoded on and dropped from the output) through the sampler."""
    from functools import partial

    from posttrain.rollout import sampler

    arch, kw = CASES[case]
    model = _model(arch, len(tokenizer), **kw)
    monkeypatch.setattr(sampler, "NativeDecoder", partial(decode.NativeDecoder, static=True))
    made = []
    monkeypatch.setattr(decode.NativeDecoder, "_run", lambda self: made.append(self.static) or
                        decode.NativeDecoder._forward(self, self.ids, self.position_ids, None))
    keys = [row_key(5, i) for i in range(len(PROMPTS) * 3)]
    static = sample(model, PROMPTS, num_samples=3, max_new_tokens=14, stop_ids=STOPS, pad_id=PAD, keys=keys,
                    temperature=0.8, top_p=0.9)
    assert made and all(made), "the static step should have run"
    forward = sample(model, PROMPTS, num_samples=3, max_new_tokens=14, stop_ids=STOPS, pad_id=PAD, keys=keys,
                     temperature=0.8, top_p=0.9, native=False)
    assert static.completion_ids == forward.completion_ids
    assert len({len(c) for c in static.completion_ids}) > 1, "rows should finish at different steps"
    for a, b in zip(static.sampler_logp, forward.sampler_logp):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_native_step_is_the_path_taken_and_matches_in_float32(tokenizer, monkeypatch):
    model = tiny_model("qwen2", tokenizer, seed=1).eval()
    native, forward, n_steps = _both(model, monkeypatch, num_samples=4, max_new_tokens=10, stop_ids=STOPS,
                                     pad_id=PAD, keys=[row_key(1, i) for i in range(12)])
    assert n_steps > 0
    assert native.completion_ids == forward.completion_ids
    for a, b in zip(native.sampler_logp, forward.sampler_logp):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_greedy_native_equals_greedy_forward_across_batch_sizes(tokenizer):
    model = _model("llama", len(tokenizer), num_key_value_heads=2)
    ref = sample(model, PROMPTS, max_new_tokens=12, stop_ids=STOPS, pad_id=PAD, greedy=True, native=False)
    for batch_size in (None, 1, 2):
        out = sample(model, PROMPTS, max_new_tokens=12, stop_ids=STOPS, pad_id=PAD, greedy=True, batch_size=batch_size)
        assert out.completion_ids == ref.completion_ids


def test_models_the_native_step_does_not_cover_say_why_and_decode_through_their_forward(tokenizer, monkeypatch):
    gpt2 = tiny_model("gpt2", tokenizer).eval()
    assert "GPT2LMHeadModel is not one of" in decode.unsupported(gpt2, 10)

    windowed = _model("mistral", len(tokenizer), num_key_value_heads=2, sliding_window=16)
    assert decode.unsupported(windowed, 16) is None
    assert "sliding window 16 shorter than the rollout's 17 positions" in decode.unsupported(windowed, 17)
    # prompts of up to 7 tokens + 12 new: past the window, so the forward (which applies the window) decodes
    native, forward, n_steps = _both(windowed, monkeypatch, num_samples=2, max_new_tokens=12, stop_ids=[1],
                                     pad_id=PAD, greedy=True)
    assert n_steps == 0 and native.completion_ids == forward.completion_ids

    hooked = _model("llama", len(tokenizer), num_key_value_heads=2)
    handle = hooked.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert "forward hooks" in decode.unsupported(hooked, 10)
    handle.remove()
    assert decode.unsupported(hooked, 10) is None

    assert decode.graph_unsupported(hooked) is None
    dynamic = _model("llama", len(tokenizer), num_key_value_heads=2,
                     rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0})
    assert decode.unsupported(dynamic, 10) is None  # decodes natively, eagerly (not as a CUDA graph)
    assert "rope type 'dynamic' updates its frequencies on the host" in decode.graph_unsupported(dynamic)

    silu_free = _model("llama", len(tokenizer), num_key_value_heads=2, hidden_act="gelu")
    assert "hidden_act 'gelu'" in decode.unsupported(silu_free, 10)


def test_lora_wrapped_policies_decode_natively_as_peft_computes_them(tokenizer, monkeypatch):
    from peft import LoraConfig, get_peft_model

    base = _model("qwen2", len(tokenizer), num_key_value_heads=2)
    peft = get_peft_model(base, LoraConfig(r=2, lora_alpha=6, lora_dropout=0.1, target_modules="all-linear"))
    with torch.no_grad():  # B = 0 at the start would hide the adapters
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    assert decode.unsupported(peft, 64) is None
    kw = dict(num_samples=3, max_new_tokens=12, stop_ids=STOPS, pad_id=PAD, keys=[row_key(4, i) for i in range(9)])
    on = _both(peft, monkeypatch, **kw)
    with peft.disable_adapter():  # (get_peft_model wraps `base` in place: this is the model without adapters)
        off = _both(peft, monkeypatch, **kw)
    for native, forward, n_steps in (on, off):
        assert n_steps > 0 and native.completion_ids == forward.completion_ids
        for a, b in zip(native.sampler_logp, forward.sampler_logp):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert on[0].completion_ids != off[0].completion_ids, "the adapters should change the samples"


def test_lora_variants_decode_through_their_forward(tokenizer):
    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(_model("llama", len(tokenizer), num_key_value_heads=2),
                          LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True))
    assert "self_attn.q_proj uses a LoRA variant" in decode.unsupported(dora, 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_on_cuda_matches_the_forward(tokenizer, monkeypatch, dtype):
    model = _model("qwen2", len(tokenizer), num_key_value_heads=2).to("cuda", dtype)
    native, forward, n_steps = _both(model, monkeypatch, num_samples=4, max_new_tokens=12, stop_ids=STOPS,
                                     pad_id=PAD, keys=[row_key(2, i) for i in range(12)])
    assert n_steps > 0
    tol = 1e-4 if dtype == torch.float32 else 0.1  # bf16: an ulp of a logit is ~0.03
    for a, b, ca, cb in zip(native.sampler_logp, forward.sampler_logp, native.completion_ids, forward.completion_ids):
        n = next((i for i, (x, y) in enumerate(zip(ca, cb)) if x != y), min(len(ca), len(cb)))
        torch.testing.assert_close(a[:n], b[:n], atol=tol, rtol=0)  # up to the first token drawn apart
        if dtype == torch.float32:
            assert ca == cb


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "lora-fp32"])
def test_cuda_graph_replays_equal_the_eager_native_step(tokenizer, monkeypatch, precision):
    """rollout.cuda_graphs: the captured step replayed per token gives the eager native step's tokens and log-probs
    (one capture per rollout batch); under bf16 autocast on fp32 weights too (the casts inside the graph)."""
    model = _model("qwen2", len(tokenizer), num_key_value_heads=2).to("cuda", torch.float32)
    if precision == "lora-fp32":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=6, target_modules="all-linear"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
    captured = []
    run = decode.GraphDecoder._run
    monkeypatch.setattr(decode.GraphDecoder, "_run", lambda self: (captured.append(self.graph is None), run(self))[1])
    kw = dict(num_samples=4, max_new_tokens=16, stop_ids=STOPS, pad_id=PAD, keys=[row_key(3, i) for i in range(12)],
              batch_size=8)
    with torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16-autocast"):
        graph = sample(model, PROMPTS, **kw)
        eager = sample(model, PROMPTS, graphs=False, **kw)
    assert sum(captured) == 2 and len(captured) > 2, "one capture per batch of 8 rows, replays after it"
    tol = 1e-5 if precision != "bf16-autocast" else 0.1
    for a, b, ca, cb in zip(graph.sampler_logp, eager.sampler_logp, graph.completion_ids, eager.completion_ids):
        n = next((i for i, (x, y) in enumerate(zip(ca, cb)) if x != y), min(len(ca), len(cb)))
        torch.testing.assert_close(a[:n], b[:n], atol=tol, rtol=0)
        if precision != "bf16-autocast":
            assert ca == cb


def test_large_float32_projections_decode_through_onednn_as_f_linear_computes_them(tokenizer, monkeypatch):
    """On the CPU a float32 weight of at least ONEDNN_MIN_WEIGHT entries goes through oneDNN's product (here every
    weight, the threshold lowered): the same tokens as the forward, log-probs to float32 rounding."""
    if decode.onednn_linear_op() is None:
        pytest.skip("this torch has no oneDNN linear")
    model = tiny_model("qwen2", tokenizer, seed=1).eval()
    monkeypatch.setattr(decode, "ONEDNN_MIN_WEIGHT", 0)
    calls = []
    op = decode._ONEDNN[0]
    monkeypatch.setattr(decode, "_ONEDNN", [lambda *a: calls.append(1) or op(*a)])
    native, forward, n_steps = _both(model, monkeypatch, num_samples=4, max_new_tokens=10, stop_ids=STOPS,
                                     pad_id=PAD, keys=[row_key(1, i) for i in range(12)])
    layers = model.config.num_hidden_layers
    assert len(calls) == n_steps * (7 * layers + 1), "every projection and the LM head, each step"
    assert native.completion_ids == forward.completion_ids
    for a, b in zip(native.sampler_logp, forward.sampler_logp):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_onednn_takes_only_large_float32_cpu_weights_outside_autocast():
    rows = decode.ONEDNN_MIN_WEIGHT // 64
    x, w, b = torch.randn(5, 64), torch.randn(rows, 64), torch.randn(rows)
    assert decode._linear(w[:-1]) is F.linear  # one row short of the threshold
    assert decode._linear(w.double()) is F.linear
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert decode._linear(w) is F.linear
    if decode.onednn_linear_op() is not None:
        assert decode._linear(w) is not F.linear
        torch.testing.assert_close(decode._linear(w)(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)


def test_a_lora_policys_base_products_go_through_onednn_too(tokenizer, monkeypatch):
    if decode.onednn_linear_op() is None:
        pytest.skip("this torch has no oneDNN linear")
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(_model("qwen2", len(tokenizer), num_key_value_heads=2).float(),
                          LoraConfig(r=2, lora_alpha=6, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    monkeypatch.setattr(decode, "ONEDNN_MIN_WEIGHT", 0)  # (the rank-2 adapters' products stay F.linear's)
    calls = []
    op = decode._ONEDNN[0]
    monkeypatch.setattr(decode, "_ONEDNN", [lambda *a: calls.append(1) or op(*a)])
    native, forward, n_steps = _both(peft, monkeypatch, num_samples=3, max_new_tokens=12, stop_ids=STOPS,
                                     pad_id=PAD, keys=[row_key(4, i) for i in range(9)])
    assert len(calls) == n_steps * (7 * SMALL["num_hidden_layers"] + 1), "every base projection and the LM head"
    assert native.completion_ids == forward.completion_ids
    for a, b in zip(native.sampler_logp, forward.sampler_logp):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
