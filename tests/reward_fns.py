"""User-style reward functions for the reward-worker tests (TRL signature; importable as 'reward_fns:<name>').

Each misbehaves on completions that contain a marker word, so one batch mixes good and bad samples.
"""
import math
import os
import subprocess
import sys
import time


def length(prompts, completions, **kwargs):
    """len(completion): a plain, well-behaved reward."""
    return [float(len(c)) for c in completions]


def raises_on_boom(prompts, completions, **kwargs):
    """Raises for the whole batch whenever one completion says 'boom'; 1.0 otherwise."""
    for c in completions:
        if "boom" in c:
            raise ZeroDivisionError(f"cannot score {c!r}")
    return [1.0] * len(completions)


def hangs_on_hang(prompts, completions, **kwargs):
    """Never returns when a completion says 'hang' (a sympy blow-up, a deadlock...); 2.0 otherwise."""
    if any("hang" in c for c in completions):
        time.sleep(3600)
    return [2.0] * len(completions)


def exits_on_crash(prompts, completions, **kwargs):
    """Kills its own process (a segfault in C code looks the same to the parent); 3.0 otherwise."""
    if any("crash" in c for c in completions):
        os._exit(7)
    return [3.0] * len(completions)


def wrong_length(prompts, completions, **kwargs):
    """One value too many: a bug in the function."""
    return [1.0] * (len(completions) + 1)


def non_numeric(prompts, completions, **kwargs):
    """Strings instead of numbers: a bug in the function."""
    return ["good"] * len(completions)


def none_or_nan(prompts, completions, **kwargs):
    """None / NaN / inf where the completion names it, else 0.5."""
    special = {"none": None, "nan": math.nan, "inf": math.inf}
    return [special.get(c, 0.5) for c in completions]


def uses_columns(prompts, completions, answer, completion_ids, **kwargs):
    """10 * answer + number of completion tokens + bonus: reads a dataset column and the token ids."""
    bonus = kwargs.get("bonus", 0.0)
    return [10.0 * float(a) + len(ids) + bonus for a, ids in zip(answer, completion_ids)]


def trl_style(completions, **kwargs):
    """Written for TRL, which passes everything by keyword: no `prompts` parameter at all."""
    return [float(c.count("a")) for c in completions]


def needs_answer(prompts, completions, answer, **kwargs):
    return [1.0] * len(completions)


def starts_sleeper_then_hangs(prompts, completions, pid_file, **kwargs):
    """Starts a grandchild process, records its pid, then hangs: killing the worker must end it too."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    with open(pid_file[0], "w") as f:
        f.write(str(child.pid))
    time.sleep(3600)


def torch_loaded(prompts, completions, **kwargs):
    """1.0 if torch is imported in the process running this function."""
    return [float("torch" in sys.modules)] * len(completions)


def starts_daemon(prompts, completions, pid_file, hang, **kwargs):
    """Starts a `sleep` in a new session (a daemon's escape from the process group), records its pid, then
    returns (hang[0] false) or hangs: the worker's stop must end the daemon either way."""
    child = subprocess.Popen(["sleep", "3600"], start_new_session=True)
    with open(pid_file[0], "w") as f:
        f.write(str(child.pid))
    if hang[0]:
        time.sleep(3600)
    return [1.0] * len(completions)


def allocates(prompts, completions, mb, **kwargs):
    """Allocates `mb` MiB (and touches it) before scoring: past the worker's memory limit this raises."""
    block = bytearray(mb[0] * 2**20)
    block[:: 4096] = b"x" * len(block[:: 4096])
    return [float(len(c)) for c in completions]


def floods_stdout(prompts, completions, **kwargs):
    """Prints 8 MB (no newline at the end) before returning: the replies travel on a pipe of their own."""
    sys.stdout.write("{not json " * 800_000)
    sys.stdout.flush()
    return [float(len(c)) for c in completions]


def always_raises(prompts, completions, **kwargs):
    raise RuntimeError("the verifier is broken")


def fails_one_in_ten(prompts, completions, id, **kwargs):
    """Raises for rows whose id ends in 0 (one row in ten)."""
    if any(str(i).endswith("0") for i in id):
        raise RuntimeError("cannot score this row")
    return [float(len(c)) / 10 for c in completions]


def always_hangs(prompts, completions, **kwargs):
    time.sleep(3600)


def spins(prompts, completions, **kwargs):
    """Burns CPU for ever (a runaway verifier): the worker's CPU limit ends it."""
    while True:
        pass


def from_answer(prompts, completions, answer, **kwargs):
    """The row's `answer` column as the reward, whatever the completion: lets a test set every value."""
    return [float(a) for a in answer]
