"""The sampler's decode paths side by side: `posttrain.rollout.sampler.sample` through the model's forward
(`native=False`), the native step (`graphs=False`) and, on a GPU, the native step replayed as a CUDA graph; on the
CPU, the native step with every product through F.linear (`native_f_linear`, none through oneDNN).

A random Qwen2 of a bench size (bench/assets.py) with the benchmarks' 1k vocabulary, 8 random prompts of 40 tokens x
4 samples, no stop token (every row runs to the limit), keyed sampling noise (the same tokens on every path, so
the paths do the same work). For each new-token limit and path: the median of `--repeats` timed calls after one
warm-up call, generated tokens/s, and whether the tokens equal the forward path's. On a GPU in the precision a
recipe would run: bf16 weights (`dtype: auto`) or fp32 weights under bf16 autocast (`--mixed`).
Prints one BENCH_RESULT line. Usage: python -m bench.decode --size medium --tokens 32 128
"""
from __future__ import annotations

import argparse
import statistics
import time

from bench.common import device, emit, setup_threads, sync


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--tokens", type=int, nargs="*", default=[32, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mixed", action="store_true", help="GPU: fp32 weights under bf16 autocast (bf16-mixed)")
    a = ap.parse_args()
    setup_threads()
    import contextlib

    import torch

    from bench.assets import build_model
    from posttrain.rollout import decode
    from posttrain.rollout.sampler import row_key, sample

    model = build_model(None, a.size, vocab_size=1024).eval()
    cuda = device() == "cuda"
    model = model.to(device(), torch.bfloat16 if cuda and not a.mixed else torch.float32)
    context = torch.autocast("cuda", torch.bfloat16) if cuda and a.mixed else contextlib.nullcontext()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1024, (40,), generator=g).tolist() for _ in range(8)]
    paths = {"forward": dict(native=False), "native": dict(graphs=False)}
    if cuda:
        paths["graph"] = dict(graphs=True)
    else:  # the native step with every product through F.linear (torch's sgemm), none through oneDNN
        paths["native_f_linear"] = dict(graphs=False)
    out = {"size": a.size, "device": device(), "rows": 32, "prompt_tokens": 40,
           "precision": ("bf16-mixed" if a.mixed else "bf16") if cuda else "fp32", "results": []}
    for n in a.tokens:
        kw = dict(num_samples=4, max_new_tokens=n, stop_ids=[0], pad_id=0, keys=[row_key(7, i) for i in range(32)])
        ref = None
        for name, extra in paths.items():
            times = []
            products = decode.ONEDNN_MIN_WEIGHT
            if name == "native_f_linear":
                decode.ONEDNN_MIN_WEIGHT = float("inf")
            with context:
                for i in range(a.repeats + 1):
                    sync()
                    t0 = time.perf_counter()
                    ro = sample(model, prompts, **kw, **extra)
                    sync()
                    if i:
                        times.append(time.perf_counter() - t0)
            tokens = sum(len(c) for c in ro.completion_ids)
            decode.ONEDNN_MIN_WEIGHT = products
            ref = ref or ro.completion_ids
            s = statistics.median(times)
            out["results"].append({"new_tokens": n, "path": name, "seconds": round(s, 4),
                                   "tokens_per_s": round(tokens / s, 1), "same_tokens": ro.completion_ids == ref})
    for r in out["results"]:
        base = next(x for x in out["results"] if x["new_tokens"] == r["new_tokens"] and x["path"] == "forward")
        r["speedup_vs_forward"] = round(base["seconds"] / r["seconds"], 2)
    emit(out)


if __name__ == "__main__":
    main()
