"""What a stage calls on besides its policy: its reward functions (checked against the data's columns before the
model loads), reward models (`{fn: model}`, a stage of this run or a directory; loaded once per run and path),
the recipe's teacher and the run's vLLM engine (each made once and shared by the stages).

A mixin of `run.Run` (its recipe `cfg`, run directory `out`, in-process reward callables `rewards`, `world`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from .models import pick_device, resolve_model
from .objective.presets import get_preset
from .recipe import RecipeError
from .stage_data import StageData
from .training.world import shard


def _pending_reward(prompts, completions, **kw):
    """Stands in for a reward model an earlier stage of the run has yet to train (column checks only)."""
    raise RuntimeError("the reward model of this stage has not been trained yet")


class StageResources:
    """Reward scorers, reward models, the teacher and the vLLM engine of a run's stages."""

    def _check_rewards(self, stage, sd: "StageData") -> None:
        """Before the model loads: the reward functions import, and accept the data's columns as keywords."""
        if sd.rows is None or not get_preset(stage.method).needs_rewards or not stage.rewards:
            return
        from .rewards import reward_columns

        self._checking = True
        try:
            with self._scorer(stage) as scorer:
                scorer.check_columns(reward_columns(sd.rows.rows))
        except ValueError as e:
            raise RecipeError(f"stage {stage.name!r}: {e}") from None
        finally:
            self._checking = False

    def _teacher(self, tok, device, dtype):
        """The recipe's teacher, loaded once, frozen; its tokenizer must be the policy's (the same ids)."""
        if getattr(self, "_teacher_model", None) is None:
            from .models import load_teacher

            self._teacher_model = load_teacher(self.cfg.teacher, tok, dtype=dtype, device=device)
            if self.world.sharded and self.cfg.distributed.teacher == "shard":
                shard(self._teacher_model, self.world)
        return self._teacher_model

    def _scorer(self, stage):
        from .rewards import RewardScorer, RewardSpec

        if not stage.rewards:  # on-policy distillation without rewards
            return contextlib.nullcontext(None)
        specs = []
        for r in stage.rewards:
            fn: Any = r.fn
            local = fn == "model"
            if local:  # a reward model, batched on the trainer's device (loaded once per run and path)
                fn = self._reward_model(r)
            elif fn.startswith("<callable:"):
                fn = self.rewards[stage.name][int(fn[len("<callable:"):-1])]
            elif stage.data.task and ":" not in fn:
                from .tasks import get_task

                fn = get_task(stage.data.task).rewards.get(fn, fn)
            specs.append(RewardSpec(fn=fn, weight=r.weight, kwargs={} if local else dict(r.kwargs),
                                    name=r.name or ("model" if local else None), local=local))
        pol = stage.reward_policy
        return RewardScorer(specs, timeout_s=stage.reward_timeout_s, memory_mb=pol.memory_mb,
                            file_size_mb=pol.file_size_mb, cpu_s=pol.cpu_s)

    def _reward_model(self, r):
        """The reward function of {fn: model, path: ...}: one reward model or an ensemble of them; a path may name a
        stage of this run (its model)."""
        from .reward_model import EnsembleReward, ModelReward

        names = [s.name for s in self.cfg.stages]
        wheres = []
        for path in r.model_paths():
            in_run = path in names
            where = self.out / "stages" / path / "model" if in_run else path
            if in_run and not Path(where).exists():
                if self._checking:  # checked before step 0: the stage makes it later
                    return _pending_reward
                raise RecipeError(f"reward model {path!r} is a stage of this run that has not finished; put the "
                                  "reward_model stage before the stages that use it")
            wheres.append(str(where))
        key = (tuple(wheres), r.ensemble, tuple(sorted(r.kwargs.items())))
        cache = self._reward_models
        if key not in cache:
            device = pick_device(self.cfg.device)
            try:
                cache[key] = (EnsembleReward(wheres, ensemble=r.ensemble, device=device, **r.kwargs) if r.ensemble
                              else ModelReward(wheres[0], device=device, **r.kwargs))
            except (OSError, ValueError, TypeError) as e:
                raise RecipeError(f"reward model {r.path!r} (fn: model): {e}") from None
        return cache[key]

    def _vllm(self, stage, tok, model):
        """The run's vLLM engine, made once and shared by its stages (its weights are the policy's at each step)."""
        if getattr(self, "_vllm_engine", None) is None:
            from .models import MIXED
            from .rollout.vllm_engine import VLLMEngine

            dtype = MIXED.get(self.cfg.dtype, next(model.parameters()).dtype)
            ranks = [s.lora.r for s in self.cfg.stages if s.lora is not None and s.rollout.engine == "vllm"]
            self._vllm_engine = VLLMEngine(resolve_model(self._policy_source), dtype=dtype, seed=self.cfg.seed,
                                           gpu_memory_utilization=stage.rollout.vllm_memory,
                                           max_model_len=stage.rollout.vllm_max_len, distributed=self.world.size > 1,
                                           lora_rank=max(ranks, default=None))
        return self._vllm_engine
