"""`make bench`: every benchmark, posttrain beside TRL, each measurement in its own process.

    peak       the fp32 matmul peak (GFLOP/s) on the same threads, at the start and the end; MFU uses the larger
    sft        tokens/s, MFU (6 N per token), peak RSS: tiny and small model, 8 x 128-token packed rows per step
    grpo       completions/s, generated tokens/s, step MFU (2 N per generated + 6 N per trained token), peak RSS:
               tiny and small model, 8 prompts x 4 completions x 32 new tokens, one update per batch
    logprobs   time and peak memory of token_logprobs (with entropy, forward + backward) on [4, 2048] over a 32k
               vocabulary: LM head in chunks of K positions against the full logits; values compared
    scaling    posttrain's GRPO step time against group size, completion length and model size
    profile    where one GRPO step's time goes in each library (generation, rewards, optimizer, the rest)

posttrain and TRL run alternately (A B A B ...) for `--pairs` pairs; a benchmark's `ratio` is the median of the
paired ratios, oriented so that larger is better for posttrain (its throughput / TRL's; TRL's memory /
posttrain's). Each benchmark prints one JSON line; all of them go to bench/results.json, the scaling plot to
bench/scaling.png, and the tables into bench/README.md between its `results` markers.

`--device cuda` runs the same benchmarks on a GPU (both libraries in bf16 mixed precision, MFU against the bf16
matmul peak, the CUDA allocator's peak memory beside RSS) into bench/results_cuda.json; `--sizes medium` adds a
model of Qwen2-0.5B's shape. bench/gpu.sh runs the CUDA tests and these in one command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from bench.assets import DEFAULT_SIZES
from bench.common import THREADS, device, run_child, share_prompts

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    versions = {p: metadata.version(p) for p in ("torch", "transformers", "trl", "posttrain")}
    gpu = {}
    if device() == "cuda":
        import torch

        gpu = {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
               "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    return {"device": device(), "cpu": cpu, "cores": os.cpu_count(), "threads": THREADS, **gpu,
            "python": platform.python_version(), **versions, "load_avg_start": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M")}


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def paired(module: str, args_a: list, args_b: list, pairs: int) -> tuple[list[dict], list[dict]]:
    """Run A (posttrain) then B (TRL) `pairs` times, alternating; return both lists of results."""
    a, b = [], []
    for _ in range(pairs):
        a.append(run_child(module, *args_a))
        b.append(run_child(module, *args_b))
    return a, b


def ratio(a: list[dict], b: list[dict], key: str, *, lower_is_better: bool = False) -> float:
    """Median of the paired ratios a/b (b/a when lower is better): > 1 means posttrain is better."""
    rs = [(y[key] / x[key]) if lower_is_better else (x[key] / y[key]) for x, y in zip(a, b)]
    return round(statistics.median(rs), 3)


def memory_ratios(a: list[dict], b: list[dict]) -> dict:
    """TRL's peak memory over posttrain's (> 1: posttrain uses less): RSS, and on a GPU the CUDA allocator's peak."""
    out = {"ratio_rss": ratio(a, b, "rss_mb", lower_is_better=True)}
    if all(r.get("gpu_peak_mb") for r in a + b):
        out["ratio_gpu_memory"] = ratio(a, b, "gpu_peak_mb", lower_is_better=True)
    return out


def side(runs: list[dict], keys: tuple[str, ...]) -> dict:
    """A side's medians over its runs, and the raw per-run values of the first key."""
    out = {k: median(r.get(k) for r in runs) for k in keys + ("rss_mb", "rss_children_mb", "gpu_peak_mb")}
    out["runs"] = [round(r[keys[0]], 3) for r in runs]
    return out


def notes(pt: list[dict], trl: list[dict]) -> dict:
    """What each side actually ran with: posttrain's packing / LM-head chunk keys, TRL's optimizer and
    checkpointing (both from the first run of each)."""
    return {"posttrain_pack": pt[0].get("has_pack"), "posttrain_logits_chunk": pt[0].get("logits_chunk"),
            "trl_optim": trl[0].get("optim"), "trl_activation_checkpointing": trl[0].get("checkpointing"),
            "trl_padding_free": trl[0].get("padding_free"), "posttrain_device": pt[0].get("device"),
            "posttrain_weights": pt[0].get("weights_dtype"), "trl_weights": trl[0].get("weights_dtype")}


def bench_sft(assets: dict, size: str, peak: float, a) -> dict:
    docs = round(8 * 128 / assets["sft_mean_tokens"])  # (a posttrain without batch.pack: rows counts documents)
    common = ["--model", assets["models"][size], "--data", assets["sft"], "--steps", a.sft_steps + 2,
              "--warmup", 2, "--docs", docs]
    pt, trl = paired("bench.sft", ["--side", "posttrain", *common], ["--side", "trl", *common], a.pairs)
    n = assets["params"][size]
    line = {"bench": "sft", "model": size, "params": n,
            "settings": {"rows_per_step": 8, "pack_len": 128, "posttrain_docs_per_step": docs,
                         "steps_timed": a.sft_steps, **notes(pt, trl)},
            "posttrain": side(pt, ("tokens_per_s", "tokens_per_step")),
            "trl": side(trl, ("tokens_per_s", "tokens_per_step")),
            "ratio": ratio(pt, trl, "tokens_per_s"), **memory_ratios(pt, trl)}
    for s in ("posttrain", "trl"):
        line[s]["mfu"] = round(line[s]["tokens_per_s"] * 6 * n / (peak * 1e9), 4)
    return line


