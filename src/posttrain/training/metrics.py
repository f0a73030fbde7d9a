"""Where per-step metrics go: metrics.jsonl, TensorBoard, and a progress line for humans.

Sinks are null objects when not wanted (`NullSink`), so the loop never branches on logging flags.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from ..jsonio import dumps, write_atomic

log = logging.getLogger("posttrain")


class NullSink:
    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink(NullSink):
    """One JSON object per line; flushed every write so a crash loses nothing already logged."""

    def __init__(self, path: Path, keep=None):
        """Appends to `path`. With `keep(record) -> bool`, the records of an earlier attempt that `keep` rejects
        (steps after the checkpoint a run resumes from, which run again) and a torn last line are dropped
        first, by an atomic rewrite: a kill at any moment leaves the old file or the new, never less."""
        if keep is None:
            path.write_text("", encoding="utf-8")
        elif path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if _kept(line, keep)]
            if len(kept) < len(lines):
                write_atomic(path, "".join(line + "\n" for line in kept))
                log.info("%s: %d records of steps after the checkpoint (or torn) dropped; they run again", path,
                         len(lines) - len(kept))
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.f.write(dumps(record, indent=None) + "\n")  # strict: a non-finite value is written as null
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _kept(line: str, keep) -> bool:
    try:
        return bool(keep(json.loads(line)))
    except json.JSONDecodeError:  # a torn last line of a killed run
        return False


class TensorBoardSink(NullSink):
    def __init__(self, logdir: Path, purge_step: int | None = None):
        """`purge_step`: a resumed run hides the events an earlier attempt wrote from that step on."""
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(logdir), purge_step=purge_step)

    def write(self, record: dict) -> None:
        step = record.get("global_step", record.get("step", 0))
        stage = record.get("stage", "")
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "global_step"):
                self.w.add_scalar(f"{stage}/{k}" if stage else k, v, step)

    def close(self) -> None:
        self.w.close()


class Progress(NullSink):
    """tqdm bar with live loss/reward and ETA on a TTY; plain log lines every `every` steps otherwise."""

    KEYS = ("loss", "reward_mean", "accuracy", "grad_norm", "lr")

    def __init__(self, total: int, desc: str, every: int = 1, tty: bool | None = None):
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.total, self.desc, self.every = total, desc, every
        self.t0 = time.perf_counter()
        self.first: tuple[int, float] | None = None  # (step, time) of the first record
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)

    def _summary(self, record: dict) -> str:
        return " ".join(f"{k}={record[k]:.4g}" for k in self.KEYS if isinstance(record.get(k), (int, float)))

    def write(self, record: dict) -> None:
        step = record["step"]
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(self._summary(record))
            return
        now = time.perf_counter()
        if self.first is None:  # the ETA is timed from the first step on: start-up and compilation are not steps
            self.first = (step, now)
        if step % self.every == 0 or step == self.total:
            elapsed = now - self.t0
            done, since = step - self.first[0], now - self.first[1]
            eta = f"{since / done * (self.total - step):.0f}s" if done else "?"
            log.info("[%s] step %d/%d %s elapsed %.0fs eta %s", self.desc, step, self.total,
                     self._summary(record), elapsed, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Sinks(NullSink):
    def __init__(self, *sinks: NullSink):
        self.sinks = list(sinks)

    def write(self, record: dict) -> None:
        for s in self.sinks:
            s.write(record)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
