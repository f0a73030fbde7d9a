"""Rewards: score completions with built-in verifiers or the user's own TRL-style functions, safely.

A reward function has TRL's signature, ``fn(prompts, completions, **kwargs) -> list[float | None]``,
called with keywords: ``completions`` are strings (or message lists for conversational data), extra
dataset columns arrive as keyword lists (``answer=[...]``) beside ``completion_ids=[[...], ...]``, and a
spec's fixed ``kwargs`` are passed as they are. A recipe names a function as a built-in (``"math"``) or
``"module:function"``; code may pass the callable.

Failure policy. Functions run out of process (``posttrain.rewards.worker``) with a wall-clock timeout
per call. A batch call that raises, hangs or kills its worker is retried sample by sample. A sample
whose reward raises, times out, crashes the worker, or is None / NaN / inf is *masked*: NaN in
``per_fn`` and ``total``, and one ``RewardError`` with its row id — never a crash, never a silent zero.
What the trainer does with a masked sample (drop it, zero its advantage, abort on a sustained failure
rate) is its decision. A wrong number of values or a non-numeric value is a bug in the function, not a
per-sample error: ValueError naming the function.

Cost of a hang: at most about two timeouts per function and batch (the batch call, then the first hung
sample alone) plus a worker restart (~0.2 s): after ``max_sample_timeouts`` (default 1) hung samples of one
function in one batch, its remaining samples are masked untried (kind "skipped"), so a function that
always hangs cannot stall a step for N timeouts. How the worker is started (a fresh interpreter, or a fork
for closures), limited and ended is explained in worker.py; when failures stop a run is the trainer's
failure policy (``reward_policy`` in a recipe).
"""
from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from posttrain.rewards.builtin import BUILTIN, code_execution
from posttrain.rewards.worker import (
    Batch,
    InProcessRunner,
    Job,
    Message,
    Stalled,
    WorkerProcess,
    reference_of,
    resolve_reward_fn,
)

if TYPE_CHECKING:  # torch is imported where tensors are built: the worker process imports this package,
    import torch  # and a worker (re)start without torch takes ~0.2 s instead of ~2 s

__all__ = ["BUILTIN", "RewardBatch", "RewardError", "RewardScorer", "RewardSpec", "code_execution",
           "resolve_reward_fn", "reward_columns"]

logger = logging.getLogger(__name__)
_RESERVED = ("prompts", "completions", "completion_ids")


@dataclass
class RewardSpec:
    """One reward function with its weight in the total, fixed keyword arguments and display name."""

    fn: str | Callable
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)
    name: str | None = None
    local: bool = False  # run in the caller's process (a reward model on the trainer's device), not the worker


@dataclass
class RewardError:
    """Function ``fn`` could not score row ``row_id``.

    ``kind`` is one of: exception, timeout, crash (the worker died), none, nonfinite, skipped (not tried
    after the function hung on too many samples of the batch). ``traceback`` is set for exceptions.
    """

    row_id: object
    fn: str
    message: str
    kind: str = "exception"
    traceback: str = ""


@dataclass
class RewardBatch:
    """The scores of one batch of N completions, with every masked sample accounted for in ``errors``."""

    total: torch.Tensor  # (N,) float64: sum_k weight_k * per_fn[k]; NaN where any function failed
    per_fn: dict[str, torch.Tensor]  # name -> (N,) float64 raw values, NaN where that function failed
    errors: list[RewardError]

    def error_counts(self) -> dict[str, int]:
        """Masked samples per function (every function appears, with 0 if it never failed)."""
        counts = dict.fromkeys(self.per_fn, 0)
        for error in self.errors:
            counts[error.fn] += 1
        return counts


def reward_columns(rows: list[dict]) -> list[str]:
    """The dataset columns reward functions receive as keyword lists: every column of any row but the prompt
    (a row without one passes None)."""
    return sorted({k for r in rows for k in r} - {"prompt"})


@dataclass(frozen=True)
class _Reward:
    name: str
    fn: Callable
    weight: float
    kwargs: dict
    target: object  # what the worker loads: a built-in name or "module:function", else the callable itself
    local: bool = False


