"""Test-only fault injection: `POSTTRAIN_FAULTS="point@n=action,..."` (unset in real runs: then `hit` is one
dictionary lookup).

Points the code marks with `hit(point)`:
  step      the start of every training step (before its experience is made)
  generate  every call of the sampler inside a step
  save      before every file operation of a checkpoint save (each file, the rename, the commit marker)
  final     before the final model is written
Actions, taken on the n-th hit of the point in this process:
  kill (SIGKILL to this process), term (SIGTERM), int (SIGINT), raise (an OSError, as a full disk would).
E.g. `POSTTRAIN_FAULTS="save@3=kill"` kills the run at the third file operation of its first save. Under
torchrun, `POSTTRAIN_FAULTS_RANK=r` limits the faults to rank r. The tests inject faults only through this
hook, never by editing the code under test.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

_counts: Counter = Counter()
_plan_cache: tuple[str, dict] = ("", {})


def _plan(spec: str) -> dict[tuple[str, int], str]:
    global _plan_cache
    if _plan_cache[0] != spec:
        plan = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            where, _, action = item.partition("=")
            point, _, n = where.partition("@")
            if action not in ("kill", "term", "int", "raise") or not n.isdigit():
                raise ValueError(f"POSTTRAIN_FAULTS: cannot read {item!r}; write point@n=kill|term|int|raise")
            plan[(point, int(n))] = action
        _plan_cache = (spec, plan)
    return _plan_cache[1]


def hit(point: str) -> None:
    spec = os.environ.get("POSTTRAIN_FAULTS")
    if not spec:
        return
    rank = os.environ.get("POSTTRAIN_FAULTS_RANK")
    if rank is not None and os.environ.get("RANK", "0") != rank:
        return
    _counts[point] += 1
    action = _plan(spec).get((point, _counts[point]))
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action in ("term", "int"):
        os.kill(os.getpid(), signal.SIGTERM if action == "term" else signal.SIGINT)
    elif action == "raise":
        raise OSError(f"injected fault at {point} #{_counts[point]} (POSTTRAIN_FAULTS)")


def reset() -> None:
    """Forget the hit counts (tests that run several trainings in one process)."""
    _counts.clear()
