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
hangs or the worker dies, ``WorkerProcess.execute`` ends the worker's whole process tree and raises
``Stalled``; the retry policy in ``posttrain.rewards.score`` then masks what it must and sends the rest of
the plan to a fresh worker.

Process start: a fresh interpreter, ``python -m posttrain.rewards.serve``, when every function can be named
by reference (built-in name or ``module:function``): it imports posttrain and the reward modules with the
trainer's import path, never the user's main script. Callables that cannot be imported by name (lambdas,
closures, functions defined in ``__main__``) are handed to a ``fork``ed worker instead (Linux): it inherits
them without pickling, but it must not use torch itself (a fork of a process running torch's thread pools
may deadlock there). Either way every message is a line of JSON on a pipe pair of its own (procs.py):
nothing coming back is unpickled, and a reward's prints (sent to stderr) cannot corrupt the protocol. The
worker runs in its own session with memory, file-size and per-batch CPU-time rlimits, is the subreaper of everything its
rewards start, and ends that whole tree when it stops, when it is killed, and when its trainer dies.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import numbers
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from posttrain.rewards.builtin import BUILTIN
from posttrain.rewards.procs import JsonPipe, become_subreaper, kill_tree, limit_cpu, reap_orphans, set_limits


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


def serve(pipe: JsonPipe, targets: list[Target], limits: dict, parent: int) -> None:
    """Worker main loop: limits, load the functions, then answer plans until "close" or the parent goes away.
    Whatever the rewards started is ended with the worker (it is their subreaper)."""
    os.dup2(2, 1)  # a reward's prints go to stderr: the protocol has its own pipe, which output cannot corrupt
    become_subreaper()
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    limits = dict(limits)
    cpu_s = limits.pop("cpu_s", None)
    try:
        set_limits(**limits)
        fns = [(name, resolve_reward_fn(target), fixed) for name, target, fixed in targets]
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        pipe.send(["load_error", describe_error(e)[0]])
        return
    pipe.send(["ready"])
    try:
        while True:
            try:
                request = pipe.recv()
            except (EOFError, OSError):  # the parent exited
                return
            if request[0] == "close":
                return
            _, batch, plan = request
            if cpu_s:  # CPU seconds for this plan on top of what the worker used so far (SIGXCPU ends it: a crash)
                limit_cpu(cpu_s)
            for message in run_plan(fns, Batch(**batch), [Job(fn, tuple(ix), whole) for fn, ix, whole in plan]):
                pipe.send(message)
            reap_orphans()
    finally:
        kill_tree(os.getpid(), include_root=False)