def grpo_args(assets: dict, size: str, group: int, new_tokens: int, steps: int) -> list:
    return ["--model", assets["models"][size], "--data", assets["grpo"], "--prompts", 8, "--group", group,
            "--new-tokens", new_tokens, "--steps", steps + 1, "--warmup", 1]


def step_mfu(r: dict, n: int, peak: float) -> float:
    flops = 2 * n * r["gen_tokens_per_step"] + 6 * n * r["train_tokens_per_step"]
    return flops / r["step_s"] / (peak * 1e9)


def bench_grpo(assets: dict, size: str, peak: float, a) -> dict:
    common = grpo_args(assets, size, 4, 32, a.grpo_steps)
    pt, trl = paired("bench.grpo", ["--side", "posttrain", *common], ["--side", "trl", *common], a.pairs)
    n = assets["params"][size]
    for r in pt + trl:
        r["mfu"] = step_mfu(r, n, peak)
    keys = ("completions_per_s", "gen_tokens_per_s", "step_s", "mfu", "completion_len")
    line = {"bench": "grpo", "model": size, "params": n,
            "settings": {"prompts": 8, "group": 4, "max_new_tokens": 32, "steps_timed": a.grpo_steps,
                         "kl_beta": 0.0, "updates_per_batch": 1, "posttrain_share_prompts": share_prompts(),
                         **notes(pt, trl)},
            "posttrain": side(pt, keys), "trl": side(trl, keys),
            "ratio": ratio(pt, trl, "completions_per_s"),
            "ratio_gen_tokens_per_s": ratio(pt, trl, "gen_tokens_per_s"),
            **memory_ratios(pt, trl)}
    line["posttrain"]["t_rollout"] = median(r["t_rollout"] for r in pt)
    return line


def bench_logprobs(a) -> dict:
    full, chunked, default = [], [], []
    timing = ["--warmup", 1, "--repeats", 5] if device() == "cuda" else []  # a GPU call takes milliseconds
    for _ in range(a.pairs):  # full, K, posttrain's default alternately
        full.append(run_child("bench.logprobs", "--variant", "full", *timing))
        chunked.append(run_child("bench.logprobs", "--variant", "chunked", "--chunk", a.chunk, *timing))
        default.append(run_child("bench.logprobs", "--variant", "default", *timing))
    check = run_child("bench.logprobs", "--variant", "check", "--chunk", a.chunk)

    def summary(runs):
        return {"seconds": median(r["seconds"] for r in runs), "peak_mb": median(r["peak_mb"] for r in runs),
                "rise_mb": median(r["rise_mb"] for r in runs), "runs": [round(r["seconds"], 3) for r in runs]}

    return {"bench": "logprobs", "shape": [4, 2048], "vocab": 32000, "chunk": a.chunk,
            "default_args": default[0]["defaults"],
            "full": summary(full), "chunked": summary(chunked), "default": summary(default),
            "ratio": ratio(chunked, full, "seconds", lower_is_better=True),
            "ratio_memory": ratio(chunked, full, "rise_mb", lower_is_better=True),
            "ratio_default": ratio(default, full, "seconds", lower_is_better=True),
            "ratio_memory_default": ratio(default, full, "rise_mb", lower_is_better=True),
            "logp_max_abs_diff": check["logp_max_abs_diff"], "entropy_max_abs_diff": check["entropy_max_abs_diff"],
            "grad_max_abs_diff": check["grad_max_abs_diff"]}


SCALING = [("group", 4, "tiny", 4, 32), ("group", 8, "tiny", 8, 32), ("group", 16, "tiny", 16, 32),
           ("length", 128, "tiny", 4, 128), ("length", 512, "tiny", 4, 512), ("model", "small", "small", 4, 32)]


def bench_scaling(assets: dict, peak: float, a) -> dict:
    points, seen = [], {}
    for axis, value, size, group, new_tokens in SCALING:
        key = (size, group, new_tokens)
        if key not in seen:
            seen[key] = run_child("bench.grpo", "--side", "posttrain",
                                  *grpo_args(assets, size, group, new_tokens, a.scaling_steps))
        r = seen[key]
        points.append({"axis": axis, "value": value, "model": size, "group": group, "max_new_tokens": new_tokens,
                       "step_s": round(r["step_s"], 3), "completion_len": round(r["completion_len"], 1),
                       "gen_tokens_per_s": round(r["gen_tokens_per_s"], 1),
                       "t_rollout": round(r["t_rollout"], 3),
                       "mfu": round(step_mfu(r, assets["params"][size], peak), 4), "rss_mb": r["rss_mb"]})
    base = next(p for p in points if p["axis"] == "group" and p["value"] == 4)  # the base of the other two axes
    points += [dict(base, axis="length", value=32), dict(base, axis="model", value="tiny")]
    return {"bench": "scaling", "prompts": 8, "steps_timed": a.scaling_steps, "points": points}


