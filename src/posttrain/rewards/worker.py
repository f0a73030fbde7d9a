"""Run reward functions out of process, with a wall-clock timeout on every call.

Protocol (one round trip per batch): the parent sends the batch once with a *plan* — one ``Job`` per
reward function — and the worker streams back one message per finished call:

    ("values", fn, values)           the batch call returned (values normalised to float | None)
    ("raised", fn, error)            the batch call raised; one "sample" message per sample follows
    ("sample", fn, i, value, error)  one sample scored alone (value None when error is set)
    ("bad", fn, message)             wrong length / non-numeric output: a bug in the function, the plan stops
    ("done",)                        the plan is finished

The parent waits at most ``timeout_s`` for each message, i.e. for each call; nothing here uses
``signal.alarm`` (it only works on the main thread and clobbers the user's own handlers). When a call
hangs or the worker dies, ``WorkerProcess.execute`` kills the worker's whole process group (the worker
and anything its reward functions started) and raises ``Stalled``; the retry policy in
``posttrain.rewards.score`` then masks what it must and sends the rest of the plan to a fresh worker.

Process start: ``spawn`` (a fresh interpreter, safe beside torch's threads) when every function can be
named by reference (built-in name or ``module:function``). Callables that cannot be imported by name
(lambdas, closures, functions defined in ``__main__``) are handed to a ``fork``ed worker instead (Linux):
it inherits them without pickling, but it must not use torch itself (a fork of a process running
torch's thread pools may deadlock there). As with any ``spawn``, a user's training script that creates a
scorer must guard its entry point with ``if __name__ == "__main__":``.
"""
from __future__ import annotations

import importlib
import importlib.util
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import numbers
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from posttrain.rewards.builtin import BUILTIN


Message = tuple
Target = tuple[str, object, dict]  # (display name, builtin name | "module:function" | callable, fixed kwargs)


@dataclass(frozen=True)
class Batch:
    """Everything a reward call needs, sent to the worker once per batch. Lists have length N."""

    prompts: list
    completions: list
    columns: dict[str, list]
    completion_ids: list


@dataclass(frozen=True)
class Job:
    """Call function ``fn`` on samples ``indices``: once on all of them (``whole``), or one by one."""

    fn: int
    indices: tuple[int, ...]
    whole: bool


