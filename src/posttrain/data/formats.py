"""Dataset formats (the column names TRL and the hub already use) and a validator that checks every row.

Validation runs before step 0 so that a bad row stops the run with its file, row and field, instead of
crashing an hour in (or, worse, training silently on a wrong mask).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from posttrain.data.loading import BadRow, DataError, RowSet, excerpt

# format name -> required columns. Order inside `allowed` (see `detect_format`) decides ties.
FORMATS: dict[str, tuple[str, ...]] = {
    "text": ("text",),                              # plain LM, loss on every token
    "messages": ("messages",),                      # conversational SFT, loss on assistant turns
    "prompt_completion": ("prompt", "completion"),  # loss on the completion
    "prompt_answer": ("prompt", "answer"),          # verifiable RL; a demonstration may sit in completion/solution
    "prompt_only": ("prompt",),                     # RL with user reward functions reading other columns
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
}
ROLES = ("system", "user", "assistant", "tool")
DEMONSTRATION_COLUMNS = ("completion", "solution")  # where hybrid methods find a worked answer


def is_conversational(value: Any) -> bool:
    """True for a list of {"role", "content"} messages (the TRL conversational form)."""
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) and "role" in m for m in value)


def split_implicit_prompts(rowset: RowSet) -> RowSet:
    """TRL's implicit-prompt preference rows (no `prompt`; `chosen` and `rejected` are whole conversations that
    share their first turns) get the shared turns as `prompt` and the rest as the responses. Other rows are
    left as they are (a row whose conversations share nothing is then reported as missing its prompt)."""
    out = []
    for row in rowset.rows:
        if isinstance(row, dict) and row.get("prompt") is None and is_conversational(row.get("chosen")) \
                and is_conversational(row.get("rejected")):
            w, lo = row["chosen"], row["rejected"]
            k = 0
            while k < min(len(w), len(lo)) - 1 and w[k] == lo[k] and w[k]["role"] != "assistant":
                k += 1
            if k:
                row = {**row, "prompt": w[:k], "chosen": w[k:], "rejected": lo[k:]}
        out.append(row)
    rowset.rows = out
    return rowset


def detect_format(rowset: RowSet, allowed: Sequence[str]) -> str:
    """The format of the rows, decided from every row: the first format in `allowed` (most specific first)
    whose columns at least half of the rows have, else the one most rows have. Rows without its columns
    are then bad rows (`check_rows`), so a column missing from some later rows is reported up front."""
    unknown = [f for f in allowed if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown dataset format(s) {unknown}; valid formats: {', '.join(FORMATS)}")
    if not rowset.rows:
        raise DataError(rowset.origin, None, None, "the dataset has no rows" + (
            f" that could be read ({len(rowset.bad)} unreadable: {rowset.bad[0]})" if rowset.bad else ""))
    counts = {fmt: sum(1 for r in rowset.rows if isinstance(r, dict) and all(r.get(c) is not None for c in
                                                                             FORMATS[fmt])) for fmt in allowed}
    for fmt in allowed:
        if counts[fmt] and 2 * counts[fmt] >= len(rowset.rows):
            return fmt
    best = max(allowed, key=lambda f: counts[f])  # max keeps the first of equals
    if counts[best]:
        return best
    columns = sorted({c for r in rowset.rows if isinstance(r, dict) for c in r})
    needs = "; ".join(f"{f}: {', '.join(FORMATS[f])}" for f in allowed)
    raise DataError(rowset.origin, None, None,
                    f"no usable format: no row has the columns of one of the formats this stage reads ({needs}); "
                    f"the columns found are {', '.join(columns[:20]) or 'none'}. Rename your columns")


def check_rows(rowset: RowSet, fmt: str) -> list[BadRow]:
    """Every bad row of `rowset` for format `fmt` (missing or mistyped fields, empty turns, unknown roles, ...),
    with the unreadable lines its loader found, each with its row number, field and reason."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    bad = list(rowset.bad)
    check = _CHECKS[fmt]
    for i, row in enumerate(rowset.rows):
        n = rowset.number(i)
        if not isinstance(row, dict):
            bad.append(BadRow(rowset.origin, n, None, f"a row must be a dict of columns, got {type(row).__name__}"))
            continue
        missing = [c for c in FORMATS[fmt] if row.get(c) is None]
        if missing:
            bad.append(BadRow(rowset.origin, n, missing[0], f"missing (format {fmt!r} needs columns "
                                                            f"{', '.join(FORMATS[fmt])})", excerpt(row)))
            continue
        try:
            check(row)
        except _Bad as b:
            bad.append(BadRow(rowset.origin, n, b.field, b.message, excerpt(row)))
    return bad