def _resolve(spec: RewardSpec) -> _Reward:
    if not isinstance(spec, RewardSpec):
        raise TypeError(f"expected RewardSpec, got {type(spec).__name__}")
    fn = resolve_reward_fn(spec.fn)
    if not math.isfinite(spec.weight):
        raise ValueError(f"reward {spec.fn!r}: weight must be a finite number, got {spec.weight}")
    if not isinstance(spec.kwargs, dict):
        raise ValueError(f"reward {spec.fn!r}: kwargs must be a dict of fixed keyword arguments, got {spec.kwargs!r}")
    if clash := set(spec.kwargs) & set(_RESERVED):
        raise ValueError(f"reward {spec.fn!r}: kwargs may not set {sorted(clash)}; those are filled per batch")
    if isinstance(spec.fn, str):
        default_name, target = spec.fn.rpartition(":")[2].rpartition(".")[2], spec.fn
    else:
        default_name, target = getattr(fn, "__name__", type(fn).__name__), reference_of(fn) or fn
    return _Reward(spec.name or default_name, fn, float(spec.weight), dict(spec.kwargs), target, bool(spec.local))


class RewardScorer:
    """Scores batches with several reward functions and combines them into a weighted total.

    ``timeout_s`` bounds each call of each function (a batch call, or one sample when retrying); a
    sample that hangs costs about two timeouts plus a worker restart, and after ``max_sample_timeouts``
    hung samples of one function in one batch its remaining samples are masked untried.
    ``in_process=True`` runs the functions in the caller: per-sample error handling still applies, but
    there is no timeout, so a hanging function hangs training. Use it for debugging or trusted code.

    The worker starts on the first call (or ``start()``) and lives until ``close()`` (also on exit from a
    ``with`` block, on garbage collection and at interpreter exit). Not thread-safe: one caller at a time.
    """

    def __init__(
        self,
        specs: list[RewardSpec],
        *,
        timeout_s: float = 30.0,
        in_process: bool = False,
        max_sample_timeouts: int = 1,
        memory_mb: int | None = 8192,
        file_size_mb: int | None = 1024,
        cpu_s: int | None = 300,
    ):
        if not specs:
            raise ValueError("RewardScorer needs at least one RewardSpec")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        if max_sample_timeouts < 1:
            raise ValueError(f"max_sample_timeouts must be >= 1, got {max_sample_timeouts}")
        self.rewards = [_resolve(s) for s in specs]
        names = [r.name for r in self.rewards]
        if duplicates := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"reward names must be unique, {duplicates} repeat; give each spec a distinct name=")
        self.timeout_s, self.in_process, self.max_sample_timeouts = timeout_s, in_process, max_sample_timeouts
        self.limits = {"memory_mb": memory_mb, "file_size_mb": file_size_mb, "cpu_s": cpu_s}
        self._runner: InProcessRunner | WorkerProcess | None = None
        self._local = InProcessRunner([(r.name, r.fn, r.kwargs) for r in self.rewards if r.local])
        self._closed = False
        self._checked_columns: set[frozenset[str]] = set()

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    @property
    def context(self) -> str:
        """How functions run: "in_process", or the worker's start method ("spawn" or "fork")."""
        if self.in_process:
            return "in_process"
        return "spawn" if all(isinstance(r.target, str) for r in self._remote) else "fork"

    @property
    def _remote(self) -> list[_Reward]:
        """The rewards the worker runs (all of them but the local ones)."""
        return [r for r in self.rewards if not r.local]

    def start(self) -> None:
        """Start the worker now (otherwise the first call does), e.g. to keep its start-up out of timing."""
        if self._closed:
            raise RuntimeError("this RewardScorer is closed; create a new one")
        if self._runner is None and self._remote:
            triples = [(r.name, r.fn if self.in_process else r.target, r.kwargs) for r in self._remote]
            if self.in_process:
                self._runner = InProcessRunner(triples)
            elif self.context == "fork" and not hasattr(os, "fork"):
                opaque = [r.name for r in self._remote if not isinstance(r.target, str)]
                raise ValueError(
                    f"rewards {opaque} cannot be imported by name and this platform cannot fork: define them "
                    "at module level in an importable file (name them 'module:function'), or pass in_process=True"
                )
            else:
                self._runner = WorkerProcess(triples, context=self.context, timeout_s=self.timeout_s,
                                             limits=self.limits)
        if isinstance(self._runner, WorkerProcess):
            self._runner.start()

    def __call__(
        self,
        prompts: list,
        completions: list,
        *,
        columns: dict[str, list],
        completion_ids: list[list[int]],
        row_ids: list,
    ) -> RewardBatch:
        n = len(completions)
        self._check_batch(n, prompts=prompts, completion_ids=completion_ids, row_ids=row_ids, **columns)
        self.check_columns(columns)
        self.start()
        batch = Batch(
            prompts=list(prompts),
            completions=list(completions),
            columns={k: list(v) for k, v in columns.items()},
            completion_ids=[ids.tolist() if hasattr(ids, "tolist") else list(ids) for ids in completion_ids],
        )
        values, failures = [[]] * len(self.rewards), []
        for runner, part in ((self._runner, self._remote), (self._local, [r for r in self.rewards if r.local])):
            if not part:
                continue
            index = [self.rewards.index(r) for r in part]  # position in self.rewards of each of the runner's fns
            v, f = score(runner, batch, [r.name for r in part], max_sample_timeouts=self.max_sample_timeouts)
            for k, vals in zip(index, v):
                values[k] = vals
            failures += [Failure(index[x.fn], x.index, x.kind, x.message, x.traceback) for x in f]
        import torch

        per_fn = {r.name: torch.tensor(v, dtype=torch.float64) for r, v in zip(self.rewards, values)}  # (N,) each
        _check_magnitude(per_fn, row_ids)
        total = torch.zeros(n, dtype=torch.float64)  # (N,)
        for r in self.rewards:
            total += r.weight * per_fn[r.name]  # NaN propagates, even with weight 0: a masked sample stays masked
        errors = [RewardError(row_ids[f.index], self.names[f.fn], f.message, f.kind, f.traceback) for f in failures]
        _log_errors(errors, n)
        return RewardBatch(total, per_fn, errors)

    def _check_batch(self, n: int, **lists: list) -> None:
        for key, values in lists.items():
            if len(values) != n:
                raise ValueError(
                    f"reward batch: {key!r} has {len(values)} entries for {n} completions; pass one per completion"
                )

    def check_columns(self, columns) -> None:
        """Every function can be called with the dataset's columns (names) as keywords: ValueError otherwise.
        A call that could only fail would mask every sample and hide a configuration error, so the trainer
        checks this before the model loads, and every batch with new columns is checked again."""
        key = frozenset(columns)
        if key in self._checked_columns:
            return
        if clash := key & set(_RESERVED):
            raise ValueError(f"dataset columns {sorted(clash)} collide with reward arguments; rename those columns")
        for r in self.rewards:
            if clash := key & set(r.kwargs):
                raise ValueError(f"reward {r.name!r}: fixed kwargs {sorted(clash)} collide with dataset columns")
            try:
                signature = inspect.signature(r.fn)
            except (TypeError, ValueError):  # some builtins and C callables have none: nothing to check
                continue
            passed = {k: None for k in (*_RESERVED, *columns, *r.kwargs)}
            try:
                signature.bind(**passed)
            except TypeError as e:
                raise ValueError(
                    f"reward {r.name!r} cannot be called with keywords {sorted(passed)}: {e}. Reward functions "
                    "take fn(prompts, completions, **kwargs); add **kwargs to accept columns you do not use, or "
                    f"add the missing column to the dataset (it has {sorted(columns)})"
                ) from None
        self._checked_columns.add(key)

    def close(self) -> None:
        """Stop the worker (and anything it started). Idempotent."""
        self._closed = True
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------
# The retry policy: a plan of jobs, re-planned after every hang or crash (protocol in worker.py)


