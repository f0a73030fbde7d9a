"""The `code` reward's sandbox: correct and wrong solutions of real problems score 1 and 0; every escape
attempt and reward hack scores 0 and leaves the host unchanged, with no process left behind.

Each hack program defines a *correct* `add` only if its escape worked, so a score of 0 proves the escape
failed; host-side checks (marker files, a loopback listener, the harness file) prove nothing leaked out.
Isolation depends on the machine (namespaces, running as root): the assertions that need it skip, saying
so, where the sandbox reports it has none."""
import os
import socket
import textwrap
import time
from pathlib import Path

import pytest

from posttrain.rewards import RewardScorer, RewardSpec, code_execution
from posttrain.rewards.code import CHILD, extract_program, parse_tests, run_candidate
from test_rewards_worker import child_pids

ADD_TESTS = "assert add(1, 2) == 3\nassert add(-4, 4) == 0"
GOOD_ADD = "def add(a, b):\n    return a + b\n"


def fenced(program: str) -> str:
    return f"Here is my solution:\n```python\n{textwrap.dedent(program)}```\nDone."


@pytest.fixture(scope="module")
def isolation() -> str:
    got = run_candidate(GOOD_ADD, "assert", ["assert add(1, 2) == 3"])
    assert got is not None and got[:2] == (1, 1)
    return got[2]


def needs(isolation: str, *what: str) -> None:
    missing = [w for w in what if w not in isolation]
    if missing:
        pytest.skip(f"the sandbox has no {', '.join(missing)} on this machine (isolation: {isolation})")


def score(program: str, tests=ADD_TESTS, **kw) -> float:
    return code_execution(["p"], [fenced(program)], [tests], **kw)[0]


# ---- real problems ------------------------------------------------------------------------------------

PROBLEMS = [  # (tests, correct program, wrong program)
    (ADD_TESTS, GOOD_ADD, "def add(a, b):\n    return a - b\n"),
    ("assert is_prime(2)\nassert is_prime(97)\nassert not is_prime(1)\nassert not is_prime(91)",
     "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))\n",
     "def is_prime(n):\n    return n % 2 == 1\n"),
    ("from math import inf\nassert two_sum([2, 7, 11, 15], 9) == [0, 1]\nassert two_sum([3, 2, 4], 6) == [1, 2]",
     "def two_sum(xs, t):\n    seen = {}\n    for i, x in enumerate(xs):\n        if t - x in seen:\n"
     "            return [seen[t - x], i]\n        seen[x] = i\n",
     "def two_sum(xs, t):\n    return [0, 1]\n"),
    ([{"input": "3\n", "output": "1\n2\nFizz\n"}, {"input": "5", "output": "1\n2\nFizz\n4\nBuzz"}],
     "n = int(input())\nfor i in range(1, n + 1):\n    print('FizzBuzz' if i % 15 == 0 else 'Fizz' if i % 3 == 0 "
     "else 'Buzz' if i % 5 == 0 else i)\n",
     "n = int(input())\nfor i in range(1, n + 1):\n    print(i)\n"),
    ({"inputs": ["hello world\n", "a b c\n"], "outputs": ["world hello\n", "c b a\n"]},
     "print(' '.join(reversed(input().split())))\n", "print(input())\n"),
    ('["assert fib(0) == 0", "assert fib(10) == 55", "assert fib(20) == 6765"]',  # tests as a JSON string
     "from functools import lru_cache\n@lru_cache(None)\ndef fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
     "def fib(n):\n    return n\n"),
]


def test_correct_solutions_score_1_and_wrong_ones_0():
    tests = [t for t, _, _ in PROBLEMS] * 2
    completions = [fenced(good) for _, good, _ in PROBLEMS] + [fenced(bad) for _, _, bad in PROBLEMS]
    assert code_execution(["p"] * len(tests), completions, tests) == [1.0] * len(PROBLEMS) + [0.0] * len(PROBLEMS)


def test_partial_credit_program_extraction_and_test_forms():
    half = "def add(a, b):\n    return 3\n"  # passes the first case only
    assert score(half) == 0.0 and score(half, partial=True) == 0.5
    assert extract_program("```python\nA\n```\ntext\n```py\nB\n```") == "B\n"
    assert extract_program([{"role": "assistant", "content": "no fence"}]) == "no fence"
    assert parse_tests("import math\nx = 2\nassert x == 2") == ("assert", ["import math\nx = 2\nassert x == 2"])
    with pytest.raises(ValueError, match="no assert statement"):
        parse_tests("x = 1")
    assert code_execution(["p"], ["x"], [None]) == [None]


