"""`code`: a reward that runs model-written Python against a row's test cases, each candidate in a sandbox.

    code_execution(prompts, completions, tests, **kwargs) -> list[float]   (TRL signature; `code` in recipes)

The program is the completion's last ```python fenced block (else its last fenced block, else the whole
text). `tests` is, per row, one of: a string of Python (its `assert` statements are the test cases, any
other statements set them up), a list of such strings, a list of {"input", "output"} pairs (the program reads
stdin and its stdout must match, line by line, trailing spaces ignored), {"inputs": [...], "outputs": [...]}
(APPS / TACO style), or any of these as a JSON string. A row scores 1.0 when every case passes, else 0.0
(`partial=True`: the fraction that pass).

Each candidate runs in its own process (sandbox_child.py), started with a scrubbed environment, in a new
session, and, where the kernel allows it, in new mount and network namespaces: no network at all, a
read-only root filesystem, a private /tmp (the scratch directory; nothing written survives), and the
unprivileged user `nobody` when posttrain runs as root (root ignores the process limit). rlimits bound CPU
time, memory, processes, file size and open files; stdout is captured up to `output_chars`, the rest is
discarded; the whole process tree is killed after the wall-clock timeout. The verdict comes from this
harness, which reads a result line carrying a random nonce from a pipe of its own — never from the
candidate's exit code or output — so exiting early or printing "passed" scores 0, as do objects whose
`__eq__` always answers True.

What it does NOT protect against, plainly: it is not a security boundary. The candidate shares the
interpreter with the test code, so a program that digs through the interpreter's memory (gc, frames,
ctypes) can find the nonce and forge a pass; kernel exploits and side channels are out of scope; without
namespaces (a kernel or container that forbids them: the result's `isolation` says "none" and a warning is
logged once) there is no network isolation and writes go wherever the user may write, limited only by the
rlimits and the scratch working directory. Run untrusted code at scale in a VM or gVisor.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from posttrain.rewards.procs import kill_tree

log = logging.getLogger("posttrain")

CHILD = str(Path(__file__).with_name("sandbox_child.py"))
_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.S)
_warned: set[str] = set()


def extract_program(completion) -> str:
    """The last ```python block of a completion (string or message list), else its last fenced block, else
    the whole text."""
    text = completion if isinstance(completion, str) else (completion[-1].get("content", "") if completion else "")
    blocks = _FENCE.findall(text)
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    if python:
        return python[-1]
    return blocks[-1][1] if blocks else text


def parse_tests(tests) -> tuple[str, list]:
    """("assert", [python source per case]) or ("io", [{"input", "output"}, ...]) from the forms above."""
    if isinstance(tests, str) and tests.lstrip()[:1] in ("[", "{"):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError:
            pass
    if isinstance(tests, str):
        return "assert", _assert_cases(tests)
    if isinstance(tests, dict) and "inputs" in tests and "outputs" in tests:
        if len(tests["inputs"]) != len(tests["outputs"]):
            raise ValueError("tests: 'inputs' and 'outputs' differ in length")
        return "io", [{"input": _text(i), "output": _text(o)} for i, o in zip(tests["inputs"], tests["outputs"])]
    if isinstance(tests, list) and tests and all(isinstance(t, dict) for t in tests):
        if not all("input" in t and "output" in t for t in tests):
            raise ValueError("tests: each pair needs 'input' and 'output'")
        return "io", [{"input": _text(t["input"]), "output": _text(t["output"])} for t in tests]
    if isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests):
        return "assert", [c for t in tests for c in _assert_cases(t)]
    raise ValueError(f"tests: expected assert lines, a list of them, input/output pairs or {{'inputs', 'outputs'}}, "
                     f"got {type(tests).__name__}")


def _text(x) -> str:
    return x if isinstance(x, str) else "\n".join(map(str, x)) if isinstance(x, list) else str(x)


def _assert_cases(source: str) -> list[str]:
    """Each `assert` statement of `source` is a case, run after the statements before it (setup)."""
    import ast

    tree = ast.parse(source)
    setup, cases = [], []
    for node in tree.body:
        segment = ast.get_source_segment(source, node) or ast.unparse(node)
        if isinstance(node, ast.Assert):
            cases.append("\n".join(setup + [segment]))
        else:
            setup.append(segment)
    if not cases:
        raise ValueError("tests: no assert statement found")
    return cases


def run_candidate(program: str, kind: str, cases: list, *, timeout_s: float = 10.0, memory_mb: int = 512,
                  cpu_s: int | None = None, processes: int = 16, file_size_mb: int = 16,
                  output_chars: int = 1 << 20) -> tuple[int, int, str] | None:
    """(passed, total, isolation) of one program in a fresh sandboxed process; None when it produced no
    verdict (killed at the timeout, exited early, crashed before reporting)."""
    scratch = tempfile.mkdtemp(prefix="posttrain-code-")
    if os.geteuid() == 0:
        os.chmod(scratch, 0o777)  # the candidate runs as nobody
    nonce = secrets.token_hex(16)
    limits = {"cpu_s": cpu_s or max(1, int(timeout_s) + 1), "memory_mb": memory_mb, "processes": processes,
              "file_size_mb": file_size_mb, "output_chars": output_chars}
    r, w = os.pipe()
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": scratch, "TMPDIR": scratch, "PYTHONHASHSEED": "0"}
    try:
        p = subprocess.Popen([sys.executable, "-I", CHILD, str(w)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, pass_fds=(w,), cwd=scratch, env=env, start_new_session=True)
    except OSError:
        os.close(r)
        os.close(w)
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    os.close(w)
    line = b""
    try:
        request = {"program": program, "kind": kind, "cases": cases, "nonce": nonce, "limits": limits,
                   "scratch": scratch}
        try:
            p.stdin.write((json.dumps(request) + "\n").encode())
            p.stdin.close()
        except BrokenPipeError:
            return None
        deadline = time.monotonic() + timeout_s
        while not line.endswith(b"\n") and len(line) < 4096:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                break
            chunk = os.read(r, 4096)
            if not chunk:
                break
            line += chunk
    finally:
        kill_tree(p.pid)  # the candidate and anything it started, whatever it did
        p.wait()
        os.close(r)
        shutil.rmtree(scratch, ignore_errors=True)
    parts = line.decode(errors="replace").strip().split(" ", 3)
    if len(parts) < 3 or parts[0] != nonce:
        return None
    isolation = parts[3] if len(parts) > 3 else "none"
    if isolation == "none" and "none" not in _warned:
        _warned.add("none")
        log.warning("code sandbox: this machine allows no namespaces, so candidates run without network or "
                    "filesystem isolation (rlimits, a scrubbed environment and a scratch directory only)")
    return int(parts[1]), int(parts[2]), isolation


def code_execution(prompts: list, completions: list, tests: list, *, timeout_s: float = 10.0,
                   memory_mb: int = 512, partial: bool = False, workers: int | None = None, **kwargs) -> list:
    """1.0 when the completion's program passes every test case of its row (the fraction with partial=True),
    else 0.0; None for a row without tests. Candidates run in parallel, each in its own sandbox."""
    def one(i: int):
        if tests[i] is None:
            return None
        kind, cases = parse_tests(tests[i])
        got = run_candidate(extract_program(completions[i]), kind, cases, timeout_s=timeout_s, memory_mb=memory_mb)
        if got is None:
            return 0.0
        passed, total, _ = got
        return passed / total if partial else float(passed == total)

    workers = workers or max(1, min(len(completions), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(len(completions))))