@dataclass(frozen=True)
class Failure:
    """Function ``fn`` could not score sample ``index`` (kinds as in RewardError)."""

    fn: int
    index: int
    kind: str
    message: str
    traceback: str = ""


def _check_magnitude(per_fn: dict, row_ids: list) -> None:
    """A reward that is infinite, or too large for the float32 advantages and loss, stops the run naming the
    function and row (NaN stays what it means here: that function failed on that row, reported as an error)."""
    from ..errors import FLOAT32_MAX, NonFiniteError

    for name, v in per_fn.items():
        bad = (v.abs() > FLOAT32_MAX).nonzero().flatten().tolist()  # inf too; NaN compares False
        if bad:
            i = bad[0]
            raise NonFiniteError(f"reward function {name} returned {float(v[i])!r} for row {row_ids[i]} "
                                 f"({len(bad)} such value(s) in this batch); rewards must be finite in float32 "
                                 f"(|r| <= {FLOAT32_MAX:.3g})")


def score(
    runner: InProcessRunner | WorkerProcess, batch: Batch, names: list[str], *, max_sample_timeouts: int
) -> tuple[list[list[float]], list[Failure]]:
    """Score every function on every sample, surviving exceptions, hangs and crashes of single calls.

    Returns ``values[k][i]`` (function k, sample i; NaN where it failed) and the failures. Each function
    starts with one batch call; the plan shrinks as replies arrive, so after a stall the fresh worker is
    sent only what is left. Raises ValueError when a function returns the wrong length or a non-number.
    """
    n = len(batch.prompts)
    values = [[math.nan] * n for _ in names]
    failures: list[Failure] = []
    stalls = [0] * len(names)
    plan = [Job(k, tuple(range(n)), whole=True) for k in range(len(names))] if n else []
    while plan:
        try:
            for message in runner.execute(batch, plan):
                plan = _advance(plan, message, values, failures, names)
        except Stalled as stall:
            plan = _after_stall(plan, stall, stalls, failures, names, max_sample_timeouts)
    return values, failures


