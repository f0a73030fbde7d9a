"""The one loop: every method, demonstrations or rollouts, goes through `run_stage`.

    for step in steps:  experience (demo batch | rollout batch) -> [ppo_epochs x minibatches] optimizer_step -> log

All resumable state lives in `TrainState` (model, optimizer, scheduler, data cursor, sampling RNG, step),
so that checkpointing can save and restore it as one object.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from ..objective.presets import get_preset
from .experience import Batch, demo_batch
from .metrics import NullSink
from .update import ObjectiveSpec, optimizer_step

log = logging.getLogger("posttrain")


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


@dataclass
class TrainState:
    """Everything a stage needs to continue exactly where it stopped."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    cursor: DataCursor
    generator: torch.Generator  # sampling RNG (rollouts)
    step: int = 0


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_factor(step: int, *, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then constant or cosine decay to `min_ratio` at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer, cfg, total: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total=total, warmup=cfg.warmup_steps, kind=cfg.kind,
                                       min_ratio=cfg.min_lr_ratio))


def new_state(model, stage, seed: int, n_rows: int) -> TrainState:
    opt = make_optimizer(model, stage.optim)
    return TrainState(model, opt, make_scheduler(opt, stage.schedule, stage.steps),
                      DataCursor(n_rows, seed, stage.data.shuffle), torch.Generator().manual_seed(seed))


def run_stage(state: TrainState, stage, *, examples=None, rows=None, maker=None, pad_id: int, device,
              sink=NullSink(), max_steps: int | None = None, on_step=None) -> dict:
    """Train one stage to `stage.steps` optimizer steps (or `max_steps`). Returns the last metrics record.

    Demonstration methods read `examples` (encoded); rollout methods read `rows` through `maker`.
    `on_step(state, record)` is a hook for checkpoints and evaluation; it stays outside the hot loop, and a
    true return value ends the stage early (e.g. a target reached).
    """
    preset = get_preset(stage.method)
    total = min(stage.steps, max_steps) if max_steps else stage.steps
    rl = preset.data == "rollouts"
    spec = ObjectiveSpec.from_stage(
        stage, max_len=stage.rollout.max_new_tokens if rl else stage.data.max_len,
        temperature=stage.rollout.temperature if rl else 1.0, log_entropy=rl)
    last: dict = {}
    t_start = time.perf_counter()
    while state.step < total:
        t0 = time.perf_counter()
        if rl:
            batch, extra = _rollout_experience(state, stage, rows, maker)
        else:
            batch = demo_batch([examples[i] for i in state.cursor.take(stage.batch.size)], pad_id)
            extra = {}
        t1 = time.perf_counter()
        for record in _updates(state, stage, spec, batch, device, total):
            record.update(extra, stage=stage.name, t_experience=t1 - t0, t_step=time.perf_counter() - t0,
                          wall_s=time.perf_counter() - t_start)
            sink.write(record)
            last = record
            if on_step is not None and on_step(state, record):
                return last
    return last


def _rollout_experience(state: TrainState, stage, rows, maker) -> tuple[Batch | None, dict]:
    def refill(k: int):
        idx = state.cursor.take(k)
        return [rows[i] for i in idx], idx

    idx = state.cursor.take(stage.batch.size)
    batch, stats = maker.make(state.model, [rows[i] for i in idx], idx, state.generator, refill)
    for err in stats.errors[:5]:
        log.warning("reward error on row %s in %s: %s", err.row_id, err.fn, err.message)
    if len(stats.errors) > 5:
        log.warning("... %d more reward errors this step", len(stats.errors) - 5)
    return batch, stats.values


def _updates(state: TrainState, stage, spec: ObjectiveSpec, batch: Batch | None, device, total: int):
    """ppo_epochs x minibatches optimizer steps on one batch; yields one metrics record per step."""
    if batch is None or batch.loss_mask.sum() == 0:
        # Nothing to learn from (every group filtered or failed): the step still counts, with no update,
        # so a run cannot spin forever; the record says so.
        state.step += 1
        with warnings.catch_warnings():  # the schedule advances with the step count, update or not
            warnings.simplefilter("ignore", UserWarning)
            state.scheduler.step()
        yield {"step": state.step, "skipped": 1, "lr": state.optimizer.param_groups[0]["lr"]}
        return
    micro = stage.batch.micro_size or batch.size
    for _ in range(stage.ppo_epochs):
        order = torch.randperm(batch.size, generator=state.generator) if stage.minibatches > 1 \
            else torch.arange(batch.size)
        for chunk in order.chunk(stage.minibatches):
            if state.step >= total:
                return
            record = optimizer_step(state.model, state.optimizer, state.scheduler, batch.select(chunk), spec,
                                    micro_size=micro, max_grad_norm=stage.optim.max_grad_norm, device=device)
            state.step += 1
            record["step"] = state.step
            yield record
