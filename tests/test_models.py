"""Model and tokenizer loading, compatibility checks, stop tokens and the atomic save that plain transformers loads."""
import copy
import logging
import shutil

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import posttrain.models as pm
from posttrain.models import (
    check_compatible,
    choose_dtype,
    load_model,
    load_policy,
    load_tokenizer,
    pick_device,
    resolve_model,
    save_pretrained,
    stop_token_ids,
)
from posttrain.tiny import CHAT_TEMPLATE


@pytest.fixture
def tok(tokenizer):
    return load_tokenizer(copy.deepcopy(tokenizer))  # the session fixture keeps its missing pad


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_then_load_round_trips_every_tiny_arch(arch, make_model, tok, tmp_path):
    model = make_model(arch, seed=3)
    stop = stop_token_ids(tok, model)
    out = tmp_path / "final"
    save_pretrained(model, tok, out, stop_ids=stop)
    assert not (tmp_path / "final.tmp").exists() and (out / "model.safetensors").exists()

    plain = AutoModelForCausalLM.from_pretrained(out)  # a user with plain transformers
    assert_same_weights(model, plain)
    assert plain.generation_config.eos_token_id == stop == [0, 2]
    assert plain.generation_config.pad_token_id == tok.pad_token_id == 0
    plain_tok = AutoTokenizer.from_pretrained(out)
    assert plain_tok.chat_template == CHAT_TEMPLATE

    loaded, loaded_tok = load_policy(str(out), device="cpu")
    assert_same_weights(model, loaded)
    assert loaded.dtype == torch.float32 and loaded_tok.chat_template == CHAT_TEMPLATE
    x = torch.tensor([[1, 5, 9, 2]])
    model.eval()  # gpt2 has dropout; from_pretrained returns eval mode
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_save_replaces_an_existing_directory_whole(make_model, tok, tmp_path):
    out = tmp_path / "final"
    save_pretrained(make_model("llama", seed=0), tok, out, stop_ids=[0])
    (out / "stale.txt").write_text("from the first save")
    second = make_model("llama", seed=1)
    save_pretrained(second, tok, out, stop_ids=[0, 2])
    assert not (out / "stale.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert_same_weights(second, AutoModelForCausalLM.from_pretrained(out))
    with pytest.raises(ValueError, match="stop_ids is empty"):
        save_pretrained(second, tok, out, stop_ids=[])


def test_save_leaves_the_callers_generation_config_alone(make_model, tok, tmp_path):
    model = make_model("qwen2")
    before = model.generation_config.to_dict()
    save_pretrained(model, tok, tmp_path / "final", stop_ids=[0, 2, 7])
    assert model.generation_config.to_dict() == before
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "final").generation_config.eos_token_id == [0, 2, 7]


def test_hub_id_loads_from_a_fake_offline_cache(make_model, tok, tmp_path, monkeypatch):
    revision = "fedcba98" * 5
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    model = make_model("mistral")
    save_pretrained(model, tok, repo / "snapshots" / revision, stop_ids=[0, 2])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)

    assert resolve_model("org/tiny") == str(repo / "snapshots" / revision)
    loaded, loaded_tok = load_policy("org/tiny", device="cpu")
    assert_same_weights(model, loaded)
    assert loaded_tok.chat_template == CHAT_TEMPLATE
    with pytest.raises(FileNotFoundError) as e:
        resolve_model("org/absent")
    assert "models--org--absent" in str(e.value) and "HF_HUB_OFFLINE=1" in str(e.value)


def test_resolve_errors_name_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown built-in model 'builtin:huge'; available: builtin:tiny"):
        resolve_model("builtin:huge")
    monkeypatch.setitem(pm.BUILTIN_MODELS, "builtin:tiny", str(tmp_path / "not-there"))
    with pytest.raises(FileNotFoundError, match="'builtin:tiny' is not installed"):
        resolve_model("builtin:tiny")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_tokenizer_bigger_than_embeddings_is_an_error_only_for_ids_we_produce(make_model, tok):
    model = make_model("gpt2")
    check_compatible(model, tok)  # equal sizes are fine
    bigger = copy.deepcopy(tok)
    bigger.add_tokens(["<new_a>", "<new_b>"])
    check_compatible(model, bigger)  # ids past the rows that nothing produces (tests/test_user_model.py)
    bigger.eos_token = "<new_b>"
    with pytest.raises(ValueError, match=r"has 320 rows, but training would feed it '<new_b>' \(id 321, eos\)"):
        check_compatible(model, bigger)


