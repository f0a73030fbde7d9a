"""Process plumbing for the reward worker and the code sandbox (Linux): JSON messages over pipes, resource
limits, and ending a whole process tree.

Nothing here unpickles: every message is one line of JSON, so a compromised child can send the trainer
data, never code. A process tree is ended by freezing it (SIGSTOP, repeated until no new process appears)
and then killing every member (SIGKILL). The worker makes itself a *subreaper* (PR_SET_CHILD_SUBREAPER), so
processes its rewards start and orphan — a daemon's double fork, a `setsid` child — stay its descendants
and are found and ended with it.
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import time

PR_SET_CHILD_SUBREAPER = 36


class JsonPipe:
    """One JSON value per line over a pair of file descriptors."""

    def __init__(self, rfd: int, wfd: int):
        self.r, self.w = rfd, wfd
        self.buf = b""

    def send(self, obj) -> None:
        data = (json.dumps(obj, default=_plain) + "\n").encode()
        view = memoryview(data)
        while view:
            n = os.write(self.w, view)  # BrokenPipeError when the other side has gone
            view = view[n:]

    def recv(self, timeout: float | None = None):
        """The next value; TimeoutError after `timeout` seconds without a whole line, EOFError at the end."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.r], [], [], left)[0]:
                    raise TimeoutError
            chunk = os.read(self.r, 1 << 16)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


def _plain(x):
    """Values JSON has no type for: arrays and tensors as lists, anything else as its text."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


def become_subreaper() -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def set_limits(*, memory_mb: int | None = None, file_size_mb: int | None = None, cpu_s: int | None = None,
               processes: int | None = None) -> None:
    """rlimits for this process and what it starts. Memory is the address space this process may *add* to
    what it already maps (a forked worker starts with its parent's mappings)."""
    import resource

    if memory_mb:
        current = _vm_size()
        _limit(resource.RLIMIT_AS, current + memory_mb * 2**20)
    if file_size_mb:
        _limit(resource.RLIMIT_FSIZE, file_size_mb * 2**20)
    if cpu_s:
        _limit(resource.RLIMIT_CPU, cpu_s)
    if processes:
        _limit(resource.RLIMIT_NPROC, processes)


def limit_cpu(seconds: float) -> None:
    """Allow this process `seconds` more CPU time (user + system) from now: RLIMIT_CPU is a lifetime total, so
    a long-lived worker moves it before each plan."""
    import resource

    used = resource.getrusage(resource.RUSAGE_SELF)
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    value = int(used.ru_utime + used.ru_stime + seconds) + 1
    # Only the soft limit moves (SIGXCPU when reached): a lowered hard limit could not be raised again.
    resource.setrlimit(resource.RLIMIT_CPU, (value if hard == resource.RLIM_INFINITY else min(value, hard), hard))


def _limit(kind: int, value: int) -> None:
    import resource

    soft, hard = resource.getrlimit(kind)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, hard if hard != resource.RLIM_INFINITY else value))


def _vm_size() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children_map() -> dict[int, list[int]]:
    """ppid -> pids of every live process."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(entry))
    return out


def descendants(root: int) -> list[int]:
    kids, out, todo = children_map(), [], [root]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(root: int, *, include_root: bool = True) -> None:
    """SIGKILL `root` (unless `include_root` is false) and all its descendants, frozen first so that none can
    fork a process the kill would miss."""
    seen: set[int] = set()
    for _ in range(10):
        found = set(descendants(root)) - seen
        if not found:
            break
        for pid in found:
            _signal(pid, signal.SIGSTOP)
        seen |= found
    if include_root:
        _signal(root, signal.SIGKILL)
    for pid in seen:
        _signal(pid, signal.SIGKILL)


def reap_orphans() -> None:
    """Collect the exit status of children that already ended (a subreaper inherits other processes' orphans)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