class Stalled(Exception):
    """The worker stopped answering (timeout) or died (crash) during a call."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


# ---------------------------------------------------------------------------------------------------
# Resolving names to functions (used in the parent to validate eagerly, and again in a spawned worker)


def resolve_reward_fn(spec: str | Callable) -> Callable:
    """A built-in short name (``"math"``), ``"module:function"`` (importable from sys.path or the current
    directory), or a callable, returned as the callable. Raises ValueError naming the valid choices."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a reward function is a built-in name, 'module:function' or a callable, got {spec!r}")
    if ":" not in spec:
        if spec in BUILTIN:
            return BUILTIN[spec]
        raise ValueError(
            f"unknown built-in reward {spec!r}; built-ins are {', '.join(sorted(BUILTIN))}, "
            "or name your own function as 'module:function'"
        )
    module_name, _, attr = spec.partition(":")
    module = _import_module(module_name, spec)
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            choices = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
            raise ValueError(
                f"reward {spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                f"attribute {attr!r}; its public callables are: {', '.join(choices) or 'none'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward {spec!r} is a {type(obj).__name__}, not a function")
    return obj


def _import_module(module_name: str, spec: str):
    """Import ``module_name`` from sys.path or, failing that, the current directory."""
    top = module_name.split(".")[0]
    if os.getcwd() not in sys.path and importlib.util.find_spec(top) is None:
        sys.path.append(os.getcwd())  # 'module:function' may name a file beside the recipe, as users expect
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ValueError(
                f"reward {spec!r}: no module {e.name!r} on sys.path or in the current directory "
                f"{os.getcwd()}; check the spelling, or run from the directory that holds {top}.py"
            ) from e
        raise ValueError(f"reward {spec!r}: importing {module_name!r} failed: {e}") from e
    except Exception as e:  # a bug in the user's module: say which module, keep the cause chained
        raise ValueError(f"reward {spec!r}: importing {module_name!r} raised {type(e).__name__}: {e}") from e


def reference_of(fn: Callable) -> str | None:
    """``"module:qualname"`` if a fresh interpreter can import ``fn`` by name, else None."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    reference = f"{module}:{qualname}"
    try:
        return reference if resolve_reward_fn(reference) is fn else None
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------
# Calling the functions (runs inside the worker, or in the caller with in_process=True)


def normalize_values(raw: object, n: int, name: str) -> list[float | None]:
    """Check a reward function's output: a sequence of N numbers or None. Raises ValueError otherwise."""
    if hasattr(raw, "tolist") and not isinstance(raw, (list, tuple)):  # numpy arrays, torch tensors
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        raise ValueError(
            f"reward function {name!r} returned {type(raw).__name__}; it must return a list with one float "
            f"(or None) per completion ({n} here)"
        )
    if len(raw) != n:
        raise ValueError(
            f"reward function {name!r} returned {len(raw)} values for {n} completions; return one per completion"
        )
    values: list[float | None] = []
    for i, v in enumerate(raw):
        if v is None or isinstance(v, numbers.Real):
            values.append(None if v is None else float(v))
            continue
        try:
            if isinstance(v, (str, bytes)):
                raise TypeError
            values.append(float(v))  # 0-d tensors, numpy scalars, Decimal
        except (TypeError, ValueError):
            raise ValueError(
                f"reward function {name!r} returned a non-numeric value {v!r} ({type(v).__name__}) for "
                f"completion {i}; return a float, or None to skip that completion"
            ) from None
    return values


def describe_error(exc: BaseException) -> tuple[str, str]:
    """(one-line summary, formatted traceback) of an exception raised by a reward function."""
    summary = f"{type(exc).__name__}: {exc}".strip()
    return summary, "".join(traceback.format_exception(exc))


def _call(fn: Callable, fixed: dict, batch: Batch, indices: Sequence[int]) -> object:
    """Call ``fn`` on the samples ``indices``. Everything goes by keyword, as TRL does, so functions written
    for TRL like ``def reward(completions, **kwargs)`` work unchanged."""
    pick = lambda xs: [xs[i] for i in indices]  # noqa: E731
    columns = {k: pick(v) for k, v in batch.columns.items()}
    return fn(
        prompts=pick(batch.prompts), completions=pick(batch.completions),
        completion_ids=pick(batch.completion_ids), **columns, **fixed,
    )


def run_plan(fns: list[tuple[str, Callable, dict]], batch: Batch, plan: list[Job]) -> Iterator[Message]:
    """Execute ``plan``, yielding the protocol messages above. ``fns[k] = (name, function, fixed kwargs)``."""
    for job in plan:
        name, fn, fixed = fns[job.fn]
        if job.whole:
            try:
                raw = _call(fn, fixed, batch, job.indices)
            except (Exception, SystemExit) as e:  # SystemExit too: a reward must not end the worker
                yield ("raised", job.fn, describe_error(e))
            else:
                try:
                    yield ("values", job.fn, normalize_values(raw, len(job.indices), name))
                except ValueError as e:
                    yield ("bad", job.fn, str(e))
                    return
                continue
        for i in job.indices:
            try:
                raw = _call(fn, fixed, batch, [i])
            except (Exception, SystemExit) as e:
                yield ("sample", job.fn, i, None, describe_error(e))
                continue
            try:
                (value,) = normalize_values(raw, 1, name)
            except ValueError as e:
                yield ("bad", job.fn, str(e))
                return
            yield ("sample", job.fn, i, value, None)
    yield ("done",)


def serve(conn: multiprocessing.connection.Connection, targets: list[Target]) -> None:
    """Worker main loop: load the functions, then answer plans until "close" or the parent goes away."""
    os.setpgrp()  # own process group: the parent can kill anything a reward function started, too
    try:
        fns = [(name, resolve_reward_fn(target), fixed) for name, target, fixed in targets]
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("load_error", describe_error(e)[0]))
        return
    conn.send(("ready",))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the parent exited
            return
        if request[0] == "close":
            return
        _, batch, plan = request
        for message in run_plan(fns, batch, plan):
            conn.send(message)


# ---------------------------------------------------------------------------------------------------
# Parent side: where the plan runs


class InProcessRunner:
    """Runs the plan in the caller: per-sample error handling, but no timeout (a hang hangs the caller)."""

    def __init__(self, fns: list[tuple[str, Callable, dict]]):
        self.fns = fns

    def execute(self, batch: Batch, plan: list[Job]) -> Iterator[Message]:
        return run_plan(self.fns, batch, plan)

    def close(self) -> None:
        pass


class WorkerProcess:
    """A persistent worker process, started on first use and restarted after a hang or crash.

    ``targets`` are (name, reference or callable, fixed kwargs); ``context`` is "spawn" (references only)
    or "fork".
    """

    def __init__(self, targets: list[Target], *, context: str, timeout_s: float, start_timeout_s: float = 120.0):
        self.targets, self.context = targets, context
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self.process: multiprocessing.process.BaseProcess | None = None
        self.conn: multiprocessing.connection.Connection | None = None
        self._finalizer: multiprocessing.util.Finalize | None = None
        self.restarts = 0

    def start(self) -> None:
        if self.process is not None and self.process.is_alive():
            return
        self._stop()
        ctx = multiprocessing.get_context(self.context)
        parent, child = ctx.Pipe()
        # Not a daemon: reward functions may use multiprocessing themselves. The finalizer below stops the
        # worker when this object is collected, on close(), or at interpreter exit (before multiprocessing
        # joins non-daemon children, thanks to its exit priority).
        process = ctx.Process(target=serve, args=(child, self.targets), name="posttrain-reward-worker")
        process.start()
        child.close()
        self.process, self.conn = process, parent
        self._finalizer = multiprocessing.util.Finalize(self, _stop_process, args=(process, parent), exitpriority=10)
        if not parent.poll(self.start_timeout_s):
            self._stop()
            raise RuntimeError(f"the reward worker did not start within {self.start_timeout_s:g} s")
        try:
            reply = parent.recv()
        except EOFError:
            code = self._stop()
            raise RuntimeError(
                f"the reward worker exited during start-up (exit code {code}); its traceback is printed above. "
                "A spawned worker imports your main script again: put the script's entry point under "
                "`if __name__ == \"__main__\":`"
            ) from None
        if reply[0] == "load_error":
            self._stop()
            raise ValueError(f"the reward worker could not load the reward functions: {reply[1]}")

    def execute(self, batch: Batch, plan: list[Job]) -> Iterator[Message]:
        """Send the plan; yield replies; raise Stalled when a call exceeds ``timeout_s`` or the worker dies."""
        self.start()
        try:
            self.conn.send(("run", batch, plan))
        except (BrokenPipeError, OSError):  # died while idle: nothing was running, so just start again
            self._stop()
            self.start()
            self.conn.send(("run", batch, plan))
        finished = False
        try:
            while True:
                if not self.conn.poll(self.timeout_s):
                    self._stop(kill=True)
                    raise Stalled("timeout", f"no result within the {self.timeout_s:g} s timeout; worker killed")
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):
                    code = self._stop(kill=True)
                    raise Stalled("crash", f"the reward worker died (exit code {code}) during this call") from None
                finished = message[0] in ("done", "bad")  # set before yielding: the consumer may raise on "bad"
                yield message
                if finished:
                    return
        finally:
            if not finished:  # abandoned mid-plan (timeout, or the consumer stopped): unread replies would
                self._stop(kill=True)  # be taken for the next batch's, so this worker must go

    def _stop(self, kill: bool = False) -> int | None:
        """Stop the current worker (gracefully unless ``kill``); return its exit code."""
        if self.process is None:
            return None
        process = self.process
        if kill:
            _kill_group(process)
        self._finalizer()  # runs _stop_process once and unregisters it
        self.process = self.conn = self._finalizer = None
        if kill:
            self.restarts += 1
        return process.exitcode

    def close(self) -> None:
        self._stop()


def _kill_group(process: multiprocessing.process.BaseProcess) -> None:
    """SIGKILL the worker's process group (the worker and anything its reward functions started)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # not yet its own group leader: kill just the worker
        process.kill()


def _stop_process(process: multiprocessing.process.BaseProcess, conn: multiprocessing.connection.Connection) -> None:
    """Ask the worker to exit, kill its group if it does not within a second, and reap it (no zombie)."""
    if process.exitcode is None:
        try:
            conn.send(("close",))
        except (OSError, ValueError):
            pass
        multiprocessing.connection.wait([process.sentinel], timeout=1.0)
        _kill_group(process)  # still unreaped, so its pid cannot have been reused; also ends leftovers
    process.join()
    conn.close()
