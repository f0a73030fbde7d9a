"""The benchmarks' own models and data, built locally so that posttrain and TRL load the same directories.

    tokenizer  byte-level BPE of 1024 tokens (posttrain.tiny.train_tokenizer) fitted on the built-in `arith`
               task's questions and worked answers, its `plain` prose, and this repository's README / recipe-key
               reference (the task's text alone stops at ~540 merges)
    tiny       Qwen2ForCausalLM, hidden 128, 8 layers, 4 heads (2 KV), MLP 512: ~2.1M parameters
    small      Qwen2ForCausalLM, hidden 512, 8 layers, 8 heads (4 KV), MLP 1536: ~25.7M parameters
    medium     Qwen2ForCausalLM in Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads (2 KV), MLP 4864) with the
               same 1k vocabulary: ~358M parameters; built only when asked (`--sizes ... medium`, for a GPU)
    sft.jsonl  `text` rows: each arith demonstration rendered with the chat template (a plain language-modelling
               row, so both libraries train on every token)
    grpo.jsonl `prompt` (a chat message list) + `answer` rows of the arith training split

Weights are random (seed 0), tied input / output embeddings, fp32. Generation stops at <|endoftext|> (TRL's
eos) or <|im_end|>; a random model rarely emits either, so completions mostly run to the token limit.
Nothing here measures anything.
"""
from __future__ import annotations

import json
from pathlib import Path

SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4),
    "medium": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2),
}


DEFAULT_SIZES = ("tiny", "small")  # what `make bench` runs; medium is for a GPU


def _corpus(rows: list[dict], plain: list[dict]) -> list[str]:
    texts = [m["content"] for r in rows for m in r["messages"]] + [r["text"] for r in plain]
    for doc in ("README.md", "docs/recipe-keys.md"):
        path = Path(__file__).resolve().parent.parent / doc
        if path.exists():
            texts += [line for line in path.read_text().splitlines() if line.strip()]
    return texts


def build_model(tokenizer, size: str, *, vocab_size: int | None = None, max_positions: int = 1024, seed: int = 0):
    """A randomly initialised Qwen2ForCausalLM of `size` (SIZES) for `tokenizer` (or a bare `vocab_size`)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from posttrain.tiny import EOS, IM_END

    if tokenizer is None:
        config = Qwen2Config(vocab_size=vocab_size, max_position_embeddings=max_positions, tie_word_embeddings=True,
                             **SIZES[size])
    else:
        eos = [tokenizer.convert_tokens_to_ids(t) for t in (EOS, IM_END)]
        config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=max_positions,
                             tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos[0],
                             pad_token_id=tokenizer.pad_token_id, **SIZES[size])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    if tokenizer is not None:
        model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    return model


def build(out: str | Path, sizes=DEFAULT_SIZES) -> dict:
    """Write the tokenizer, the models of `sizes` and both data files under `out`; return their paths and sizes."""
    from posttrain.tasks import get_task
    from posttrain.tiny import train_tokenizer

    from bench.common import matmul_params

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task("arith")
    rows = task.rows("train")
    tokenizer = train_tokenizer(_corpus(rows, task.rows("plain", n=2000)), vocab_size=1024, with_pad=True)
    info: dict = {"vocab": len(tokenizer), "models": {}, "params": {}}
    for size in sizes:
        model = build_model(tokenizer, size)
        path = out / size
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        info["models"][size] = str(path)
        info["params"][size] = matmul_params(model)
    with open(out / "sft.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"text": tokenizer.apply_chat_template(r["messages"], tokenize=False)}) + "\n")
    with open(out / "grpo.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n")
    lengths = [len(tokenizer(json.loads(l)["text"])["input_ids"]) for l in open(out / "sft.jsonl")]
    info.update(sft=str(out / "sft.jsonl"), grpo=str(out / "grpo.jsonl"),
                sft_mean_tokens=sum(lengths) / len(lengths))
    return info


if __name__ == "__main__":
    import sys

    from bench.common import emit

    emit(build(sys.argv[1], sys.argv[2:] or DEFAULT_SIZES))