def _advance(
    plan: list[Job], message: Message, values: list[list[float]], failures: list[Failure], names: list[str]
) -> list[Job]:
    """Record one worker reply and return the plan still to run."""
    kind = message[0]
    if kind == "done":
        return plan
    if kind == "bad":
        raise ValueError(message[2])
    job = plan[0]
    if message[1] != job.fn:
        raise RuntimeError(f"reward worker replied for function {message[1]} while {job.fn} was running")
    if kind == "raised":
        logger.info("reward %r: batch call raised %s; scoring sample by sample", names[job.fn], message[2][0])
        return [Job(job.fn, job.indices, whole=False), *plan[1:]]
    if kind == "values":
        scored, rest = dict(zip(job.indices, message[2])), ()
    else:  # "sample"
        _, fn, i, value, error = message
        scored = {} if error else {i: value}
        if error:
            failures.append(Failure(fn, i, "exception", error[0], error[1]))
        rest = job.indices[job.indices.index(i) + 1 :]
    for i, value in scored.items():
        if value is not None and math.isfinite(value):
            values[job.fn][i] = value
        elif value is None:
            failures.append(Failure(job.fn, i, "none", "returned None"))
        else:
            failures.append(Failure(job.fn, i, "nonfinite", f"returned {value}"))
    return ([Job(job.fn, rest, whole=False)] if rest else []) + plan[1:]


def _after_stall(
    plan: list[Job],
    stall: Stalled,
    stalls: list[int],
    failures: list[Failure],
    names: list[str],
    max_sample_timeouts: int,
) -> list[Job]:
    """The running call hung or crashed: retry a batch call sample by sample; mask a single sample."""
    job = plan[0]
    if job.whole and len(job.indices) > 1:  # a batch of one has nothing to isolate: mask it now
        logger.warning("reward %r: batch call failed (%s); scoring sample by sample", names[job.fn], stall.message)
        return [Job(job.fn, job.indices, whole=False), *plan[1:]]
    failures.append(Failure(job.fn, job.indices[0], stall.kind, stall.message))
    stalls[job.fn] += stall.kind == "timeout"  # a crash costs no waiting: only hangs use up the budget
    rest = job.indices[1:]
    if rest and stalls[job.fn] >= max_sample_timeouts:
        note = f"not tried: the function already timed out on {stalls[job.fn]} samples of this batch"
        failures.extend(Failure(job.fn, i, "skipped", note) for i in rest)
        rest = ()
    return ([Job(job.fn, rest, whole=False)] if rest else []) + plan[1:]


def _log_errors(errors: list[RewardError], n: int) -> None:
    by_fn: dict[str, list[RewardError]] = {}
    for error in errors:
        by_fn.setdefault(error.fn, []).append(error)
    for name, errs in by_fn.items():
        shown = "; ".join(f"row {e.row_id!r}: {e.message}" for e in errs[:3])
        more = f"; and {len(errs) - 3} more" if len(errs) > 3 else ""
        logger.warning("reward %r masked %d of %d samples (%s%s)", name, len(errs), n, shown, more)