def _watch_parent(parent: int) -> None:
    """A worker whose trainer died (even by SIGKILL, mid-call) ends itself and everything it started."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            kill_tree(os.getpid(), include_root=False)
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    """`python -m posttrain.rewards.serve RFD WFD`: a worker that imports posttrain and the reward modules, never
    the user's main script. Its first message says what to load: {"targets", "path", "limits", "parent"}."""
    rfd, wfd = (int(x) for x in (argv or sys.argv[1:])[:2])
    pipe = JsonPipe(rfd, wfd)
    init = pipe.recv()
    for entry in reversed(init["path"]):  # the trainer's import path: modules beside the recipe, the cwd, ...
        if entry not in sys.path:
            sys.path.insert(0, entry)
    serve(pipe, [tuple(t) for t in init["targets"]], init["limits"], init["parent"])
    return 0


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

    ``targets`` are (name, reference or callable, fixed kwargs); ``context`` is "spawn" (references only: a
    fresh interpreter running ``python -m posttrain.rewards.serve``, which never imports the caller's main
    script) or "fork" (closures, inherited without pickling). Requests and replies are JSON lines on a pipe
    pair; the worker runs in its own session, and stopping it ends its whole process tree.
    """

    def __init__(self, targets: list[Target], *, context: str, timeout_s: float, start_timeout_s: float = 120.0,
                 limits: dict | None = None):
        self.targets, self.context = targets, context
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self.limits = dict(limits or {})
        self.pid: int | None = None
        self.popen: subprocess.Popen | None = None
        self.pipe: JsonPipe | None = None
        self.restarts = 0
        self._cell: list = [None]  # (pid, pipe, popen) of the running worker, for the finalizer
        weakref.finalize(self, WorkerProcess._cleanup, self._cell)  # on collection and at interpreter exit

    def start(self) -> None:
        if self.pid is not None and _poll(self.pid, self.popen) is None:
            return
        self._stop()
        to_child, from_parent = os.pipe()  # (read, write) of the request pipe, (read, write) of the reply pipe
        from_child, to_parent = os.pipe()
        parent = os.getpid()
        if self.context == "spawn":
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "posttrain.rewards.serve", str(to_child), str(to_parent)],
                pass_fds=(to_child, to_parent), stdin=subprocess.DEVNULL, start_new_session=True)
            self.pid = self.popen.pid
        else:
            self.pid = os.fork()
            if self.pid == 0:  # the worker: never returns into the caller's code
                code = 0
                try:
                    os.setsid()
                    for s in (signal.SIGTERM, signal.SIGINT):
                        signal.signal(s, signal.SIG_DFL)
                    _close_fds_but(0, 1, 2, to_child, to_parent)  # the trainer's files and locks stay the trainer's
                    serve(JsonPipe(to_child, to_parent), self.targets, self.limits, parent)
                except BaseException:  # noqa: BLE001
                    code = 1
                os._exit(code)
        os.close(to_child)
        os.close(to_parent)
        self.pipe = JsonPipe(from_child, from_parent)
        self._cell[0] = (self.pid, self.pipe, self.popen)
        try:
            if self.context == "spawn":
                self.pipe.send({"targets": [list(t) for t in self.targets], "path": list(sys.path),
                                "limits": self.limits, "parent": parent})
            reply = self.pipe.recv(self.start_timeout_s)
        except TimeoutError:
            self._stop(kill=True)
            raise RuntimeError(f"the reward worker did not start within {self.start_timeout_s:g} s") from None
        except (EOFError, BrokenPipeError, OSError):
            code = self._stop(kill=True)
            raise RuntimeError(f"the reward worker exited during start-up (exit code {code}); its error is printed "
                               "above") from None
        if reply[0] == "load_error":
            self._stop()
            raise ValueError(f"the reward worker could not load the reward functions: {reply[1]}")

    def execute(self, batch: Batch, plan: list[Job]) -> Iterator[Message]:
        """Send the plan; yield replies; raise Stalled when a call exceeds ``timeout_s`` or the worker dies."""
        self.start()
        request = ["run", dataclasses.asdict(batch), [[j.fn, list(j.indices), j.whole] for j in plan]]
        try:
            self.pipe.send(request)
        except OSError:  # died while idle: nothing was running, so just start again
            self._stop(kill=True)
            self.start()
            self.pipe.send(request)
        finished = False
        try:
            while True:
                try:
                    message = tuple(self.pipe.recv(self.timeout_s))
                except TimeoutError:
                    self._stop(kill=True)
                    raise Stalled("timeout", f"no result within the {self.timeout_s:g} s timeout; worker killed") from None
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
        """Stop the current worker (gracefully unless ``kill``) and everything it started; its exit code."""
        if self.pid is None:
            return None
        if kill:
            kill_tree(self.pid)
            self.restarts += 1
        code = WorkerProcess._cleanup(self._cell)
        self.pid = self.popen = self.pipe = None
        self._cell[0] = None
        return code

    @staticmethod
    def _cleanup(cell: list) -> int | None:
        """Ask the worker to exit, end its tree if it does not within a second, reap it (no zombie)."""
        if cell[0] is None:
            return None
        pid, pipe, popen = cell[0]
        cell[0] = None
        try:
            pipe.send(["close"])
        except OSError:
            pass
        deadline = time.monotonic() + 1.0
        code = None
        while code is None and time.monotonic() < deadline:
            code = _poll(pid, popen)
            if code is None:
                time.sleep(0.01)
        if code is None:
            kill_tree(pid)
            code = _poll(pid, popen, block=True)
        pipe.close()
        return code

    def close(self) -> None:
        self._stop()


def _close_fds_but(*keep: int) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _poll(pid: int, popen, block: bool = False) -> int | None:
    if popen is not None:
        return popen.wait() if block else popen.poll()
    try:
        got, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:  # reaped already
        return -1
    return os.waitstatus_to_exitcode(status) if got else None
