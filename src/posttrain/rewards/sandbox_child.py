"""The candidate's side of the code sandbox (see code.py): run as `python -I sandbox_child.py RESULT_FD`, with a
request (program, tests, nonce, limits) as one JSON line on stdin. Standard library only.

Order matters: read the whole request, isolate (new mount and network namespaces where the kernel allows,
a private writable /tmp, a read-only root, an unprivileged user when started as root), set the rlimits,
keep private references to what reporting needs, and only then run the candidate's program and the tests.
The result goes to RESULT_FD as "NONCE PASSED TOTAL ISOLATION": the harness trusts only a line that starts
with the nonce, so a program that exits early (`sys.exit(0)`, `os._exit(0)`) or prints a fake verdict
scores 0.
"""
import ast
import ctypes
import io
import json
import os
import sys

# Imported before the privileges drop: `nobody` may be unable to read the Python installation (under /root,
# say), so the modules programs commonly use are loaded while it still can; others may fail to import.
PRELOAD = ("resource", "math", "cmath", "collections", "collections.abc", "itertools", "functools", "heapq", "bisect",
           "re", "string", "typing", "random", "fractions", "decimal", "statistics", "datetime", "operator", "copy",
           "array", "dataclasses", "enum", "textwrap", "unicodedata", "numbers", "contextlib", "time", "struct",
           "queue", "hashlib", "base64", "pprint")
CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWUSER = 0x00020000, 0x40000000, 0x10000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
NOBODY = 65534


def isolate(scratch: str) -> tuple[str, str]:
    """(where to work, what isolation holds): namespaces and mounts where permitted, else the scratch dir."""
    libc = ctypes.CDLL(None, use_errno=True)
    root = os.geteuid() == 0
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | (0 if root else CLONE_NEWUSER)
    parts = []
    if libc.unshare(flags) == 0:
        if not root:  # inside a new user namespace: map ourselves so that mounts are allowed there
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"0 {uid} 1")
            _write("/proc/self/gid_map", f"0 {gid} 1")
        parts.append("network namespace")
        ok = libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0
        for d in (b"/tmp", b"/var/tmp", b"/dev/shm"):
            if os.path.isdir(d):
                ok = ok and libc.mount(b"tmpfs", d, b"tmpfs", 0, b"size=64m,mode=1777") == 0
        if ok and libc.mount(b"none", b"/", None, MS_REMOUNT | MS_BIND | MS_RDONLY, None) == 0:
            parts.append("read-only root")
        if ok:
            scratch = "/tmp/work"
            os.makedirs(scratch, mode=0o777, exist_ok=True)
            os.chmod(scratch, 0o777)
            parts.append("private /tmp")
    if root:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        parts.append("user nobody")
    os.chdir(scratch)
    return scratch, ", ".join(parts) or "none"


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError:
        pass


def set_limits(lim: dict) -> None:
    import resource

    for kind, value in ((resource.RLIMIT_CPU, lim.get("cpu_s")), (resource.RLIMIT_NPROC, lim.get("processes")),
                        (resource.RLIMIT_FSIZE, lim.get("file_size_mb") and lim["file_size_mb"] * 2**20),
                        (resource.RLIMIT_AS, lim.get("memory_mb") and lim["memory_mb"] * 2**20),
                        (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
        if value:
            soft, hard = resource.getrlimit(kind)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            try:
                resource.setrlimit(kind, (value, value))
            except (ValueError, OSError):
                pass


class CappedOutput(io.StringIO):
    """A stdout that keeps at most `cap` characters (an output flood costs nothing)."""

    def __init__(self, cap: int):
        super().__init__()
        self.cap = cap

    def write(self, s):
        room = self.cap - self.tell()
        return super().write(s[:max(room, 0)]) if room > 0 else len(s)


def same(a, b) -> bool:
    """`a == b` for the values a test compares, without trusting the candidate's types: a result whose type
    is not a plain built-in one (int, float, str, list, ...) equals nothing, so an object whose __eq__
    always answers True cannot pass a test."""
    plain = (bool, int, float, complex, str, bytes, type(None))
    if type(a) in plain and type(b) in plain:
        return a == b
    if type(a) in (list, tuple) and type(b) in (list, tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if type(a) is dict and type(b) is dict:
        return a.keys() == b.keys() and all(type(k) in plain for k in a) and all(same(a[k], b[k]) for k in a)
    if type(a) in (set, frozenset) and type(b) in (set, frozenset):
        return all(type(x) in plain for x in a) and set(a) == set(b)
    return False


class _StrictEq(ast.NodeTransformer):
    """`assert X == Y` -> `assert __posttrain_same__(X, Y)` (and != likewise)."""

    def visit_Assert(self, node):
        t = node.test
        if isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.ops[0], (ast.Eq, ast.NotEq)):
            call = ast.Call(ast.Name("__posttrain_same__", ast.Load()), [t.left, t.comparators[0]], [])
            node.test = call if isinstance(t.ops[0], ast.Eq) else ast.UnaryOp(ast.Not(), call)
        return node


def main() -> None:
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    result_fd = int(sys.argv[1])
    request = json.loads(sys.stdin.readline())
    sys.stdin.close()
    write, exit_now, run, build = os.write, os._exit, exec, compile  # private references, taken before the program
    nonce, cases, kind = request["nonce"], request["cases"], request["kind"]
    _, isolation = isolate(request["scratch"])
    set_limits(request["limits"])
    cap = request["limits"].get("output_chars", 1 << 20)
    passed = 0
    if kind == "assert":
        ns = {"__name__": "__main__"}
        sys.stdin, sys.stdout = io.StringIO(""), CappedOutput(cap)
        try:
            run(build(request["program"], "<candidate>", "exec"), ns)
        except BaseException:  # noqa: BLE001 - SystemExit too: the tests then run against what was defined
            pass
        for case in cases:
            ns["__posttrain_same__"] = same
            try:
                tree = ast.fix_missing_locations(_StrictEq().visit(ast.parse(case)))
                run(build(tree, "<test>", "exec"), ns)
                passed += 1
            except BaseException:  # noqa: BLE001
                pass
    else:  # stdin -> stdout pairs: the program runs afresh on each input
        for case in cases:
            out = CappedOutput(cap)
            sys.stdin, sys.stdout = io.StringIO(case["input"]), out
            try:
                run(build(request["program"], "<candidate>", "exec"), {"__name__": "__main__"})
            except SystemExit:
                pass
            except BaseException:  # noqa: BLE001
                continue
            got = [line.rstrip() for line in out.getvalue().strip().splitlines()]
            want = [line.rstrip() for line in str(case["output"]).strip().splitlines()]
            passed += got == want
    write(result_fd, f"{nonce} {passed} {len(cases)} {isolation}\n".encode())
    exit_now(0)


if __name__ == "__main__":
    main()
