"""Tables and the scaling plot of a benchmark run (bench/results.json's lines); measures nothing."""
from __future__ import annotations

import json


def _f(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _headline(lines: list[dict]) -> list[str]:
    out = ["| benchmark | model | metric | posttrain | TRL | ratio (posttrain / TRL) | MFU posttrain / TRL "
           "| peak RSS MB posttrain / TRL (ratio) |", "|---|---|---|---|---|---|---|---|"]
    for l in lines:
        if l["bench"] not in ("sft", "grpo"):
            continue
        p, t = l["posttrain"], l["trl"]
        rss = f"{_f(p['rss_mb'], 0)} (+{_f(p['rss_children_mb'], 0)} worker) / {_f(t['rss_mb'], 0)} " \
              f"({l['ratio_rss']:.2f})" if p.get("rss_children_mb") else \
              f"{_f(p['rss_mb'], 0)} / {_f(t['rss_mb'], 0)} ({l['ratio_rss']:.2f})"
        model = f"{l['model']} ({l['params'] / 1e6:.1f}M)"
        if l["bench"] == "sft":
            rows = [("tokens/s", "tokens_per_s", l["ratio"])]
        else:
            rows = [("completions/s", "completions_per_s", l["ratio"]),
                    ("generated tokens/s", "gen_tokens_per_s", l["ratio_gen_tokens_per_s"])]
        for i, (name, key, r) in enumerate(rows):
            mfu = f"{_pct(p['mfu'])} / {_pct(t['mfu'])}" if i == 0 else ""
            out.append(f"| {l['bench'] if i == 0 else ''} | {model if i == 0 else ''} | {name} | {_f(p[key])} "
                       f"| {_f(t[key])} | **{r:.2f}** | {mfu} | {rss if i == 0 else ''} |")
    return out


def _logprobs(l: dict) -> list[str]:
    k = l["chunk"]
    out = ["Log-probs + entropy, forward + backward, [4, 2048] ids, vocabulary 32000 (Qwen2, hidden 256, 2 layers): "
           "`token_logprobs(..., with_entropy=True, chunk_size=K)` against `chunk_size=None` (the full logits).", "",
           "| LM head | seconds (median) | peak RSS MB | rise over the RSS before the call, MB |", "|---|---|---|---|"]
    args = ", ".join(f"{n}={v}" for n, v in l["default_args"].items()) or "no chunk argument"
    for name, key in (("full logits (chunk_size=None)", "full"), (f"chunks of K = {k} positions", "chunked"),
                      (f"posttrain's default ({args})", "default")):
        s = l[key]
        out.append(f"| {name} | {_f(s['seconds'], 2)} | {_f(s['peak_mb'], 0)} | {_f(s['rise_mb'], 0)} |")
    out += ["", f"Ratios (full / chunked, larger is better for chunking): time K={k} **{l['ratio']:.2f}**, "
            f"default **{l['ratio_default']:.2f}**; memory rise K={k} **{l['ratio_memory']:.2f}**, default "
            f"**{l['ratio_memory_default']:.2f}**. Largest absolute differences, chunked (K={k}) against full: "
            f"logp {l['logp_max_abs_diff']:.2g}, entropy {l['entropy_max_abs_diff']:.2g}, "
            f"parameter gradients {l['grad_max_abs_diff']:.2g}."]
    return out


def _scaling(l: dict) -> list[str]:
    out = [f"posttrain GRPO, {l['prompts']} prompts per step, one update per batch, median of {l['steps_timed']} "
           "timed steps after one warm-up step; each axis varies one setting around group 4, 32 new tokens, tiny.", "",
           "| axis | value | step s | rollout s | mean completion length | generated tokens/s | step MFU |",
           "|---|---|---|---|---|---|---|"]
    order = {"group": 0, "length": 1, "model": 2}
    def key(p):
        return order[p["axis"]], ("tiny", "small").index(p["value"]) if p["axis"] == "model" else p["value"]

    for p in sorted(l["points"], key=key):
        out.append(f"| {p['axis']} | {p['value']} | {_f(p['step_s'], 2)} | {_f(p['t_rollout'], 2)} "
                   f"| {_f(p['completion_len'])} | {_f(p['gen_tokens_per_s'])} | {_pct(p['mfu'])} |")
    return out + ["", "![posttrain GRPO step time against group size, completion length and model size](scaling.png)"]


def _profile(l: dict) -> list[str]:
    phases = list(l["posttrain"]["phases_s_per_step"])
    out = [f"GRPO on the tiny model, 8 prompts x 4 completions x 32 new tokens, {l['posttrain']['steps_profiled']} "
           "steps after one warm-up step; seconds per step (share of the step).", "",
           "| side | step s | " + " | ".join(phases) + " |", "|---" * (len(phases) + 2) + "|"]
    for s in ("posttrain", "trl"):
        r = l[s]
        cells = [f"{r['phases_s_per_step'][k]:.3f} ({100 * r['phases_share'][k]:.0f} %)" for k in phases]
        out.append(f"| {s} | {r['step_s']:.3f} | " + " | ".join(cells) + " |")
    out += ["", "Top operators by self CPU time in that window:", ""]
    for s in ("posttrain", "trl"):
        ops = ", ".join(f"{o['op']} {100 * o['self_cpu_share']:.0f} %" for o in l[s]["top_ops"][:6])
        out.append(f"- {s}: {ops}")
    return out


def _peak_libraries(m: dict) -> str:
    """", the faster of torch.mm 185.9 / 186.2 and onednn 218.4 / 217.0" where the run timed several libraries."""
    by = m.get("matmul_peak_by_library") or []
    names = list(dict.fromkeys(k for b in by for k in b))
    if len(names) < 2:
        return ""
    each = [f"{n} {' / '.join(str(b.get(n, '-')) for b in by)}" for n in names]
    return ", the faster of " + " and ".join(each)


def render(lines: list[dict]) -> str:
    """The results section of bench/README.md."""
    by = {l["bench"]: l for l in lines}
    m = by["machine"]
    out = [f"Measured {m['date']} by `{m['command']}` ({m['wall_s'] / 60:.1f} min): {m['cpu']}, {m['cores']} cores, "
           f"{m['threads']} torch threads per process, Python {m['python']}, torch {m['torch']}, transformers "
           f"{m['transformers']}, TRL {m['trl']}, posttrain {m['posttrain']}. fp32 matmul peak "
           f"{' / '.join(map(str, m['matmul_peak_gflops']))} GFLOP/s (start / end{_peak_libraries(m)}; MFU uses the "
           "larger). "
           f"Load average (1 min) {m['load_avg_start']:.2f} at the start, {m['load_avg_end']:.2f} at the end.", ""]
    if any(l["bench"] in ("sft", "grpo") for l in lines):
        out += ["### posttrain against TRL", ""] + _headline(lines)
        out += ["", "Ratios are medians of the paired ratios (posttrain run i against TRL run i), larger is better "
                "for posttrain; RSS ratio is TRL / posttrain (main processes). Per-run values are in "
                "`results.json` (`runs`).", ""]
    if "logprobs" in by:
        out += ["### Chunked log-probs", ""] + _logprobs(by["logprobs"]) + [""]
    if "scaling" in by:
        out += ["### GRPO scaling (posttrain)", ""] + _scaling(by["scaling"]) + [""]
    if "profile" in by:
        out += ["### Profile of one GRPO step", ""] + _profile(by["profile"]) + [""]
    return "\n".join(out)


def plot_scaling(line: dict, path) -> None:
    """Three panels: step time against group size, completion length and model size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, axis, label in zip(axes, ("group", "length", "model"),
                               ("completions per prompt (G)", "max new tokens", "model")):
        pts = [p for p in line["points"] if p["axis"] == axis]
        pts.sort(key=lambda p: p["value"] if axis != "model" else ("tiny", "small").index(p["value"]))
        xs = [str(p["value"]) for p in pts]
        ax.bar(xs, [p["step_s"] - p["t_rollout"] for p in pts], bottom=[p["t_rollout"] for p in pts],
               label="rest of the step", color="#9ecae1")
        ax.bar(xs, [p["t_rollout"] for p in pts], label="rollout", color="#3182bd")
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per step")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"posttrain GRPO step time, {line['prompts']} prompts per step (2 CPU threads)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(line: dict) -> list[str]:
    """One short line per figure of a result line of `bench.run` or a `bench.decode` result (for a terminal)."""
    if "error" in line:
        return [f"{line['bench']} {line['args']} ERROR {line['error'][-800:]}"]
    if line.get("bench") in ("sft", "grpo"):
        key = "tokens_per_s" if line["bench"] == "sft" else "completions_per_s"
        p, t = line["posttrain"], line["trl"]
        return [f"{line['bench']} {line['model']} {key} {p[key]:.1f} / TRL {t[key]:.1f}: ratio {line['ratio']}, "
                f"MFU {p['mfu']} / {t['mfu']}, GPU MB {p.get('gpu_peak_mb')} / {t.get('gpu_peak_mb')}"]
    if "results" in line:  # bench.decode
        return [f"decode {line['size']} {line['precision']} {r['new_tokens']} tokens {r['path']}: {r['seconds']} s, "
                f"{r['tokens_per_s']} tok/s, x{r['speedup_vs_forward']}, "
                f"{'same tokens' if r['same_tokens'] else 'DIFFERENT tokens'}" for r in line["results"]]
    return [json.dumps(line)[:600]]


if __name__ == "__main__":  # python -m bench.report < log: the summary of every JSON / BENCH_RESULT line in it
    import sys

    for text in sys.stdin:
        text = text.split("BENCH_RESULT ", 1)[-1]
        print("\n".join(summary(json.loads(text))) if text.startswith("{") else text.rstrip()[:300])
