"""A study's numbers: one record per run read back from its directory, and per recipe the mean and spread
over seeds. Everything in the report comes from here, and everything here from the run directories.

Compute per run (sums over metrics.jsonl): samples and loss tokens trained on, tokens generated and
prefilled by the sampler, tokens forwarded with gradients and in no-grad (old / reference) passes, and

    flops ~= 2 N (3 forward_tokens + prefill_tokens + generated_tokens + ref_forward_tokens)

with N the parameter count: 6 N per token trained (forward and backward), 2 N per token only forwarded;
attention and evaluation are left out, so it is a rough, method-neutral count.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..jsonio import dumps, strict
from ..objective.preference import PAIRED_LOSSES
from ..objective.presets import get_preset

SUM_KEYS = ("samples", "trained_tokens", "forward_tokens", "generated_tokens", "prefill_tokens", "ref_forward_tokens")


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _mean(xs) -> float | None:
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def family(methods: list[str]) -> str:
    """sft (demonstrations only), rl (rollouts only, rewarded), distill (a teacher's signal), preference (pairs or
    labelled responses), hybrid (one stage of both), or pipeline (several stages)."""
    if len(methods) > 1:
        return "pipeline"
    p = get_preset(methods[0])
    if p.distill_coef:
        return "distill"
    if p.data in ("preferences", "unpaired") or p.advantage in PAIRED_LOSSES:
        return "preference"
    if p.data == "demonstrations" or "verified" in p.sources:
        return "sft"
    return "rl" if p.sources == ("rollouts",) else "hybrid"


def eval_fields(ev: dict, splits: list[str]) -> dict:
    """The flat figures of one eval.json: accuracy, pass@k, maj@k, format per question split (as
    "accuracy/SPLIT", ...), plain NLL, KL."""
    out: dict = {}
    for split in splits:
        r = ev.get(split, {})
        out[f"accuracy/{split}"] = r.get("accuracy")
        out[f"format/{split}"] = r.get("format")
        out[f"response_len/{split}"] = r.get("response_len")
        for k, v in r.items():
            if k.startswith(("pass@", "maj@")):
                out[f"{k}/{split}"] = v
    out["plain_nll"] = ev.get("plain", {}).get("nll")
    kl = ev.get("kl", {})
    out["kl_to_base"] = kl.get("kl_token")
    out["kl_to_base_seq"] = kl.get("kl_seq")
    out["eval_entropy"] = kl.get("entropy")
    return out


def run_record(spec, base_fields: dict, splits: list[str]) -> dict:
    """Everything the report says of one run."""
    d = spec.dir
    rec: dict = {"name": spec.name, "recipe": spec.recipe, "seed": spec.seed,
                 "method": " -> ".join(s["method"] for s in spec.config["stages"]),
                 "family": family([s["method"] for s in spec.config["stages"]])}
    if not (d / "eval.json").exists():
        rec["status"] = "failed" if (d / "failed.json").exists() else "missing"
        return rec
    rec["status"] = "done"
    ev = json.loads((d / "eval.json").read_text())
    rec.update(eval_fields(ev, splits))
    rec["id_accuracy"] = rec.get(f"accuracy/{splits[0]}")
    rec["ood_accuracy"] = {s: rec.get(f"accuracy/{s}") for s in splits[1:]}
    base_nll = base_fields.get("plain_nll")
    rec["plain_nll_drift"] = rec["plain_nll"] - base_nll if rec.get("plain_nll") is not None and base_nll else None
    rec["id_gain"] = rec["id_accuracy"] - base_fields["id_accuracy"] if rec["id_accuracy"] is not None else None
    metrics = _jsonl(d / "train" / "metrics.jsonl")
    for key in SUM_KEYS:
        rec[key] = int(sum(m.get(key) or 0 for m in metrics))
    params = ev.get("parameters", 0)
    rec["parameters"] = params
    rec["flops"] = 2.0 * params * (3 * rec["forward_tokens"] + rec["prefill_tokens"] + rec["generated_tokens"]
                                   + rec["ref_forward_tokens"])
    rec["steps"] = len([m for m in metrics if "step" in m])
    train_summary = d / "train" / "summary.json"
    rec["wall_s"] = json.loads(train_summary.read_text()).get("wall_s") if train_summary.exists() else None
    rec["train_entropy"] = _mean(m.get("entropy") for m in metrics)
    rec["train_response_len"] = _mean(m.get("response_len") for m in metrics)
    rec["curve"] = _jsonl(d / "train" / "curve.jsonl")
    rec["train_reward"] = _train_reward(metrics)
    return rec


def _train_reward(metrics: list[dict]) -> list[dict]:
    """(samples, tokens, wall, reward, accuracy) of the training steps that sampled rollouts."""
    out, samples, tokens, wall, offset = [], 0, 0, 0.0, 0.0
    stage = None
    for m in metrics:
        if m.get("stage") != stage:  # wall_s restarts with each stage
            offset, stage = wall, m.get("stage")
        samples += m.get("samples") or 0
        tokens += m.get("trained_tokens") or 0
        wall = offset + (m.get("wall_s") or 0.0)
        if m.get("accuracy") is not None:
            out.append({"samples": samples, "tokens": tokens, "wall_s": wall, "reward": m.get("reward_mean"),
                        "accuracy": m["accuracy"]})
    return out


def aggregate(records: list[dict]) -> dict:
    """Per recipe, mean / std (sample, n - 1) / n over seeds of every numeric field of the finished runs."""
    by_recipe: dict[str, list[dict]] = {}
    for r in records:
        by_recipe.setdefault(r["recipe"], []).append(r)
    out = {}
    for name, rs in by_recipe.items():
        done = [r for r in rs if r["status"] == "done"]
        agg: dict = {"recipe": name, "method": rs[0]["method"], "family": rs[0]["family"], "seeds": len(done),
                     "failed": len(rs) - len(done)}
        keys = sorted({k for r in done for k, v in r.items() if isinstance(v, (int, float)) and k != "seed"})
        for k in keys:
            xs = [r[k] for r in done if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
            if not xs:
                continue
            mean = sum(xs) / len(xs)
            std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
            agg[k] = {"mean": mean, "std": std, "n": len(xs)}
        out[name] = agg
    return out


def summarize(out: Path, base_model: str, runs: list, asked: dict, wall_s: float) -> dict:
    splits = list(asked["eval"]["splits"])
    base_eval = json.loads((out / "base" / "eval.json").read_text()) if (out / "base" / "eval.json").exists() else {}
    base = {"model": base_model, **eval_fields(base_eval, splits)} if base_eval else {"model": base_model}
    base["id_accuracy"] = base.get(f"accuracy/{splits[0]}")
    base["ood_accuracy"] = {s: base.get(f"accuracy/{s}") for s in splits[1:]}
    records = [run_record(r, base, splits) for r in runs]
    from .findings import findings

    summary = {"study": asked, "base": base, "splits": splits, "n_per_split": asked["eval"]["n"],
               "runs": records, "recipes": aggregate(records), "wall_s": round(wall_s, 1)}
    summary = strict(summary)
    summary["findings"] = findings(summary)
    (out / "summary.json").write_text(dumps(summary))
    return summary
