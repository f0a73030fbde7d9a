"""A stage's rows, read and checked before the model loads (`StageRows`, a part of `run.Run`): the rows each
`data` / `demos` / `heldout` section names, their format against what the method reads, demonstrations paired
with their prompts, and, once the tokenizer is known, every row's length; a bad row goes to the run's BadRows
with its file, row number and field."""
from __future__ import annotations

from dataclasses import dataclass

from .data import detect_format, encode_dataset, load_rows
from .data.formats import check_rows, split_implicit_prompts
from .data.loading import RowSet
from .objective.presets import get_preset
from .preflight import long_prompts
from .recipe import RecipeError

DEMO_FORMATS = ("messages", "prompt_completion", "text")
RL_FORMATS = ("prompt_answer", "prompt_only")
PREFERENCE_FORMATS = ("preference",)
UNPAIRED_FORMATS = ("unpaired",)
IN_MEMORY = "<in-memory>"


@dataclass
class StageData:
    rows: RowSet | None
    fmt: str | None
    demos: RowSet | None
    demos_fmt: str | None
    encoded: list | None = None  # the encoded demonstrations, once the tokenizer is known
    heldout_rows: RowSet | None = None  # a reward_model stage's held-out pairs ...
    heldout: list | None = None  # ... encoded


class StageRows:
    """Run's methods that read and check a stage's rows (they use the run's `data`, `bad_rows` and `vocab_rows`)."""

    def _rowset(self, stage, d) -> RowSet | None:
        """The rows `d` (a stage's `data` or `demos` section) names; None for data an earlier stage makes."""
        if d.task:
            from .tasks import get_task

            rows = get_task(d.task).rows(d.split)
            rowset = RowSet(rows, f"task:{d.task}/{d.split}")
        elif d.from_stage:
            return None
        elif d.path == IN_MEMORY or (d.path is None and stage.name in self.data and d is stage.data):
            rowset = load_rows(self.data[stage.name], split=d.split)
        elif d.path:
            rowset = load_rows(d.path, split=d.split)
        else:
            raise RecipeError(f"stage {stage.name!r}: set data.path (a file, directory or hub id), data.task or "
                              "data.from_stage")
        return rowset.head(d.limit) if d.limit else rowset

    def _load_stage_data(self, stage) -> "StageData":
        """A stage's rows, every one checked against its format before the model loads (bad rows: BadRows)."""
        preset = get_preset(stage.method)
        sd = StageData(self._rowset(stage, stage.data), None, None, None)
        if sd.rows is not None:
            sd.rows, sd.fmt = self._check_rows(stage, stage.data, sd.rows, stage.data.format, preset.data)
        if stage.demos is not None:
            sd.demos = self._rowset(stage, stage.demos)
            if sd.demos is not None:
                sd.demos, sd.demos_fmt = self._check_rows(stage, stage.demos, sd.demos, stage.demos.format,
                                                          "demonstrations")
        if sd.rows is not None and (preset.needs_demonstrations or reads_row_demos(preset, stage)):
            self._check_paired(stage, sd)
        if stage.heldout is not None:
            sd.heldout_rows, _ = self._check_rows(stage, stage.heldout, self._rowset(stage, stage.heldout), "auto",
                                                  "preferences")
        return sd

    def _check_rows(self, stage, section, rowset: RowSet, fmt: str, kind: str) -> tuple[RowSet, str]:
        allowed = {"demonstrations": DEMO_FORMATS, "preferences": PREFERENCE_FORMATS,
                   "unpaired": UNPAIRED_FORMATS}.get(kind, RL_FORMATS)
        if kind == "preferences":
            rowset = split_implicit_prompts(rowset)
        fmt = detect_format(rowset, allowed) if fmt == "auto" else fmt
        if fmt not in allowed:
            raise RecipeError(f"stage {stage.name!r}: method {stage.method!r} reads {', '.join(allowed)} data "
                              f"here, not {fmt!r} ({rowset.origin})")
        return self.bad_rows.add(stage, section, rowset, check_rows(rowset, fmt)), fmt

    def _check_lengths(self, stage, sd: "StageData", tok, context: int | None) -> None:
        """With the tokenizer: demonstrations are encoded (sd.encoded) and RL prompts measured; a row longer than
        data.max_len, or than the model's context (a prompt: less rollout.max_new_tokens), is a bad row."""
        preset = get_preset(stage.method)
        if sd.rows is None or sd.encoded is not None:
            return
        if preset.data in ("preferences", "unpaired"):  # pairs / labelled responses, checked against max_len
            max_len = min(stage.data.max_len, context or stage.data.max_len)
            if sd.heldout_rows is not None:
                sd.heldout, bad = encode_dataset(sd.heldout_rows, "preference", tok, max_len=max_len,
                                                 vocab_rows=self.vocab_rows)
                sd.heldout_rows = self.bad_rows.add(stage, stage.heldout, sd.heldout_rows, bad)
            sd.encoded, bad = encode_dataset(sd.rows, sd.fmt, tok, max_len=max_len, vocab_rows=self.vocab_rows)
            sd.rows = self.bad_rows.add(stage, stage.data, sd.rows, bad)
            if preset.data == "unpaired":  # (the kept rows, in the order of their encodings)
                sd.encoded = [(e, bool(r["label"])) for e, r in zip(sd.encoded, sd.rows.rows)]
            return
        if preset.data != "demonstrations":
            sd.rows = self.bad_rows.add(stage, stage.data, sd.rows,
                                        long_prompts(stage, sd.rows, tok, context, self.vocab_rows))
        if preset.data == "demonstrations" or "demonstrations" in preset.sources:
            section, rows, fmt = (stage.demos, sd.demos, sd.demos_fmt) if sd.demos is not None else \
                (stage.data, sd.rows, sd.fmt)
            if preset.data != "demonstrations" and sd.demos is None:
                fmt = "prompt_answer"  # the rows' own completion / solution column
            max_len = min(section.max_len, context or section.max_len)
            examples, bad = encode_dataset(rows, fmt, tok, max_len=max_len, vocab_rows=self.vocab_rows)
            rest = self.bad_rows.add(stage, section, rows, bad)
            if preset.data == "demonstrations":  # (a hybrid's prompts stay: only their demonstration is out)
                sd.rows = rest
            elif sd.demos is not None:
                sd.demos = rest
            sd.encoded = examples

    def _check_paired(self, stage, sd: "StageData") -> None:
        from .training.sources import PairedDemos

        if sd.demos is not None and get_preset(stage.method).needs_demonstrations and sd.demos_fmt != \
                "prompt_completion":
            raise RecipeError(f"stage {stage.name!r}: demonstrations paired with prompts are matched by prompt, so "
                              f"`demos` needs prompt + completion rows, not {sd.demos_fmt!r} ({sd.demos.origin})")
        paired = PairedDemos(None, sd.demos if get_preset(stage.method).needs_demonstrations else None,
                             sd.demos_fmt)
        sd.rows = self.bad_rows.add(stage, stage.data, sd.rows, paired.check(sd.rows, stage.method))


def reads_row_demos(preset, stage) -> bool:
    """CHORD-style stages without a `demos:` dataset read their demonstrations from the prompt rows."""
    return "demonstrations" in preset.sources and preset.data != "demonstrations" and stage.demos is None
