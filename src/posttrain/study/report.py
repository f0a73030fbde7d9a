"""A study's report: DIR/report.md, DIR/report.html (self-contained: plots embedded, no network) and the
PNG plots, all drawn from DIR/summary.json's numbers.

Plots: learning curves (held-out greedy accuracy against samples, tokens and wall time; and the training
reward of rollout methods), accuracy in vs out of distribution, and forgetting against gain.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

SPREAD_NOTE = ("In the findings, ± is the standard error of a recipe's mean (over its seeds, plus the binomial "
               "error of each accuracy); \"clearly\" means more than two standard errors of the difference apart. "
               "In the table, ± is the standard deviation over seeds.")
PLOTS = ("curves_samples", "curves_tokens", "curves_wall", "train_reward", "id_vs_ood", "forgetting_vs_gain")


def write_report(out: Path, summary: dict) -> None:
    pngs = _plots(out, summary)
    (out / "report.md").write_text(markdown(summary, pngs))
    (out / "report.html").write_text(render_html(summary, {n: out / f"{n}.png" for n in pngs}))


# ---- numbers as text ------------------------------------------------------------------------------------


def _fmt(v, kind: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if kind == "pct":
        return f"{100 * v:.1f}"
    if kind == "int":
        return f"{v:,.0f}"
    if kind == "sci":
        return f"{v:.2e}"
    return f"{v:.4f}"


def _cell(agg: dict, key: str, kind: str) -> str:
    v = agg.get(key)
    if not isinstance(v, dict):
        return "–"
    text = _fmt(v["mean"], kind)
    if v.get("std") is not None and kind in ("pct", "f4"):
        text += f" ± {_fmt(v['std'], kind)}"
    return text


def columns(summary: dict) -> list[tuple[str, str, str]]:
    """(header, summary key, format) of the main table."""
    splits = summary["splits"]
    cols = [(f"{s} acc %", f"accuracy/{s}", "pct") for s in splits]
    k = summary["study"]["eval"]["samples"]
    if k:
        for s in splits:
            cols += [(f"{s} pass@{k} %", f"pass@{k}/{s}", "pct"), (f"{s} maj@{k} %", f"maj@{k}/{s}", "pct")]
    cols += [(f"{splits[0]} format %", f"format/{splits[0]}", "pct"), ("plain NLL drift", "plain_nll_drift", "f4"),
             ("KL to base", "kl_to_base", "f4"), ("entropy (eval)", "eval_entropy", "f4"),
             ("entropy (train)", "train_entropy", "f4"), ("resp. len (train)", "train_response_len", "f4"), ("samples", "samples", "int"),
             ("trained tokens", "trained_tokens", "int"), ("generated tokens", "generated_tokens", "int"),
             ("FLOPs", "flops", "sci"), ("wall s", "wall_s", "int")]
    return cols


def table_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    cols = columns(summary)
    head = ["recipe", "method", "seeds"] + [c[0] for c in cols]
    base = summary["base"]
    rows = [["base", summary["base"]["model"], "–"] + [
        _fmt(base.get(key), kind) if key in base and not isinstance(base.get(key), dict) else "–"
        for _, key, kind in cols]]
    for name, agg in summary["recipes"].items():
        seeds = str(agg["seeds"]) + (f" ({agg['failed']} failed)" if agg["failed"] else "")
        rows.append([name, agg["method"], seeds] + [_cell(agg, key, kind) for _, key, kind in cols])
    return head, rows


def budget_text(summary: dict) -> str:
    b = summary["study"]["budget"]
    e = summary["study"]["eval"]
    parts = [f"Budget: {b} per run (matched within one batch; actual compute in the table)." if b else
             "Budget: each recipe as written (not matched)."]
    parts.append(f"Evaluated on held-out data only: {e['n']} prompts per split ({', '.join(summary['splits'])}), "
                 f"greedy accuracy" + (f", pass@k and maj@k from {e['samples']} samples at temperature 1"
                                       if e["samples"] else "")
                 + f"; NLL on {e['n']} held-out `{e['plain_split']}` texts; KL to the base on {e['kl_n']} held-out "
                 f"`{e['kl_split']}` prompts, sampled from each policy. Mean ± std over seeds.")
    return " ".join(parts)


def markdown(summary: dict, pngs: list[str]) -> str:
    head, rows = table_rows(summary)
    lines = ["# posttrain study", "", budget_text(summary), "", "## Findings", "", SPREAD_NOTE, ""]
    lines += [f"- {f['text']}" for f in summary["findings"]]
    lines += ["", "## Runs", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "## Plots", ""] + [f"![{n}]({n}.png)" for n in pngs]
    lines += ["", f"Per-run figures: `summary.json` (`runs`); runs in `runs/`. Study wall time {summary['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def render_html(summary: dict, images: dict[str, Path]) -> str:
    head, rows = table_rows(summary)
    esc = html.escape
    imgs = "".join(
        f'<figure><img alt="{esc(n)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{esc(n.replace('_', ' '))}</figcaption></figure>" for n, p in images.items())
    table = ("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>"
             + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</tbody></table>")
    findings = "<ul>" + "".join(f"<li>{esc(f['text'])}</li>" for f in summary["findings"]) + "</ul>"
    # The script only reports, for checks in a headless browser, whether every image decoded.
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>posttrain study</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}td{{white-space:nowrap}}td:first-child,td:nth-child(2){{text-align:left}}
figure{{display:inline-block;margin:8px}}img{{max-width:640px}}</style></head>
<body><h1>posttrain study</h1><p>{esc(budget_text(summary))}</p>
<h2>Findings</h2><p>{esc(SPREAD_NOTE)}</p>{findings}<h2>Runs</h2><div style="overflow-x:auto">{table}</div><h2>Plots</h2>{imgs}
<script>window.addEventListener("load",function(){{var im=document.images,ok=0;for(var i=0;i<im.length;i++)
{{if(im[i].complete&&im[i].naturalWidth>0)ok++}}document.body.setAttribute("data-images",ok+"/"+im.length)}});</script>
</body></html>
"""


