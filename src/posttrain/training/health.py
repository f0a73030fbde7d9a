"""Is the stage still learning? The reward failure policy (`RewardHealth`: too many failed rewards over a window
of steps stop the run) and the learning-signal check (`GroupSignal`: groups whose rewards are all equal)."""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch

from ..objective.advantages import mixed_outcome

if TYPE_CHECKING:
    from .assembly import _Rows

log = logging.getLogger("posttrain")


class RewardHealth:
    """The failure policy: masked samples / scored samples over the last `window` steps above `max_rate`
    stops the run (RewardFailure, naming the function that failed most and its last error); a step whose
    every reward failed is logged as such. Per-sample errors stay masked and counted below that."""

    def __init__(self, max_rate: float, window: int):
        self.max_rate, self.window = max_rate, window
        self.steps: list[tuple[int, int]] = []  # (scored, masked) per step, the last `window`
        self.scored = self.masked = 0  # this step's
        self.last: dict[str, str] = {}  # function -> its last error
        self.count: dict[str, int] = {}  # function -> its errors so far (to name the one that failed most)

    def add(self, rewards: list[float], errors: list) -> None:
        self.scored += len(rewards)
        self.masked += sum(1 for r in rewards if math.isnan(r))
        for e in errors:
            self.last[e.fn] = f"row {e.row_id!r}: {e.message}"
            self.count[e.fn] = self.count.get(e.fn, 0) + 1

    def end_step(self, step: int) -> None:
        if not self.scored:
            return
        if self.masked == self.scored:
            log.warning("step %d: every reward failed (%d samples masked; last errors: "
                                                   "%s)", step + 1, self.masked, "; ".join(
                                                       f"{k}: {v}" for k, v in self.last.items()))
        self.steps = (self.steps + [(self.scored, self.masked)])[-self.window:]
        self.scored = self.masked = 0
        scored, masked = sum(s for s, _ in self.steps), sum(m for _, m in self.steps)
        if len(self.steps) == self.window and masked > self.max_rate * scored:
            worst = max(self.count, key=self.count.get) if self.count else "?"
            from ..errors import RewardFailure

            raise RewardFailure(
                f"rewards failed on {masked} of {scored} samples over the last {self.window} steps (more than "
                f"reward_policy.max_error_rate={self.max_rate:g}); {worst!r} failed most, last on "
                f"{self.last.get(worst, '?')}. The run stops with the checkpoint of the step before; fix the reward "
                "function (run.log has every error) and rerun the same command to resume")

    def state_dict(self) -> dict:
        return {"steps": [list(x) for x in self.steps]}

    def load_state_dict(self, d: dict) -> None:
        self.steps = [tuple(x) for x in d["steps"]]


class GroupSignal:
    """The share of question groups whose rewards are all equal (no group-relative learning signal), with a
    warning when it stays at 100 % for `patience` steps: the loss and gradient are then zero, step after step."""

    def __init__(self, patience: int = 3):
        self.patience, self.streak = patience, 0

    def update(self, part: "_Rows", step: int) -> float:
        R = torch.tensor(part.rewards, dtype=torch.float64)
        group = torch.tensor([r.group for r in part.rows])
        mixed, valid = mixed_outcome(R, group), ~torch.isnan(R)
        counted = {g for g, v in zip(group.tolist(), valid.tolist()) if v}
        groups = [g for g in counted if int((valid & (group == g)).sum()) >= 2]
        if not groups:
            return math.nan
        flat = sum(1 for g in groups if not bool(mixed[group == g].any())) / len(groups)
        self.streak = self.streak + 1 if flat == 1.0 else 0
        if self.streak == self.patience:
            log.warning(
                "steps %d-%d: in every group all rewards were equal, so the rewards give no learning signal (every "
                "advantage is 0; only a KL or entropy term moves the policy). The task may be too hard or too easy for the model, or the reward constant; check "
                "reward_mean and a few completions", step + 2 - self.patience, step + 1)
        return flat
