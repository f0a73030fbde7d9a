"""Findings computed from a study's numbers: who won each split, which differences lie within the spread,
who drifted least, and whether the measurements agree with published claims. Every sentence is built from
the summary; nothing here is written in advance.

The spread of a recipe's mean accuracy p over k seeds of n prompts each is its standard error,

    se = sqrt(s^2 / k + p (1 - p) / (n k))        (s: the seeds' sample std; the s term needs k >= 2)

and for other figures (NLL drift, KL) s / sqrt(k). Two recipes differ clearly when their means differ by more
than twice the standard error of the difference, sqrt(se_a^2 + se_b^2); otherwise the difference is said to
lie within the spread. With one seed only the binomial term is known, and the report says so.
"""
from __future__ import annotations

import math

CLAIMS = {
    "forgetting": ("RL forgets less than SFT at matched gain",
                   "Retaining by Doing (arXiv 2510.18874); RL's Razor (arXiv 2509.04259)"),
    "ood": ("RL generalises out of distribution where SFT memorises",
            "SFT Memorizes, RL Generalizes (arXiv 2501.17161); disputed when prompts vary (arXiv 2510.00237)"),
    "kl_predicts": ("forward KL to the base on the new task predicts forgetting", "RL's Razor (arXiv 2509.04259)"),
}


def _stat(agg: dict, key: str) -> tuple[float | None, float | None, int]:
    v = agg.get(key)
    if not isinstance(v, dict):
        return None, None, 0
    return v["mean"], v["std"], v["n"]


def spread(agg: dict, key: str, n_prompts: int | None) -> float | None:
    """Standard error of a recipe's mean `key` (binomial term for accuracies, when n_prompts is given)."""
    mean, std, k = _stat(agg, key)
    if mean is None or k == 0:
        return None
    var = (std ** 2 / k) if std is not None else 0.0
    if n_prompts and 0.0 <= mean <= 1.0:
        var += mean * (1 - mean) / (n_prompts * k)
    elif std is None:
        return None
    return math.sqrt(var)


def compare(a: dict, b: dict, key: str, n_prompts: int | None) -> tuple[float, float | None, bool | None]:
    """(mean_a - mean_b, the difference's standard error, clearly different?) — None when no spread is known."""
    ma, mb = _stat(a, key)[0], _stat(b, key)[0]
    sa, sb = spread(a, key, n_prompts), spread(b, key, n_prompts)
    diff = ma - mb
    if sa is None or sb is None:
        return diff, None, None
    se = math.sqrt(sa ** 2 + sb ** 2)
    return diff, se, abs(diff) > 2 * se


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _pm(agg: dict, key: str, n: int | None, pct: bool = True) -> str:
    mean, _, _ = _stat(agg, key)
    se = spread(agg, key, n)
    val = _pct(mean) if pct else f"{mean:.4f}"
    if se is None:
        return val
    return f"{val} ± {100 * se:.1f}" if pct else f"{val} ± {se:.4f}"


def winner(recipes: dict, key: str, n: int | None, *, lowest: bool = False) -> dict | None:
    """The best recipe on `key`, the others within its spread, and the runner-up comparison."""
    ranked = sorted((a for a in recipes.values() if _stat(a, key)[0] is not None),
                    key=lambda a: _stat(a, key)[0], reverse=not lowest)
    if not ranked:
        return None
    best = ranked[0]
    verdicts = [(a["recipe"], compare(best, a, key, n)[2]) for a in ranked[1:]]
    equal = [a["recipe"] for a in ranked[1:] if _stat(a, key)[0] == _stat(best, key)[0]]
    return {"best": best, "ties": [r for r, v in verdicts if v is False and r not in equal],
            "unknown": [r for r, v in verdicts if v is None and r not in equal], "equal": equal,
            "n_others": len(ranked) - 1,
            "runner_up": ranked[1] if len(ranked) > 1 else None}


def _closeness(w: dict) -> str:
    """How the best compares with the rest: clearly ahead, ties within the spread, or spread unknown."""
    parts = []
    if w["ties"]:
        parts.append(f"within the spread of it: {', '.join(w['ties'])}")
    if w["unknown"]:
        parts.append(f"spread unknown (one seed) against: {', '.join(w['unknown'])}")
    rest = w["n_others"] - len(w["equal"])
    if not parts and rest > 0:
        parts.append("clearly ahead of every other recipe" if not w["equal"] else "clearly ahead of the rest")
    return "; ".join(parts)


