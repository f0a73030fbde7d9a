"""Log-probs + entropy of a [4, 2048] batch over a 32k vocabulary: chunked LM head against the full logits.

    posttrain.logprobs.token_logprobs(model, ids, mask, with_entropy=True, chunk_size=K)   # --variant chunked
    ... chunk_size=None and every other chunk_* argument None (the full logits)           # --variant full
    ... no chunk argument at all: posttrain's default chunking                            # --variant default

The model is a Qwen2 with vocabulary 32000, hidden 256, 2 layers (MODEL below),
random weights; ids are random, the last row right-padded by a quarter. One call is forward + backward of
loss = -(sum logp + 0.01 sum entropy). Measured in this process: the median time of `--repeats` calls after
`--warmup` calls (default none: one call of this size takes seconds, and a fresh process per measurement is what
makes its memory clean), peak RSS (VmHWM) and its rise over the RSS before the first call; under
`bench.run --device cuda` the same on the GPU, memory from the CUDA allocator (peak, and its rise over what the
model and batch held before the first call). `--variant check` runs both
paths on the same weights and reports the largest absolute differences of logp, entropy and the gradients.
Prints one BENCH_RESULT line.
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import time
from pathlib import Path

from bench.common import device, emit, rss_now_mb, setup_threads, sync

SHAPE, VOCAB = (4, 2048), 32000
MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def build():
    """(model, ids, mask): the same for every variant (seeded)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=True,
                                         **MODEL))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, SHAPE, generator=g)
    mask = torch.ones(SHAPE, dtype=torch.long)
    mask[-1, SHAPE[1] * 3 // 4 :] = 0
    return model.to(device()), ids.masked_fill(mask == 0, 0).to(device()), mask.to(device())


def chunk_defaults() -> dict:
    """token_logprobs' chunk_* keyword arguments other than chunk_size, with their defaults (they have changed
    name between versions: chunk_tokens, chunk_mb)."""
    from posttrain.logprobs import token_logprobs

    params = inspect.signature(token_logprobs).parameters
    return {n: p.default for n, p in params.items() if n.startswith("chunk_") and n != "chunk_size"}


def call(model, ids, mask, chunk: int | None | str):
    """One forward + backward; returns (logp, entropy) detached. chunk: K positions; None: the plain full-logits
    path; "default": whatever token_logprobs does when given no chunk argument."""
    from posttrain.logprobs import token_logprobs

    kw = {"with_entropy": True}
    if chunk != "default":
        kw.update({n: None for n in chunk_defaults()}, chunk_size=chunk)  # chunk_size alone decides
    model.zero_grad(set_to_none=True)
    logp, entropy = token_logprobs(model, ids, mask, **kw)
    (-(logp.sum() + 0.01 * entropy.sum())).backward()
    return logp.detach(), entropy.detach()


def peak_mb() -> float:
    """Peak memory of this process so far: VmHWM on the CPU, the CUDA allocator's peak on a GPU."""
    if device() == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=("full", "chunked", "default", "check"), required=True)
    ap.add_argument("--chunk", type=int, default=256, help="K: positions per LM-head chunk")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=0)
    a = ap.parse_args()
    setup_threads()
    model, ids, mask = build()
    if a.variant == "check":
        lp_full, h_full = call(model, ids, mask, None)
        g_full = {n: p.grad.clone() for n, p in model.named_parameters()}
        lp, h = call(model, ids, mask, a.chunk)
        grad_diff = max(float((p.grad - g_full[n]).abs().max()) for n, p in model.named_parameters())
        emit({"variant": "check", "chunk": a.chunk, "logp_max_abs_diff": float((lp - lp_full).abs().max()),
              "entropy_max_abs_diff": float((h - h_full).abs().max()), "grad_max_abs_diff": grad_diff})
        return
    chunk = {"chunked": a.chunk, "full": None, "default": "default"}[a.variant]
    import torch

    before = torch.cuda.memory_allocated() / 2**20 if device() == "cuda" else rss_now_mb()
    for _ in range(a.warmup):
        call(model, ids, mask, chunk)
    times = []
    for _ in range(a.repeats):
        sync()
        t0 = time.perf_counter()
        call(model, ids, mask, chunk)
        sync()
        times.append(time.perf_counter() - t0)
    emit({"variant": a.variant, "chunk": chunk, "defaults": chunk_defaults(), "seconds": statistics.median(times),
          "times": times,
          "peak_mb": round(peak_mb(), 1), "rise_mb": round(peak_mb() - before, 1)})


if __name__ == "__main__":
    main()