# ---- plots ---------------------------------------------------------------------------------------------


def _plots(out: Path, summary: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    runs = [r for r in summary["runs"] if r.get("status") == "done"]
    split = summary["study"]["eval"]["kl_split"]
    for name, x, label in (("curves_samples", "samples", "samples trained on"),
                           ("curves_tokens", "tokens", "loss tokens trained on"),
                           ("curves_wall", "wall_s", "wall time (s)")):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for recipe in summary["recipes"]:
            for i, r in enumerate(rr for rr in runs if rr["recipe"] == recipe):
                pts = [(p[x], p[split]["accuracy"]) for p in r.get("curve", []) if split in p]
                if pts:
                    ax.plot(*zip(*pts), color=_color(recipe, summary), alpha=0.8, label=recipe if i == 0 else None)
        ax.set_xlabel(label)
        ax.set_ylabel(f"greedy accuracy on `{split}`")
        _legend(ax)
        made.append(_save(fig, out, name))
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for recipe in summary["recipes"]:
        for i, r in enumerate(rr for rr in runs if rr["recipe"] == recipe):
            pts = [(p["samples"], p["accuracy"]) for p in r.get("train_reward", [])]
            if pts:
                ax.plot(*zip(*_smooth(pts)), color=_color(recipe, summary), alpha=0.8, label=recipe if i == 0 else None)
    ax.set_xlabel("samples trained on")
    ax.set_ylabel("training accuracy (sampled, smoothed)")
    _legend(ax)
    made.append(_save(fig, out, "train_reward"))
    made.append(_scatter(out, summary, runs, "id_vs_ood"))
    made.append(_scatter(out, summary, runs, "forgetting_vs_gain"))
    plt.close("all")
    return made


def _scatter(out: Path, summary: dict, runs: list[dict], name: str) -> str:
    import matplotlib.pyplot as plt

    splits, base = summary["splits"], summary["base"]
    panels = splits[1:] if name == "id_vs_ood" else ["plain_nll_drift", "kl_to_base"]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for r in runs:
            x = r.get(f"accuracy/{splits[0]}") if name == "id_vs_ood" else r.get("id_gain")
            y = r.get(f"accuracy/{panel}") if name == "id_vs_ood" else r.get(panel)
            if x is not None and y is not None:
                ax.scatter(x, y, color=_color(r["recipe"], summary), s=25)
        for recipe, agg in summary["recipes"].items():  # one label per recipe, at its mean
            kx = f"accuracy/{splits[0]}" if name == "id_vs_ood" else "id_gain"
            ky = f"accuracy/{panel}" if name == "id_vs_ood" else panel
            if isinstance(agg.get(kx), dict) and isinstance(agg.get(ky), dict):
                ax.annotate(recipe, (agg[kx]["mean"], agg[ky]["mean"]), fontsize=7)
        if name == "id_vs_ood" and base.get(f"accuracy/{splits[0]}") is not None:
            bx, by = base[f"accuracy/{splits[0]}"], base.get(f"accuracy/{panel}") or 0
            ax.scatter(bx, by, marker="x", color="k")
            ax.annotate("base", (bx, by), fontsize=7)
            ax.set_xlabel(f"{splits[0]} accuracy")
            ax.set_ylabel(f"{panel} accuracy")
        else:
            ax.set_xlabel(f"{splits[0]} accuracy gain over the base")
            ax.set_ylabel({"plain_nll_drift": "plain-text NLL drift (nats/token)",
                           "kl_to_base": "KL(policy || base) (nats/token)"}[panel])
    return _save(fig, out, name)


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _smooth(pts: list[tuple[float, float]], window: int = 10) -> list[tuple[float, float]]:
    out = []
    for i in range(len(pts)):
        chunk = pts[max(0, i - window + 1): i + 1]
        out.append((pts[i][0], sum(p[1] for p in chunk) / len(chunk)))
    return out


def _color(recipe: str, summary: dict):
    import matplotlib

    names = list(summary["recipes"])
    return matplotlib.colormaps["tab10"](names.index(recipe) % 10)


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=90)
    return name
