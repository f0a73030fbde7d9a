"""Matched budgets: every recipe of a study gets the same amount of training, whatever its method.

    steps=K     K optimizer steps in all (multi-stage recipes: split in proportion to their stages' steps)
    samples=K   K sequences trained on (summed over updates; an RL step trains batch x group_size rows,
                an SFT step batch rows, a preference step 2 x batch: chosen and rejected; online DPO at most
                one pair per prompt); each stage stops once it reaches its share (`stop.samples`)
    tokens=K    K loss tokens trained on; each stage stops once it reaches its share (`stop.tokens`)

A stage's share of a samples or tokens budget is its share of the recipe's nominal samples (its steps x
the rows one of its steps trains on). The stop is checked after every optimizer step, so a run ends
within one step's batch of its share. Its `steps` become the step count that share needs at the nominal
rows per step (25 % more for rollout stages, which can train on fewer rows than nominal; for tokens an
upper bound, over which a cosine schedule then runs: prefer steps or samples when the schedule matters). What each run actually used is recorded beside it, so an unequal run
stays visible.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from ..objective.preference import PAIRED_LOSSES
from ..objective.presets import get_preset

KINDS = ("steps", "samples", "tokens")


@dataclass(frozen=True)
class Budget:
    kind: str
    amount: int

    @classmethod
    def parse(cls, text: str) -> "Budget":
        kind, _, value = text.partition("=")
        if kind not in KINDS or not value:
            raise ValueError(f"budget {text!r} is not KIND=K with KIND one of {', '.join(KINDS)} (e.g. samples=6400)")
        try:
            amount = int(float(value))
        except ValueError:
            raise ValueError(f"budget {text!r}: {value!r} is not a number") from None
        if amount <= 0:
            raise ValueError(f"budget {text!r} must be positive")
        return cls(kind, amount)

    def __str__(self) -> str:
        return f"{self.kind}={self.amount}"


def rows_per_step(stage: dict) -> int:
    """Sequences one optimizer step of a (raw) stage trains on, at its nominal settings."""
    preset = get_preset(stage["method"])
    batch = (stage.get("batch") or {}).get("size", 8)
    if preset.data == "preferences" or preset.advantage in PAIRED_LOSSES:  # pairs (online DPO: one per prompt)
        return 2 * batch
    if preset.data in ("demonstrations", "unpaired") or "verified" in preset.sources:
        return batch
    group = (stage.get("rollout") or {}).get("group_size", 8)
    return max(1, batch * group // max(1, stage.get("minibatches", 1)))


def match(recipe: dict, budget: Budget | None) -> dict:
    """A copy of the raw recipe mapping whose stages share `budget` (unchanged when budget is None)."""
    out = copy.deepcopy(recipe)
    if budget is None:
        return out
    stages = out["stages"]
    steps = [int(s.get("steps", 100)) for s in stages]
    if budget.kind == "steps":
        total = sum(steps)
        new = [max(1, round(budget.amount * n / total)) for n in steps]
        new[-1] = max(1, budget.amount - sum(new[:-1]))
        for s, n in zip(stages, new):
            s["steps"] = n
            s.pop("stop", None)
        return out
    rows = [rows_per_step(s) for s in stages]
    nominal = [n * r for n, r in zip(steps, rows)]
    total = sum(nominal)
    for s, c, r in zip(stages, nominal, rows):
        share = max(1, round(budget.amount * c / total))
        # Rollout stages may train on fewer rows than nominal (filtered groups, failed rewards): 25 % more steps
        # let them reach their share; demonstration stages train on exactly `r` rows a step.
        slack = 1.0 if rows_per_step_exact(s) else 1.25
        s["steps"] = max(1, math.ceil(slack * share / r))
        s["stop"] = {budget.kind: share}
    return out


def rows_per_step_exact(stage: dict) -> bool:
    """Whether every step trains on exactly `rows_per_step` rows (offline data), or may train on fewer."""
    preset = get_preset(stage["method"])
    return preset.data in ("demonstrations", "preferences", "unpaired") or "verified" in preset.sources