def validate(rowset: RowSet, fmt: str) -> None:
    """Check EVERY row of `rowset` against `fmt`; the first bad row raises DataError(origin, row, field, why)."""
    if not rowset.rows and not rowset.bad:
        raise DataError(rowset.origin, None, None, "the dataset has no rows")
    bad = check_rows(rowset, fmt)
    if bad:
        b = min(bad, key=lambda x: x.row)
        raise DataError(b.origin, b.row, b.field, b.reason)


class _Bad(Exception):
    def __init__(self, field: str, message: str):
        self.field, self.message = field, message


# ---------------------------------------------------------------- field checks

def _check_messages(field: str, value: Any, *, need_assistant: bool) -> None:
    if not isinstance(value, list) or not value:
        raise _Bad(field, f"must be a non-empty list of {{'role', 'content'}} messages, got {_show(value)}")
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise _Bad(field, f"message {j} must be a dict with 'role' and 'content', got {_show(m)}")
        if m.get("role") not in ROLES:
            raise _Bad(field, f"message {j} has role {m.get('role')!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise _Bad(field, f"message {j} ({m['role']}) needs a string 'content', got {_show(m.get('content'))}")
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        raise _Bad(field, "has no assistant message, so nothing would be trained on; add an assistant turn")


def _check_text_or_messages(field: str, value: Any, *, need_assistant: bool, allow_empty: bool) -> None:
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise _Bad(field, "is an empty string")
        return
    if isinstance(value, list):
        _check_messages(field, value, need_assistant=need_assistant)
        return
    raise _Bad(field, f"must be a string or a list of {{'role', 'content'}} messages, got {_show(value)}")


def _check_prompt(row: dict) -> None:
    _check_text_or_messages("prompt", row["prompt"], need_assistant=False, allow_empty=False)


def _check_same_kind(row: dict, field: str) -> None:
    """TRL style: a string prompt pairs with string responses, a conversation with message lists."""
    if isinstance(row["prompt"], str) != isinstance(row[field], str):
        kind = "a string" if isinstance(row["prompt"], str) else "a list of messages"
        raise _Bad(field, f"must have the same form as the prompt ({kind}): either both strings or both message lists")


def _check_response(row: dict, field: str) -> None:
    _check_text_or_messages(field, row[field], need_assistant=True, allow_empty=True)
    _check_same_kind(row, field)


def _check_text(row: dict) -> None:
    text = row["text"]
    if not isinstance(text, str) or not text:
        raise _Bad("text", f"must be a non-empty string, got {_show(text)}")


def _check_messages_row(row: dict) -> None:
    _check_messages("messages", row["messages"], need_assistant=True)


def _check_prompt_completion(row: dict) -> None:
    _check_prompt(row)
    _check_response(row, "completion")


def _check_prompt_answer(row: dict) -> None:
    _check_prompt(row)
    answer = row["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise _Bad("answer", f"must be a string or a number, got {_show(answer)}")
    if isinstance(answer, str) and not answer.strip():
        raise _Bad("answer", "is an empty string; every verifiable prompt needs a reference answer")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise _Bad("answer", f"must be a finite number, got {answer}")
    for column in DEMONSTRATION_COLUMNS:  # optional demonstration; None means "no demonstration for this row"
        if row.get(column) is not None:
            _check_response(row, column)


def _check_preference(row: dict) -> None:
    _check_prompt(row)
    for side in ("chosen", "rejected"):
        _check_response(row, side)
        value = row[side]
        text = value if isinstance(value, str) else "".join(m["content"] for m in value if m["role"] == "assistant")
        if not text.strip():
            raise _Bad(side, "is an empty response; a preference pair compares two real answers")
    if row["chosen"] == row["rejected"]:
        raise _Bad("rejected", "equals 'chosen', so the pair carries no preference; fix or drop the row")


def _check_unpaired(row: dict) -> None:
    _check_prompt_completion(row)
    if not isinstance(row["label"], bool):
        raise _Bad("label", f"must be true or false (desirable or not), got {_show(row['label'])}")


_CHECKS = {
    "text": _check_text,
    "messages": _check_messages_row,
    "prompt_completion": _check_prompt_completion,
    "prompt_answer": _check_prompt_answer,
    "prompt_only": _check_prompt,
    "preference": _check_preference,
    "unpaired": _check_unpaired,
}


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"