def split_finding(summary: dict, split: str) -> dict | None:
    recipes, n, base = summary["recipes"], summary["n_per_split"], summary["base"]
    key = f"accuracy/{split}"
    w = winner(recipes, key, n)
    if w is None:
        return None
    best = w["best"]
    b = base.get(key)
    base_text = f" (base {_pct(b)})" if b is not None else ""
    if w["equal"]:
        names = [best["recipe"], *w["equal"]]
        text = (f"On `{split}`, {', '.join(names[:-1])} and {names[-1]} share the highest mean, "
                f"{_pm(best, key, n)}{base_text}")
    else:
        text = f"On `{split}`, {best['recipe']} scored highest: {_pm(best, key, n)}{base_text}"
        if w["runner_up"] is not None:
            diff, _, _ = compare(best, w["runner_up"], key, n)
            text += f", {100 * diff:+.1f} points over {w['runner_up']['recipe']}"
    closeness = _closeness(w)
    if closeness:
        text += f"; {closeness}"
    moved = [a["recipe"] for a in recipes.values() if b is not None and _stat(a, key)[0] is not None
             and _stat(a, key)[0] - b > 2 * (spread(a, key, n) or 0) + 2 * math.sqrt(b * (1 - b) / n)]
    text += f". {len(moved)} of {len(recipes)} recipes clearly beat the base here."
    return {"topic": split, "text": text, "best": best["recipe"], "ties": w["ties"], "beat_base": moved}


def drift_finding(summary: dict) -> list[dict]:
    out = []
    for key, what, unit in (("plain_nll_drift", "NLL drift on held-out plain text", "nats/token"),
                            ("kl_to_base", "KL(policy || base) on held-out prompts", "nats/token")):
        w = winner(summary["recipes"], key, None, lowest=True)
        if w is None:
            continue
        best = w["best"]
        ranked = sorted((a for a in summary["recipes"].values() if _stat(a, key)[0] is not None),
                        key=lambda a: _stat(a, key)[0])
        most = ranked[-1]
        text = (f"Least {what}: {best['recipe']} ({_pm(best, key, None, pct=False)} {unit}); most: "
                f"{most['recipe']} ({_pm(most, key, None, pct=False)})")
        closeness = _closeness(w).replace("clearly ahead of", "clearly below")
        text += f"; {closeness}." if closeness else "."
        out.append({"topic": key, "text": text, "best": best["recipe"], "worst": most["recipe"]})
    return out


def _family(summary: dict, fam: str) -> list[dict]:
    return [a for a in summary["recipes"].values() if a["family"] == fam and a["seeds"]]


def _pooled(aggs: list[dict], key: str) -> dict:
    """The family as one pseudo-recipe: the mean of its recipes' means; spread from their spreads."""
    vals = [(_stat(a, key)[0], _stat(a, key)[1], _stat(a, key)[2]) for a in aggs if _stat(a, key)[0] is not None]
    if not vals:
        return {}
    mean = sum(v[0] for v in vals) / len(vals)
    stds = [v[1] for v in vals if v[1] is not None]
    std = math.sqrt(sum(s ** 2 for s in stds) / len(stds)) if stds else None
    return {"recipe": "+".join(a["recipe"] for a in aggs), key: {"mean": mean, "std": std,
                                                                 "n": sum(v[2] for v in vals)}}


def claim_findings(summary: dict) -> list[dict]:
    """Agreement of the measurements with published claims (algorithms.md §4.5)."""
    n = summary["n_per_split"]
    rl, sft = _family(summary, "rl"), _family(summary, "sft")
    out = []
    if not rl or not sft:
        missing = " and no ".join(k for k, have in (("RL-only", rl), ("SFT-only", sft)) if not have)
        for key in ("forgetting", "ood"):
            out.append({"topic": "claim", "claim": CLAIMS[key][0], "source": CLAIMS[key][1], "verdict": "not tested",
                        "text": f"{CLAIMS[key][0]} ({CLAIMS[key][1]}): not tested, the study has no {missing} recipe."})
    else:
        out.append(_forgetting_claim(rl, sft, n))
        for split in summary["splits"][1:]:
            out.append(_ood_claim(rl, sft, split, n, summary["base"]))
    out.append(_kl_claim(summary))
    return out


