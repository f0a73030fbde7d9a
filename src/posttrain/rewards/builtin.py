"""Built-in verifiers with the TRL reward signature ``fn(prompts, completions, **kwargs) -> list[float | None]``.

The answer convention matches the built-in task (DESIGN.md §4): a completion's answer is the text after
its last answer mark (``#### X``, ``\\boxed{X}``, ``The answer is X``, ``Answer: X``), or, when it marks
none, the last number it contains. Format adherence is a separate reward (``format``) so accuracy is not
starved by a format the base model writes only sometimes.

Scores: 1.0 correct, 0.0 wrong or malformed (a completion with no answer is wrong, not unscorable),
``None`` only when the *gold* answer cannot be read (the sample cannot be scored at all).

``math_match`` calls math_verify with its timeouts switched off: math_verify implements them with
``signal.alarm``, which raises off the main thread and would interfere with the caller's own signal
handlers. Hangs are bounded instead by the reward worker's wall-clock timeout, which kills the process
(see ``posttrain.rewards.worker``); with ``in_process=True`` there is no timeout.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from functools import lru_cache

# A number as people write it: optional sign (ASCII or Unicode minus, not a binary minus as in "10-3"),
# thousands separators only in groups of three, an optional decimal part.
_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])[-\u2212])?"
    r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
    r"|(?:(?<![\w)\]}])[-\u2212])?\.\d+"
)
# Answer marks whose answer runs to the end of the line; \boxed{...} is matched by brace counting.
_LINE_MARKS = re.compile(
    r"####[ \t]*(?P<hash>[^\n]*)"
    r"|\b(?:the\s+)?(?:final\s+)?answer\s+is\s*:?[ \t]*(?P<is>[^\n]*)"
    r"|\banswer\s*:[ \t]*(?P<colon>[^\n]*)",
    re.IGNORECASE,
)
_BOXED = re.compile(r"\\boxed\s*\{")
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_DEFAULT_FORMAT = r"(?s).*#### *-?[\d,.]+\s*$"


def completion_text(completion: object) -> str:
    """The text of a completion: a string, or the last message of a conversational completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return completion_text(completion.get("content", ""))
    if isinstance(completion, Sequence) and completion:
        last = completion[-1]
        if isinstance(last, dict) and last.get("type") == "text":  # content given as a list of parts
            return "".join(str(p.get("text", "")) for p in completion if isinstance(p, dict))
        return completion_text(last)
    if isinstance(completion, Sequence):
        return ""
    raise TypeError(
        f"completion must be a string or a list of messages like [{{'role': 'assistant', 'content': ...}}], "
        f"got {type(completion).__name__}"
    )


def _boxed_contents(text: str) -> list[tuple[int, str]]:
    """(start, content) of every ``\\boxed{...}``, with nested braces balanced; unclosed ones are skipped."""
    found = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append((m.start(), text[m.end() : i - 1]))
    return found


def _clean_mark(answer: str) -> str:
    """Cut a line-mark answer at the end of its sentence and drop wrapping ``$``/``**``."""
    answer = _SENTENCE_END.split(answer, maxsplit=1)[0]
    return answer.strip().strip("$*").strip()


def marked_answer(text: str) -> str | None:
    """The answer after the last answer mark in ``text``, or None if no mark carries an answer."""
    marks = [(s, content) for s, content in _boxed_contents(text) if content.strip()]
    for m in _LINE_MARKS.finditer(text):
        content = _clean_mark(m.group(m.lastgroup))
        if content:
            marks.append((m.start(), content))
    if not marks:
        return None
    last = max(marks, key=lambda mark: mark[0])[1].strip()
    return marked_answer(last) or last  # "Answer: the final answer is 5": a mark's text may hold another mark


def extract_answer(text: str) -> str | None:
    """The marked answer if present (last mark wins), otherwise the last number in ``text``, else None.

    >>> extract_answer("12 + 7 = 19, so 19 + 1 = 20. #### 20")
    '20'
    >>> extract_answer("we get 1,234 then -5.5")
    '-5.5'
    """
    marked = marked_answer(text)
    if marked is not None:
        return marked
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace("\u2212", "-") if numbers else None


def _normalize(answer: str) -> str:
    """Canonical string form: no surrounding space/``$``/final period, no thousands separators, lower case."""
    answer = answer.strip().strip("$").strip().rstrip(".").replace("\u2212", "-")
    answer = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", answer)
    return " ".join(answer.lower().split())


def whole_number(answer: str) -> float | None:
    """The value of an answer that is a number as a whole: "72", "-1,250.5", "3/4", "50%", "1e3"; else None."""
    text = _normalize(answer).rstrip("%").strip()
    fraction = re.fullmatch(r"(-?\d+)\s*/\s*(\d+)", text)
    if fraction:
        denominator = int(fraction.group(2))
        return int(fraction.group(1)) / denominator if denominator else None
    if re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?", text):
        value = float(text)
        return value if math.isfinite(value) else None
    return None


