"""`posttrain demo` (what `make demo` runs): the built-in study. The shipped base model on the built-in task,
trained by SFT, DFT, GRPO, SFT->GRPO, LUFFY, HPT, CHORD, ReLIFT, SFT->DPO and on-policy distillation (from
builtin:tiny-teacher) under one matched budget of training
samples, with three seeds each, evaluated alike on held-out data (`posttrain compare`); it prints the table
and the findings and writes the report.

Every number comes from the runs made here; nothing is read from a file written earlier (a rerun on the same
directory reuses the runs that finished).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("posttrain")

DEMO_RECIPES = ("sft", "dft", "grpo", "sft_then_grpo", "luffy", "hpt", "chord_mu", "relift", "sft_then_dpo", "opd")
FULL = dict(seeds=3, budget="samples=4800", n=200, samples=4, kl_n=64, curve_every=20)
QUICK = dict(seeds=1, budget="samples=256", n=40, samples=2, kl_n=16, curve_every=2)


def run_demo(out: str | Path = "runs/demo", quick: bool = False, jobs: int | None = None) -> int:
    from .study.budget import Budget
    from .study.compare import run_study
    from .study.evaluate import EvalSpec
    from .study.report import SPREAD_NOTE, table_rows

    cfg = QUICK if quick else FULL
    out = Path(out) / ("quick" if quick else "full")
    jobs = jobs or max(1, min(len(DEMO_RECIPES), os.cpu_count() or 1))
    spec = EvalSpec(n=cfg["n"], samples=cfg["samples"], kl_n=cfg["kl_n"], curve_every=cfg["curve_every"])
    t0 = time.perf_counter()
    log.info("demo: %s on builtin:tiny, %d seed(s), budget %s, %d job(s) at a time -> %s",
             ", ".join(DEMO_RECIPES), cfg["seeds"], cfg["budget"], jobs, out)
    summary = run_study([f"builtin:{r}" for r in DEMO_RECIPES], out=out, seeds=cfg["seeds"],
                        budget=Budget.parse(cfg["budget"]), jobs=jobs, spec=spec)
    head, rows = table_rows(summary)
    keep = [i for i, h in enumerate(head) if h in ("recipe", "seeds") or h.endswith("acc %") or h in (
        "id format %", "plain NLL drift", "KL to base", "wall s")]
    print("| " + " | ".join(head[i] for i in keep) + " |")
    print("|" + "---|" * len(keep))
    for r in rows:
        print("| " + " | ".join(r[i] for i in keep) + " |")
    print(f"\nFindings ({SPREAD_NOTE})")
    print("\n".join(f"- {f['text']}" for f in summary["findings"]))
    print(f"\nreport: {out / 'report.html'} (also report.md, summary.json, the plots); "
          f"total wall time {time.perf_counter() - t0:.0f} s")
    return 1 if any(r.get("status") != "done" for r in summary["runs"]) else 0