# ---- escapes and hacks -------------------------------------------------------------------------------

def hack(attempt: str) -> str:
    """A program whose `add` is correct only if `attempt` (which sets `escaped`) succeeded."""
    return f"escaped = False\ntry:\n{textwrap.indent(textwrap.dedent(attempt), '    ')}\nexcept BaseException:\n" \
           "    pass\ndef add(a, b):\n    return a + b if escaped else 0\n"


def test_shell_subprocess_and_ctypes_cannot_write_to_the_host(tmp_path, isolation):
    marker = tmp_path / "escaped"
    for attempt in (f"import os\nescaped = os.system('touch {marker}') == 0 and os.path.exists('{marker}')",
                    f"import subprocess\nsubprocess.run(['touch', '{marker}'], check=True)\nescaped = True",
                    f"import ctypes\nescaped = ctypes.CDLL(None).system(b'touch {marker}') == 0"):
        assert score(hack(attempt)) == 0.0, attempt
    if "user nobody" not in isolation and "read-only root" not in isolation:
        pytest.skip(f"the sandbox can neither drop to nobody nor make the root read-only here ({isolation})")
    assert not marker.exists()


def test_writes_outside_the_scratch_directory_fail_and_nothing_survives(tmp_path, isolation):
    needs(isolation, "read-only root")
    for path in (tmp_path / "w", Path.home() / "w", Path(CHILD).parent / "w"):
        assert score(hack(f"open('{path}', 'w').write('x')\nescaped = True")) == 0.0, path
        assert not path.exists()
    # the scratch directory itself is writable, and private: a file left there is gone afterwards
    assert score(hack("open('left.txt', 'w').write('x')\nimport os\nescaped = os.path.exists('left.txt')")) == 1.0


def test_no_network_not_even_a_loopback_listener(isolation):
    needs(isolation, "network namespace")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    assert score(hack(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n"
                      "escaped = True")) == 0.0
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()


def test_secrets_in_the_environment_are_not_visible(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_SECRET", "s3cret-token")
    assert score(hack("import os\nescaped = 's3cret' in str(os.environ) or 's3cret' in "
                      "open('/proc/self/environ').read()")) == 0.0
    assert score(hack("import os\nescaped = os.environ.get('PATH') is not None")) == 1.0  # the probe can succeed


@pytest.mark.slow
def test_fork_and_memory_bombs_and_floods_end_in_time_and_leave_no_process():
    before = child_pids()
    started = time.monotonic()
    for program in ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                    "x = []\nwhile True:\n    x.append(bytearray(10**7))\n",
                    "while True:\n    print('flood' * 1000)\n",
                    "import sys\nsys.stdout.write('y' * 10**8)\n" + GOOD_ADD.replace("a + b", "0")):
        assert score(program, timeout_s=2.0) == 0.0, program
    assert time.monotonic() - started < 4 * 2.0 + 6
    time.sleep(0.2)
    assert child_pids() == before


@pytest.mark.parametrize("program", [
    "import sys\nsys.exit(0)\n" + GOOD_ADD,  # exit before the tests: the tests still decide, and add is undefined
    "import os\nos._exit(0)\n",
    "import sys\nprint('ok 2 2')\nsys.stdout.flush()\nimport os\nos.write(int(sys.argv[1]), b'fake 2 2 none\\n')\n"
    "os._exit(0)\n",  # a forged verdict without the nonce
    "import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\ndef add(a, b):\n    return 0\n",
    "class Same:\n    def __eq__(self, other):\n        return True\n    __ne__ = lambda s, o: False\n"
    "def add(a, b):\n    return Same()\n",
    f"import sys\ntry:\n    open(sys.argv[0], 'a').write('\\nraise SystemExit')\nexcept OSError:\n    pass\n"
    "def add(a, b):\n    return 0\n",  # editing the harness
], ids=["sys-exit", "os-exit", "forged-verdict", "patched-assert", "always-equal", "edit-harness"])
def test_reward_hacks_score_0(program):
    before = Path(CHILD).read_bytes()
    assert score(program) == 0.0
    assert Path(CHILD).read_bytes() == before


def test_code_is_a_builtin_reward_in_the_worker():
    with RewardScorer([RewardSpec("code")], timeout_s=30) as scorer:
        out = scorer(["p", "p"], [fenced(GOOD_ADD), fenced("def add(a, b):\n    return 1\n")],
                     columns={"tests": [ADD_TESTS, ADD_TESTS]}, completion_ids=[[1], [2]], row_ids=["a", "b"])
    assert out.total.tolist() == [1.0, 0.0] and out.errors == []
    assert os.path.exists(CHILD)