def word_tokenizer(**specials):
    vocab = {"a": 0, "b": 1, "[UNK]": 2, "<|im_end|>": 3}
    if not specials.pop("with_im_end", False):
        del vocab["<|im_end|>"]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                   unk_token="[UNK]", **specials)


def test_tokenizer_without_eos_or_end_of_turn_is_an_error():
    with pytest.raises(ValueError, match="has no eos token and none of the end-of-turn tokens"):
        load_tokenizer(word_tokenizer())


def test_tokenizer_without_eos_uses_end_of_turn_token(caplog):
    with caplog.at_level(logging.INFO, logger="posttrain"):
        t = load_tokenizer(word_tokenizer(with_im_end=True))
    assert t.eos_token_id == 3 and t.pad_token_id == 3
    assert "using end-of-turn token <|im_end|>" in caplog.text


def test_pad_falls_back_to_eos_and_logs(tokenizer, caplog):
    assert tokenizer.pad_token is None
    with caplog.at_level(logging.INFO, logger="posttrain"):
        t = load_tokenizer(copy.deepcopy(tokenizer))
    assert t.pad_token_id == t.eos_token_id == 0
    assert "no pad token; using eos <|endoftext|> (id 0) as pad" in caplog.text


def test_explicit_pad_is_kept(tokenizer_with_pad, caplog):
    with caplog.at_level(logging.INFO, logger="posttrain"):
        t = load_tokenizer(copy.deepcopy(tokenizer_with_pad))
    assert t.pad_token == "<|pad|>" and t.pad_token_id != t.eos_token_id and "pad" not in caplog.text


def test_stop_tokens_join_eos_generation_config_and_end_of_turn(tok, make_model):
    assert stop_token_ids(tok) == [0, 2]  # eos and <|im_end|> found by name
    model = make_model("llama")
    model.generation_config.eos_token_id = 7  # an int, as many configs have
    assert stop_token_ids(tok, model) == [0, 2, 7]
    model.generation_config.eos_token_id = [9, 0]
    assert stop_token_ids(tok, model) == [0, 2, 9]
    with pytest.raises(ValueError, match="no stop token"):
        stop_token_ids(word_tokenizer())


def test_dtype_and_device_choices():
    assert choose_dtype("auto", "cpu") == torch.float32
    assert choose_dtype("bfloat16") == torch.bfloat16 and choose_dtype("float16") == torch.float16
    assert choose_dtype(torch.float64) == torch.float64
    with pytest.raises(ValueError, match="unknown dtype 'half'; use 'auto', 'float32'"):
        choose_dtype("half")
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        pick_device("tpu")


def test_bf16_mixed_keeps_fp32_weights_and_computes_the_step_in_bf16(make_model, tokenizer):
    """dtype bf16-mixed: weights fp32, the trainer's forward autocast (the LM head's output bf16), log-probs and
    gradients fp32, and the loss within bf16's error of the fp32 loss, not equal to it."""
    from posttrain.data.batch import demo_batch
    from posttrain.data.encode import encode_sft
    from posttrain.models import compute_context
    from posttrain.recipe import load_recipe
    from posttrain.training.update import ObjectiveSpec, accumulate_gradients

    assert choose_dtype("bf16-mixed", "cpu") == torch.float32
    model = make_model("llama")
    rows = [{"prompt": f"Say {c} {i} times.", "completion": c * (i + 1)} for i, c in enumerate("ABCDE")]
    batch = demo_batch([encode_sft(r, "prompt_completion", tokenizer) for r in rows], tokenizer.eos_token_id)
    st = load_recipe({"model": "m", "stages": [{"method": "sft", "data": {"path": "x"}}]}).stages[0]
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    losses = {}
    for dtype in ("float32", "bf16-mixed"):
        model.zero_grad()
        with compute_context(dtype, "cpu"):
            losses[dtype] = float(accumulate_gradients(model, batch, ObjectiveSpec.from_stage(st), micro_size=8,
                                                       device="cpu")[0])
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert seen == [torch.float32, torch.bfloat16]
    assert losses["bf16-mixed"] != losses["float32"]
    assert losses["bf16-mixed"] == pytest.approx(losses["float32"], rel=0.01)


def test_load_model_in_requested_dtype(make_model, tok, tmp_path):
    model = make_model("qwen2")
    save_pretrained(model, tok, tmp_path / "m", stop_ids=[0, 2])
    half = load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    assert torch.equal(half.get_input_embeddings().weight, model.get_input_embeddings().weight.to(torch.bfloat16))
    shutil.rmtree(tmp_path / "m")
