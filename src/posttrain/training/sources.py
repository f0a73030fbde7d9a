"""Sources: where a step's rows come from (DESIGN.md §2). Each remembers only plain, saveable state.

  DataCursor      a seeded walk over n rows (prompts or demonstrations), resumable by (epoch, index)
  Demonstrations  encoded demonstrations drawn by a cursor (SFT, DFT, CHORD's expert rows)
  PackedDemonstrations  the same packed into rows a window of documents at a time, drawn by rows (batch.pack: rows)
  PairedDemos     the demonstration of a given prompt row: its own `completion`/`solution`, or the row of a
                  separate `demos:` dataset with the same prompt (LUFFY, HPT, SRFT, ReLIFT, prefix-guided RL)
  Buffer          ReLIFT's questions whose rollouts all failed, until it is full
  VerifiedPool    rejection sampling's verified samples of the current round, drawn by a cursor

`state_dict()` / `load_state_dict()` return and take JSON-able dicts, so a checkpoint can save every
source's position and contents.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..data.batch import DEMO, Row, best_fit_rows
from ..data.encode import Encoded, EncodeError, encode_sft
from ..data.formats import DEMONSTRATION_COLUMNS
from ..data.loading import BadRow, DataError, RowSet, excerpt


@dataclass
class DataCursor:
    """A seeded walk over `n` rows: a fresh permutation each epoch, position (epoch, index) resumable."""

    n: int
    seed: int
    shuffle: bool = True
    epoch: int = 0
    index: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def _perm(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        if self.n == 0:
            raise ValueError("no rows to draw from")
        out = []
        while len(out) < k:
            if not self._order:
                self._order = self._perm()
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._perm()
            take = min(k - len(out), self.n - self.index)
            out += self._order[self.index: self.index + take]
            self.index += take
        return out

    def state_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, d: dict) -> None:
        self.n, self.seed, self.epoch, self.index = d["n"], d["seed"], d["epoch"], d["index"]
        self._order = []


class Demonstrations:
    """Encoded demonstrations drawn `k` at a time by a seeded cursor."""

    def __init__(self, examples: Sequence[Encoded], seed: int, shuffle: bool = True):
        self.examples = list(examples)
        self.cursor = DataCursor(len(self.examples), seed, shuffle)

    def take(self, k: int) -> list[Encoded]:
        return [self.examples[i] for i in self.cursor.take(k)]

    def state_dict(self) -> dict:
        return {"cursor": self.cursor.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.cursor.load_state_dict(d["cursor"])


PACK_WINDOW = 2048  # batch.pack: rows packs each epoch this many documents at a time


class PackedDemonstrations:
    """Encoded demonstrations packed into rows of at most `pack_len` tokens, drawn `k` rows at a time
    (`batch.pack: rows`).

    Its cursor walks each epoch's seeded permutation (`DataCursor`) a window of `window` documents at a time; a
    window is packed by best-fit decreasing (`best_fit_rows`: rows far fuller than one step's documents can fill)
    and served before the next is drawn. Its rows go out in runs of `group` (a step's rows) of similar length, the
    runs in a seeded order: a step's rows are padded to its longest, so similar rows waste few positions (5 % ->
    0.1 % of them on the benchmark's data). Every document is in exactly one row an epoch. A window's rows are a
    function of the cursor's position where it was drawn and of where its first step begins (`phase`), so (that
    position, row, phase) resumes exactly.
    """

    def __init__(self, examples: Sequence[Encoded], seed: int, shuffle: bool, pack_len: int, group: int = 1,
                 window: int = PACK_WINDOW):
        self.examples, self.pack_len, self.window, self.group = list(examples), pack_len, window, group
        self.cursor = DataCursor(len(self.examples), seed, shuffle)
        self.index = 0  # the next row of the current window
        self.phase = 0  # rows served before this window, modulo `group`: where its first step starts
        self._start: dict | None = None  # the cursor's position where the current window was drawn
        self._rows: list[list[int]] | None = None

    def _window_rows(self) -> list[list[int]]:
        self._start = self.cursor.state_dict()
        left = self.cursor.n - self.cursor.index or self.cursor.n  # (at an epoch's end the next one begins)
        ids = self.cursor.take(min(self.window, left))  # within one epoch
        size = [len(self.examples[i].input_ids) for i in ids]
        rows = sorted(best_fit_rows(size, self.pack_len), key=lambda r: -sum(size[j] for j in r))
        rows = [[ids[j] for j in r] for r in rows]  # longest first
        head = min((self.group - self.phase) % self.group, len(rows))  # the rest of a step begun before
        cut = head + (len(rows) - head) // self.group * self.group  # whole steps, then what the next window ends
        runs = [rows[i: i + self.group] for i in range(head, cut, self.group)]
        if self.cursor.shuffle:
            win = (self.cursor.index - len(ids)) // self.window
            g = torch.Generator().manual_seed((self.cursor.seed * 1_000_003 + self.cursor.epoch) * 7919 + win)
            runs = [runs[i] for i in torch.randperm(len(runs), generator=g).tolist()]
        return rows[:head] + [r for run in runs for r in run] + rows[cut:]

    def take_rows(self, k: int) -> list[list[Encoded]]:
        if not self.examples:
            raise ValueError("no rows to draw from")
        out: list[list[int]] = []
        while len(out) < k:
            if self._rows is None:
                self._rows, self.index = self._window_rows(), 0
            take = min(k - len(out), len(self._rows) - self.index)
            out += self._rows[self.index: self.index + take]
            self.index += take
            if self.index == len(self._rows):  # the next window is drawn when a row is next taken
                self.phase = (self.phase + len(self._rows)) % self.group
                self._rows = None
        return [[self.examples[i] for i in row] for row in out]

    def state_dict(self) -> dict:
        at = self._start if self._rows is not None else self.cursor.state_dict()
        return {"cursor": at, "row": self.index if self._rows is not None else 0, "phase": self.phase}

    def load_state_dict(self, d: dict) -> None:
        self.cursor.load_state_dict(d["cursor"])
        self._rows, self.phase = None, d["phase"]
        if d["row"]:  # the same window again, at the same row
            self._rows, self.index = self._window_rows(), d["row"]


def prompt_key(prompt) -> str:
    """A prompt as a dictionary key (strings and message lists alike)."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


class PairedDemos:
    """The demonstration of each prompt row, encoded once on first use.

    Without `demos`, a row's own `completion` or `solution` column; with `demos` (a RowSet in prompt +
    completion form), the demos row with the same prompt. `check(rows)` reports a prompt without one.
    """

    def __init__(self, tokenizer, demos: RowSet | None = None, demo_format: str | None = None):
        self.tok = tokenizer
        self._by_prompt: dict[str, dict] = {}
        if demos is not None:
            for row in demos.rows:
                self._by_prompt.setdefault(prompt_key(row["prompt"]), row)
            self.origin, self.demo_format = demos.origin, demo_format
        self.external = demos is not None
        self._cache: dict[int, Encoded] = {}

    def _source_row(self, row: dict) -> dict | None:
        if self.external:
            return self._by_prompt.get(prompt_key(row["prompt"]))
        if any(row.get(c) is not None for c in DEMONSTRATION_COLUMNS):
            return row
        return None

    def check(self, rowset: RowSet, method: str) -> list[BadRow]:
        """Every prompt row must have a demonstration: the rows without one, as bad rows."""
        where = (f"has no demonstration with the same prompt in {self.origin}" if self.external
                 else "has no demonstration: put one in the 'completion' or 'solution' column, or give the stage a "
                      "`demos:` dataset")
        return [BadRow(rowset.origin, rowset.number(i), "completion", f"method {method!r} needs a demonstration for "
                       f"every prompt, and this row {where}", excerpt(row))
                for i, row in enumerate(rowset.rows) if self._source_row(row) is None]

    def get(self, key: int, row: dict) -> Encoded:
        """Prompt + demonstration ids of row `key` (its index in the stage's rows), loss on the demonstration."""
        if key not in self._cache:
            src = self._source_row(row)
            if src is None:
                raise DataError("<prompts>", key + 1, "completion", "has no demonstration")
            fmt = "prompt_completion" if self.external and self.demo_format == "prompt_completion" else "prompt_answer"
            try:
                self._cache[key] = encode_sft(src, fmt, self.tok)
            except EncodeError as e:
                raise DataError(self.origin if self.external else "<prompts>", key + 1, e.field, str(e)) from e
        return self._cache[key]

    def text(self, key: int, row: dict) -> str:
        """The demonstration of row `key` as plain text (a message list: its assistant turns' contents)."""
        src = self._source_row(row)
        if src is None:
            raise DataError("<prompts>", key + 1, "completion", "has no demonstration")
        value = next(src[c] for c in DEMONSTRATION_COLUMNS if src.get(c) is not None)
        if isinstance(value, list):
            return "\n".join(str(m.get("content", "")) for m in value if m.get("role", "assistant") == "assistant")
        return str(value)


class Buffer:
    """ReLIFT's buffer: keys of questions whose rollouts all failed, drained `size` at a time."""

    def __init__(self, size: int):
        self.size = size
        self.keys: list[int] = []

    def add(self, keys: Sequence[int]) -> None:
        self.keys.extend(int(k) for k in keys)

    def full(self) -> bool:
        return len(self.keys) >= self.size

    def drain(self) -> list[int]:
        out, self.keys = self.keys[: self.size], self.keys[self.size:]
        return out

    def state_dict(self) -> dict:
        return {"size": self.size, "keys": list(self.keys)}

    def load_state_dict(self, d: dict) -> None:
        self.size, self.keys = d["size"], list(d["keys"])


class VerifiedPool:
    """Rejection sampling's pool: the verified samples of the current round, drawn `k` at a time.

    A round ends after `steps_per_round` steps; the next `take` then needs a new pool (`needs_round()`).
    """

    def __init__(self, steps_per_round: int, seed: int):
        self.steps_per_round = steps_per_round
        self.seed = seed
        self.round = 0  # rounds started
        self.steps_in_round = 0
        self.pool: list[tuple[list[int], list[int]]] = []  # (input_ids, loss_mask)
        self.cursor = DataCursor(0, seed)

    def needs_round(self) -> bool:
        return self.round == 0 or self.steps_in_round >= self.steps_per_round

    def start_round(self, rows: list[tuple[list[int], list[int]]]) -> None:
        self.round += 1
        self.steps_in_round = 0
        self.pool = rows
        self.cursor = DataCursor(len(rows), self.seed + 7919 * self.round)

    def take(self, k: int, group_offset: int = 0) -> list[Row]:
        self.steps_in_round += 1
        if not self.pool:
            return []
        return [Row(list(self.pool[i][0]), list(self.pool[i][1]), DEMO, group_offset + j)
                for j, i in enumerate(self.cursor.take(k))]

    def state_dict(self) -> dict:
        return {"round": self.round, "steps_in_round": self.steps_in_round, "pool": self.pool,
                "cursor": self.cursor.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.round, self.steps_in_round = d["round"], d["steps_in_round"]
        self.pool = [(list(a), list(b)) for a, b in d["pool"]]
        self.cursor = DataCursor(len(self.pool), self.seed)
        self.cursor.load_state_dict(d["cursor"])