def _forgetting_claim(rl: list[dict], sft: list[dict], n: int) -> dict:
    claim, source = CLAIMS["forgetting"]
    # the gains share the base, so they differ as the accuracies do
    g_rl, g_sft = _pooled(rl, "id_accuracy"), _pooled(sft, "id_accuracy")
    if not g_rl or not g_sft:
        return {"topic": "claim", "claim": claim, "source": source, "verdict": "not tested",
                "text": f"{claim} ({source}): not tested, no accuracy measured for one of the families."}
    g_diff, _, g_clear = compare(g_rl, g_sft, "id_accuracy", n)
    parts, verdicts = [], []
    for key, what in (("kl_to_base", "KL to the base"), ("plain_nll_drift", "plain-text NLL drift")):
        a, b = _pooled(rl, key), _pooled(sft, key)
        if not a or not b:
            continue
        diff, se, clear = compare(a, b, key, None)
        ma, mb = a[key]["mean"], b[key]["mean"]
        rel = "lower" if diff < 0 else "higher"
        certainty = "clearly" if clear else ("within the spread" if clear is False else "spread unknown")
        parts.append(f"{what} {ma:.4f} (RL) vs {mb:.4f} (SFT): RL {rel}, {certainty}")
        verdicts.append("agrees" if clear and diff < 0 else "disagrees" if clear and diff > 0 else "inconclusive")
    verdict = "agrees" if verdicts and all(v == "agrees" for v in verdicts) else \
        "disagrees" if "disagrees" in verdicts else "inconclusive"
    if g_clear is False:
        matched = "at gains within the spread of each other"
    else:  # unmatched gains confound the comparison unless the family that forgets less also gained more
        matched = f"but the gains differ ({100 * g_diff:+.1f} points RL - SFT), so not at matched gain"
        if (verdict == "agrees" and g_diff < 0) or (verdict == "disagrees" and g_diff > 0):
            matched += (f": {'RL' if g_diff < 0 else 'SFT'} also learned less, which may explain why it "
                        "forgot less")
            verdict = "inconclusive"
    text = (f"{claim} ({source}): {'; '.join(parts)}; {matched}. The measurement "
            f"{'agrees with' if verdict == 'agrees' else 'disagrees with' if verdict == 'disagrees' else 'neither confirms nor refutes'}"
            " the claim.")
    return {"topic": "claim", "claim": claim, "source": source, "verdict": verdict, "text": text}


def _ood_claim(rl: list[dict], sft: list[dict], split: str, n: int, base: dict) -> dict:
    claim, source = CLAIMS["ood"]
    key = f"accuracy/{split}"
    a, b = _pooled(rl, key), _pooled(sft, key)
    if not a or not b:
        return {"topic": "claim", "claim": claim, "source": source, "verdict": "not tested",
                "text": f"{claim} ({source}) on `{split}`: not measured."}
    diff, se, clear = compare(a, b, key, n)
    verdict = "agrees" if clear and diff > 0 else "disagrees" if clear and diff < 0 else "inconclusive"
    b0 = base.get(key)
    text = (f"{claim} ({source}), on `{split}`: RL {_pct(a[key]['mean'])} vs SFT {_pct(b[key]['mean'])}"
            + (f" (base {_pct(b0)})" if b0 is not None else "")
            + f", a difference of {100 * diff:+.1f} points, "
            + ("clearly" if clear else "within the spread" if clear is False else "spread unknown")
            + f". The measurement {'agrees with' if verdict == 'agrees' else 'disagrees with' if verdict == 'disagrees' else 'neither confirms nor refutes'} the claim.")
    return {"topic": "claim", "claim": claim, "source": source, "verdict": verdict, "split": split, "text": text}


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None for fewer than 3 points or a constant input."""
    if len(xs) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else None


def _kl_claim(summary: dict) -> dict:
    claim, source = CLAIMS["kl_predicts"]
    pts = [(r["kl_to_base"], r["plain_nll_drift"]) for r in summary["runs"]
           if r.get("status") == "done" and r.get("kl_to_base") is not None and r.get("plain_nll_drift") is not None]
    rho = spearman([p[0] for p in pts], [p[1] for p in pts])
    if rho is None:
        return {"topic": "claim", "claim": claim, "source": source, "verdict": "not tested",
                "text": f"{claim} ({source}): not tested, fewer than 3 runs with both measures (or no variation)."}
    verdict = "agrees" if rho >= 0.5 else "disagrees" if rho <= 0 else "inconclusive"
    text = (f"{claim} ({source}): across {len(pts)} runs the rank correlation of KL to the base with plain-text "
            f"NLL drift is {rho:+.2f}. The measurement "
            f"{'agrees with' if verdict == 'agrees' else 'disagrees with' if verdict == 'disagrees' else 'neither confirms nor refutes'} the claim.")
    return {"topic": "claim", "claim": claim, "source": source, "verdict": verdict, "rho": rho, "text": text}


def findings(summary: dict) -> list[dict]:
    out = []
    seeds = max((a["seeds"] for a in summary["recipes"].values()), default=0)
    if seeds <= 1:
        out.append({"topic": "seeds", "text": "One seed per recipe: each spread below is the binomial standard "
                    "error of the accuracy alone; seed-to-seed variation is not measured, and it is often "
                    "several points at this size. Run with --seeds 2 or more to measure it."})
    for split in summary["splits"]:
        f = split_finding(summary, split)
        if f:
            out.append(f)
    out += drift_finding(summary)
    out += claim_findings(summary)
    failed = [r["name"] for r in summary["runs"] if r.get("status") != "done"]
    if failed:
        out.append({"topic": "failed", "text": f"{len(failed)} run(s) did not finish and are left out of every "
                    f"figure: {', '.join(failed)} (each run's worker.log says why)."})
    return out