def bench_profile(assets: dict) -> dict:
    args = ["--model", assets["models"]["tiny"], "--data", assets["grpo"], "--steps", 3, "--warmup", 1]
    return {"bench": "profile", "model": "tiny", "settings": {"prompts": 8, "group": 4, "max_new_tokens": 32},
            "posttrain": run_child("bench.profile", "--side", "posttrain", *args),
            "trl": run_child("bench.profile", "--side", "trl", *args)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--sft-steps", type=int, default=5, help="timed SFT steps (after 2 warm-up steps)")
    ap.add_argument("--grpo-steps", type=int, default=3, help="timed GRPO steps (after 1 warm-up step)")
    ap.add_argument("--scaling-steps", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=256, help="logprobs: K positions per LM-head chunk")
    ap.add_argument("--only", nargs="*", default=None, help="a subset: sft grpo logprobs scaling profile")
    ap.add_argument("--sizes", nargs="*", default=list(DEFAULT_SIZES), help="models: tiny small (medium: GPU-sized)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: both libraries on the GPU in bf16 mixed precision, MFU against the bf16 peak")
    ap.add_argument("--share-prompts", choices=("off", "auto", "on"), default="auto",
                    help="posttrain's batch.share_prompts in GRPO (each prompt once per log-prob pass); auto: its default")
    ap.add_argument("--keep-going", action="store_true", help="record a failed benchmark's error and go on")
    ap.add_argument("--out", default=None, help="default bench/results.json (bench/results_cuda.json on a GPU)")
    ap.add_argument("--no-readme", action="store_true", help="leave bench/README.md as it is (always, on a GPU)")
    a = ap.parse_args()
    os.environ["BENCH_DEVICE"] = a.device  # every child inherits it (bench.common.device)
    os.environ["BENCH_SHARE_PROMPTS"] = a.share_prompts
    a.out = a.out or str(HERE / ("results.json" if a.device == "cpu" else "results_cuda.json"))
    a.no_readme = a.no_readme or a.device != "cpu"  # the README's tables are the CPU run's
    todo = set(a.only or ("sft", "grpo", "logprobs", "scaling", "profile"))
    t0 = time.perf_counter()
    info = machine()
    lines: list[dict] = []

    def report(line: dict) -> None:
        print(json.dumps(line), flush=True)
        lines.append(line)

    def attempt(name: str, fn, *args) -> None:
        try:
            report(fn(*args))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            if not a.keep_going:
                raise
            report({"bench": name, "args": [x for x in args if isinstance(x, str)], "error": str(e)[-2000:]})

    with tempfile.TemporaryDirectory(prefix="posttrain-bench-") as work:
        needed = a.sizes + ["tiny", "small"] * ("scaling" in todo) + ["tiny"] * ("profile" in todo)
        assets = run_child("bench.assets", work, *dict.fromkeys(needed))
        measured = [run_child("bench.peak")]
        peak = measured[0]["gflops"]
        for size in a.sizes:
            if "sft" in todo:
                attempt("sft", bench_sft, assets, size, peak, a)
            if "grpo" in todo:
                attempt("grpo", bench_grpo, assets, size, peak, a)
        if "logprobs" in todo:
            attempt("logprobs", bench_logprobs, a)
        if "scaling" in todo:
            attempt("scaling", bench_scaling, assets, peak, a)
        if "profile" in todo:
            attempt("profile", bench_profile, assets)
        measured.append(run_child("bench.peak"))
    # MFU was computed against the first measurement; rescale to the larger of the two (the machine's peak).
    peaks = [m["gflops"] for m in measured]
    best = max(peaks)
    for line in lines:
        for s in ("posttrain", "trl"):
            if isinstance(line.get(s), dict) and line[s].get("mfu") is not None:
                line[s]["mfu"] = round(line[s]["mfu"] * peak / best, 4)
        for p in line.get("points", []):
            p["mfu"] = round(p["mfu"] * peak / best, 4)
    info.update(matmul_peak_gflops=[round(p, 1) for p in peaks],
                matmul_peak_by_library=[m.get("by_library", {}) for m in measured], load_avg_end=os.getloadavg()[0],
                wall_s=round(time.perf_counter() - t0, 1), command=" ".join(["python -m bench.run", *sys.argv[1:]]))
    report({"bench": "machine", **info})
    Path(a.out).write_text(json.dumps(lines, indent=1) + "\n")
    scaling = next((l for l in lines if l["bench"] == "scaling"), None)
    if scaling:
        from bench.report import plot_scaling

        plot_scaling(scaling, HERE / "scaling.png")
    if not a.no_readme:
        from bench.report import render

        readme = HERE / "README.md"
        text = readme.read_text()
        head, rest = text.split(BEGIN, 1)
        readme.write_text(head + BEGIN + "\n" + render(lines) + "\n" + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
