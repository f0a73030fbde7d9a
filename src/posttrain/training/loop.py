"""The one loop: every method goes through `run_stage`.

    for step in steps:  experience.make(policy, step) -> [ppo_epochs x minibatches] optimizer_step -> log

The loop never asks which method runs: the stage's `Experience` builds each step's batch from its
sources (demonstrations, rollouts, both), and the update applies each stream's components.
All resumable state lives in `TrainState` (model, optimizer, scheduler, the sources' state through the
experience builder, the sampling RNG, the step), so checkpointing can save and restore it as one object.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass

import torch

from .. import faults
from ..data.batch import Batch
from .world import SINGLE, World
from ..errors import NonFiniteError
from .experience import Experience
from .metrics import NullSink
from .update import ObjectiveSpec, optimizer_step

log = logging.getLogger("posttrain")


@dataclass
class TrainState:
    """Everything a stage needs to continue exactly where it stopped."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    experience: Experience  # the sources: data cursors, buffers, pools
    generator: torch.Generator  # sampling RNG, on the model's device
    seed: int = 0
    step: int = 0
    samples: int = 0  # sequences trained on so far (summed over updates)
    tokens: int = 0  # loss tokens trained on so far
    nonfinite: int = 0  # steps skipped for a NaN/inf loss or gradient, in all
    nonfinite_streak: int = 0  # ... and in a row, up to now
    wall_s: float = 0.0  # seconds spent in this stage's loop, over every process that ran it
    world: World = SINGLE  # the ranks sharing each step's work (world.py)


_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def adamw(params, *, fused: bool | None = None, **kw) -> torch.optim.AdamW:
    """torch's AdamW, with its fused kernel (`fused` None or True) wherever torch has one: every parameter (a plain
    tensor or FSDP's DTensor) on the CPU or a CUDA device, in a floating dtype; elsewhere, or with `fused` False, the
    per-tensor loop (recipes under distributed.strategy fsdp resolve to False). The fused step applies the same
    update as the loop (equal to float rounding, tests/test_optim.py) in one kernel: at 2M parameters 3.4 ms where
    the loop takes 7.1 ms (one CPU thread)."""
    params = list(params)
    fusable = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES for p in params)
    return torch.optim.AdamW(params, fused=(fusable and fused is not False) or None, **kw)


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return adamw(params, fused=cfg.fused, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                 weight_decay=cfg.weight_decay)


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


def new_state(model, stage, seed: int, experience: Experience) -> TrainState:
    opt = make_optimizer(model, stage.optim)
    device = next(model.parameters()).device
    # torch.multinomial needs a generator on the probabilities' device (a CPU one fails on CUDA).
    generator = torch.Generator(device=device).manual_seed(seed)
    return TrainState(model, opt, make_scheduler(opt, stage.schedule, stage.steps), experience, generator, seed,
                      world=experience.world)


def run_stage(state: TrainState, stage, *, device, sink=NullSink(), max_steps: int | None = None,
              on_step=None, on_boundary=None) -> dict:
    """Train one stage to `stage.steps` optimizer steps (or `max_steps`). Returns the last metrics record.

    `on_step(state, record)` is a hook for evaluation after each optimizer step; a true return value ends
    the stage early (e.g. a target reached). `on_boundary(state)` runs after each batch's last update, where
    the state holds no half-used batch: checkpoints and stops on a signal happen there. Both stay outside
    the hot loop.
    """
    total = min(stage.steps, max_steps) if max_steps else stage.steps
    spec = ObjectiveSpec.from_stage(stage, log_entropy=True)
    last: dict = {}
    t_start = time.perf_counter() - state.wall_s  # a resumed stage continues its clock
    while state.step < total:
        faults.hit("step")
        t0 = time.perf_counter()
        data = state.experience.make(state.model, state.step, state.generator)
        _report(data.errors)
        t1 = time.perf_counter()
        for i, record in enumerate(_updates(state, stage, spec, data.batch, device, total)):
            if i == 0:  # the experience's metrics (rewards, errors, timing) belong to its first update only
                record.update(data.values, t_experience=t1 - t0)
            _count_nonfinite(state, record)
            state.samples += int(record.get("samples", 0))
            state.tokens += int(record.get("trained_tokens", 0))
            state.wall_s = time.perf_counter() - t_start
            record.update(stage=stage.name, t_step=time.perf_counter() - t0, wall_s=state.wall_s,
                          samples_total=state.samples, tokens_total=state.tokens)
            sink.write(record)
            last = record
            if state.nonfinite_streak >= stage.optim.max_nonfinite_steps:
                raise NonFiniteError(
                    f"{state.nonfinite_streak} steps in a row had a non-finite loss or gradient (last at step "
                    f"{state.step}); the run stops with its weights as they were before them. Lower optim.lr, "
                    "check the rewards, or raise optim.max_nonfinite_steps.")
            if on_step is not None and on_step(state, record):
                return last
            if _budget_spent(state, stage.stop):
                return last
        if on_boundary is not None and state.step < total:
            on_boundary(state)
    return last


def _count_nonfinite(state: TrainState, record: dict) -> None:
    """Count the steps skipped for a non-finite loss or gradient (a skipped step changes no weight)."""
    if not record.get("nonfinite"):
        state.nonfinite_streak = 0
        return
    state.nonfinite += 1
    state.nonfinite_streak += 1
    record["nonfinite_total"] = state.nonfinite
    log.warning("step %d skipped: loss %s, gradient norm %s: not finite (%d in a row)", record["step"],
                record.get("loss"), record.get("grad_norm"), state.nonfinite_streak)


def _budget_spent(state: TrainState, stop) -> bool:
    return bool((stop.samples and state.samples >= stop.samples) or (stop.tokens and state.tokens >= stop.tokens))


def _report(errors: list) -> None:
    for err in errors[:5]:
        log.warning("reward error on row %s in %s: %s", err.row_id, err.fn, err.message)
    if len(errors) > 5:
        log.warning("... %d more reward errors this step", len(errors) - 5)


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
    critic = state.experience.critic
    shared = critic if critic is not None and critic.shared else None  # its loss rides on the policy's pass
    for epoch in range(stage.ppo_epochs):
        # Minibatch order from a generator seeded by (seed, step, epoch): reproducible, and nothing to save.
        g = torch.Generator().manual_seed(state.seed * 1_000_003 + state.step * 101 + epoch)
        chunks = batch.minibatches(stage.minibatches, g) if stage.minibatches > 1 else [torch.arange(batch.size)]
        for rows in chunks:
            if state.step >= total:
                return
            mb = batch.select(rows)
            record = optimizer_step(state.model, state.optimizer, state.scheduler, mb, spec, micro_size=micro,
                                    max_grad_norm=stage.optim.max_grad_norm, device=device, value_head=shared,
                                    world=state.world)
            if critic is not None:  # PPO's value model learns on the same rows
                record.update(critic.update(mb, state.world))
            state.step += 1
            record["step"] = state.step
            yield record