def to_number(answer: str) -> float | None:
    """The value of an answer: the whole string as a number, else its first number ("42 apples" -> 42)."""
    value = whole_number(answer)
    if value is not None:
        return value
    first = _NUMBER.search(_normalize(answer))
    return float(first.group().replace(",", "")) if first else None


def _gold(answer: object) -> str | None:
    """The gold answer string; a GSM8K-style worked solution (``... #### 72``) is reduced to its mark."""
    if answer is None:
        return None
    text = str(answer)
    return marked_answer(text) or text.strip() or None


def exact_match(prompts: list, completions: list, answer: list, **kw) -> list[float | None]:
    """1.0 where the answer equals the gold answer after normalisation (case, surrounding space and ``$``, a final
    period, thousands separators); None if gold is missing. The answer is the marked one (``#### 19``, ``The
    answer is 19``, ``\\boxed{19}``) when the completion has a mark, else the whole completion: "1 2 3 4"
    must equal "1 2 3 4" (the last-number rule is ``numeric``'s)."""
    scores: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        gold = _gold(gold)
        text = completion_text(completion)
        pred = marked_answer(text) or text.strip() or None
        if gold is None:
            scores.append(None)
        else:
            scores.append(float(pred is not None and _normalize(pred) == _normalize(gold)))
    return scores


def numeric_match(prompts: list, completions: list, answer: list, tol: float = 1e-6, **kw) -> list[float | None]:
    """1.0 where the answers agree as numbers within ``tol`` (relative, or absolute near zero: math.isclose).

    None where the gold answer is not a number as a whole ("72 apples" is not readable gold).
    """
    scores: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        gold_text = _gold(gold)
        gold_value = whole_number(gold_text) if gold_text is not None else None
        if gold_value is None:
            scores.append(None)
            continue
        pred = extract_answer(completion_text(completion))
        pred_value = to_number(pred) if pred is not None else None
        scores.append(float(pred_value is not None and math.isclose(pred_value, gold_value, rel_tol=tol, abs_tol=tol)))
    return scores


class _DropTimeoutWarning(logging.Filter):
    """math_verify warns once per process that its timeout is off; here that is deliberate (see module doc)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


@lru_cache(maxsize=1)
def _math_verify() -> tuple[Callable, Callable]:
    """Import math_verify on first use (it pulls in sympy: ~0.5 s) and silence its timeout-off warning."""
    from math_verify import parse, verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutWarning())
    return parse, verify


def _math_parse(text: str, *, bare: bool) -> list:
    """math_verify's parse without its signal-based timeout; [] unless it yields a sympy object.

    ``bare`` text is only an answer ("1+x^2"): it is read whole as LaTeX first, because math_verify's
    search would otherwise pick the first number out of it ("1"). A result that is only math_verify's
    string fallback (e.g. for "\\frac{1") counts as unparsed.
    """
    parse, _ = _math_verify()
    for attempt in [f"${text}$", text] if bare and "$" not in text else [text]:
        parsed = parse(attempt, parsing_timeout=None)
        if any(not isinstance(p, str) for p in parsed):
            return parsed
    return []


def math_match(prompts: list, completions: list, answer: list, **kw) -> list[float | None]:
    """1.0 where math_verify finds the answers equivalent ("\\frac{1}{2}" = "0.5"); None if gold does not parse.

    The prediction is the marked answer if there is one, otherwise the whole completion (math_verify
    then looks for the last expression itself).
    """
    _, verify = _math_verify()
    scores: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        gold_text = _gold(gold)
        gold_parsed = _math_parse(gold_text, bare=True) if gold_text is not None else []
        if not gold_parsed:
            scores.append(None)
            continue
        text = completion_text(completion)
        marked = marked_answer(text)
        pred_parsed = _math_parse(marked, bare=True) if marked else _math_parse(text, bare=False)
        scores.append(float(bool(pred_parsed) and verify(gold_parsed, pred_parsed, timeout_seconds=None)))
    return scores


@lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def format_match(prompts: list, completions: list, pattern: str = _DEFAULT_FORMAT, **kw) -> list[float]:
    """1.0 where ``re.search(pattern, completion)`` matches; the default asks for a final ``#### <number>`` line."""
    regex = _compiled(pattern)
    return [float(regex.search(completion_text(c)) is not None) for c in completions]


def code_execution(prompts: list, completions: list, tests: list, **kw) -> list:
    """Runs each completion's program against its row's tests in a sandbox (rewards/code.py)."""
    from posttrain.rewards.code import code_execution as run

    return run(prompts, completions, tests, **kw)


BUILTIN: dict[str, Callable] = {
    "exact": exact_match,
    "numeric": numeric_match,
    "math": math_match,
    "format": format_match,
    "code": code_execution,
}
