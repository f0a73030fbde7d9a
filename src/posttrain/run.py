"""A run: recipe -> stages -> run directory. `posttrain.train(...)` and `posttrain train` both land here.

Run directory (DESIGN.md §3): config.yaml (fully resolved), metrics.jsonl, tb/ (TensorBoard),
summary.json, final/ (model + tokenizer + chat template + generation config), run.log, progress.json,
checkpoints/ (training/checkpoint.py) and stages/NAME/ (each finished stage's policy in model/, and data it
made, e.g. verified.jsonl). Each stage starts from the previous stage's policy; its reference model is the
policy at its start.

Nothing is lost: rerunning the same command on the same directory skips the finished stages and resumes
the first unfinished one from its newest committed checkpoint, exactly (rundir.py says what may change);
SIGTERM / SIGINT stop at the next step boundary after a checkpoint (exit code 75); `fresh=True` moves an
old run aside first. One process at a time holds the directory.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml

from . import faults, reward_model
from .data import load_rows
from .errors import Interrupted, RewardFailure
from .jsonio import dumps, write_atomic
from .models import choose_dtype, compute_context, load_policy, load_tokenizer, model_context, model_rows, \
    pick_device, resolve_model, save_pretrained, set_activation_checkpointing, stop_token_ids
from .eval.preference import reward_model_accuracy
from .objective.preference import REWARD_MODEL_LOSS
from .objective.presets import PRESETS, get_preset
from .recipe import Recipe, dump_recipe, load_recipe, recipe_data
from .preflight import check_template, explain_stage
from .run_hooks import CurveHook, EvalHooks
from .stage_data import IN_MEMORY, StageData, StageRows, reads_row_demos
from .stage_resources import StageResources
from .rundir import BadRows, Checkpointer, RunLock, StageProgress, StopRequest, changes, move_aside, refuse_changes, stage_config
from .training import checkpoint, lora
from .training.loop import new_state, run_stage
from .training.metrics import JsonlSink, NullSink, Progress, Sinks, TensorBoardSink
from .rollout.vllm_engine import check_engines
from .training.world import SINGLE, check_distributed, gathered_at_curve_points, init_world, is_sharded, \
    rank_device, shard, unshard

log = logging.getLogger("posttrain")

VERIFIED_FILE = "verified.jsonl"  # what a rejection-sampling stage writes for later stages (data.from_stage)


def train(recipe: str | Path | dict | Recipe, *, out: str | Path | None = None, max_steps: int | None = None,
          data: Any = None, rewards: Sequence[Callable] | dict[str, Sequence[Callable]] | None = None,
          overrides: list[str] | dict[str, Any] | None = None, progress: bool | None = None,
          save_every: int | None = None, fresh: bool = False, allow_change: Sequence[str] = ()) -> dict:
    """Run a recipe and return its summary (also written to OUT/summary.json).

    An existing OUT resumes (finished stages skipped, the running one from its newest checkpoint); a
    finished run returns its summary without training. `fresh` moves an old run aside and starts over;
    `allow_change` names recipe fields (patterns) that may differ from the run being resumed;
    `save_every` overrides `checkpoint.every`.

    data: rows for every stage (list of dicts, `datasets.Dataset`, or a path), or {stage_name: rows}.
    rewards: reward callables with the TRL signature for every RL stage, or {stage_name: [callables]};
    they replace the recipe's `rewards` for those stages.
    overrides: dotted keys, e.g. {"stages.0.steps": 5} or ["stages.0.clip.eps_high=0.28"].
    """
    raw, origin = recipe_data(recipe)
    _search_beside(origin)
    data_map = _per_stage(data, raw)
    reward_map = _per_stage(rewards, raw)
    for i, st in enumerate(raw.get("stages", [])):
        key = st.get("name") or st.get("method")
        if key in data_map and not (st.get("data") or {}).get("from_stage"):
            st.setdefault("data", {})["path"] = IN_MEMORY if not isinstance(data_map[key], (str, Path)) \
                else str(data_map[key])
            st["data"].pop("task", None)
        preset = PRESETS.get(st.get("method"))
        if key in reward_map and (preset is None or preset.needs_rewards):  # SFT stages take no rewards
            st["rewards"] = [{"fn": f"<callable:{j}>", "name": getattr(f, "__name__", f"reward_{j}")}
                             for j, f in enumerate(reward_map[key])]
    if save_every is not None:
        raw.setdefault("checkpoint", {})["every"] = save_every
    cfg = load_recipe(raw, overrides)
    return Run(cfg, out=out, max_steps=max_steps, data=data_map, rewards=reward_map, progress=progress,
               fresh=fresh, allow_change=tuple(allow_change)).execute()


def _search_beside(origin: str) -> None:
    """Reward modules (`module:function`) are found beside the recipe file too (after the import path)."""
    if origin.startswith("<") or origin.startswith("builtin:"):
        return
    folder = str(Path(origin).resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)


def _per_stage(value, raw: dict) -> dict:
    if value is None:
        return {}
    names = [s.get("name") or s.get("method") for s in raw.get("stages", [])]
    if isinstance(value, dict) and set(value) <= set(names) and value:
        return dict(value)
    return {n: value for n in names}


class Run(StageRows, StageResources):
    def __init__(self, cfg: Recipe, *, out=None, max_steps=None, data=None, rewards=None, progress=None,
                 fresh: bool = False, allow_change: tuple[str, ...] = ()):
        self.cfg = cfg
        self.out = Path(out) if out else Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
        self.max_steps = max_steps
        self.data = data or {}
        self.rewards = rewards or {}
        self.progress = progress
        self.fresh, self.allow = fresh, allow_change
        self.stop = StopRequest()
        self.resume: tuple[checkpoint.Found, dict] | None = None  # (checkpoint, its state.json) of the running stage
        self.vocab_rows: int | None = None  # the model's embedding rows: a row holding a later id is a bad row
        self._reward_models: dict = {}  # {fn: model} rewards, loaded once per run and path
        self._checking = False  # True while rewards are checked before step 0 (reward models not made yet are fine)
        self.world = SINGLE  # torchrun's ranks (world.py): rank 0 alone writes the run directory

    def execute(self) -> dict:
        if self.progress is False:  # quiet: transformers' per-file load and save bars too
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        device = pick_device(self.cfg.device)
        check_engines(self.cfg, device)
        self.world = init_world(device, self.cfg.distributed.timeout_s, self.cfg.distributed.strategy)
        self.device = rank_device(device, self.world)
        if self.world.size > 1:
            check_distributed(self.cfg)
        if not self.world.is_main:  # the other ranks read the run directory once rank 0 has locked and set it up
            with self.stop:
                self.world.barrier()
                return self._execute()
        created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            return self._locked()
        except BaseException:
            if created and {p.name for p in self.out.iterdir()} <= {".lock", "run.log", "config.yaml", "progress.json"}:
                shutil.rmtree(self.out, ignore_errors=True)  # a run that failed before it made anything leaves nothing
            raise

    def _locked(self) -> dict:
        with RunLock(self.out), self.stop:
            if self.fresh:
                move_aside(self.out)
            handler = logging.FileHandler(self.out / "run.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            try:
                self.world.barrier()
                return self._execute()
            finally:
                log.removeHandler(handler)
                handler.close()

    def _find_checkpoint(self, progress: StageProgress) -> None:
        """The newest committed checkpoint of the first unfinished stage, checked against the recipe."""
        i = len(progress.done)
        if i >= len(self.cfg.stages):
            return
        stage = self.cfg.stages[i]
        found, skipped = checkpoint.latest(self.out / "checkpoints", i, stage.name)
        for s in skipped:
            log.warning("skipping checkpoint %s", s)
        if found is None:
            return
        body = checkpoint.read_state(found.path)
        refuse_changes(changes(yaml.safe_load(body["config"]), yaml.safe_load(stage_config(stage)), f"stages.{i}"),
                       self.allow, f"{self.out}: stage {stage.name!r}, resumed from {found.path.name},")
        self.resume = (found, body)

    def _keep_record(self, progress: StageProgress):
        """Which records of an earlier attempt's metrics.jsonl / curve.jsonl stay: the finished stages', and the
        resumed stage's up to its checkpoint (the steps after it run again)."""
        found = self.resume[0] if self.resume else None
        return lambda r: r.get("stage") in progress.done or (
            found is not None and r.get("stage") == found.stage and int(r.get("step", 0)) <= found.step)

    def _execute(self) -> dict:
        with compute_context(self.cfg.dtype, self.device):
            return self._run_all()

    def _run_all(self) -> dict:
        cfg = self.cfg
        main = self.world.is_main
        progress = StageProgress(self.out, cfg, self.max_steps, self.allow, write=main)
        if progress.finished:
            log.info("%s holds this run, finished already: nothing to do (its model is in %s; --fresh starts over)",
                     self.out, self.out / "final")
            return json.loads((self.out / "summary.json").read_text())
        if progress.record.pop("finished", None) and main:  # more stages than the run that finished: stale summary
            (self.out / "summary.json").unlink(missing_ok=True)
        self._find_checkpoint(progress)
        if main:
            write_atomic(self.out / "config.yaml", dump_recipe(cfg))
        torch.manual_seed(cfg.seed)
        device = self.device
        # Everything that can be checked without the model is checked before it loads; every row of every
        # stage still to run is checked before step 0 (lengths need the tokenizer and the model's context).
        self.bad_rows = BadRows(self.out, write=main)
        stage_data = [StageData(None, None, None, None) if s.name in progress.done else self._load_stage_data(s)
                      for s in cfg.stages]
        for stage, sd in zip(cfg.stages, stage_data):
            self._check_rewards(stage, sd)
        last_policy = progress.last_model()
        resume_from = str(last_policy or cfg.model)
        self._policy_source = resume_from  # where a rollout engine of its own (vLLM) loads the architecture from
        # A finished stage saved the tokenizer (and template) it trained with; the first stage may pair others.
        tok_from, template = (resume_from, None) if last_policy else (cfg.tokenizer or cfg.model, cfg.chat_template)
        try:
            tok = load_tokenizer(resolve_model(tok_from, required_file="tokenizer_config.json"), template)
            context = model_context(resume_from)
            self.vocab_rows = len(tok) if cfg.resize_embeddings else model_rows(resume_from)
        except Exception:
            self.bad_rows.verdict()  # the bad rows found so far first, when the model cannot even be found
            raise
        for stage, sd in zip(cfg.stages, stage_data):
            check_template(stage, sd, tok, tok_from)
            self._check_lengths(stage, sd, tok, context)
        self.bad_rows.verdict()
        model, tok = load_policy(resume_from, dtype=choose_dtype(cfg.dtype, device), device=device,
                                 resize_embeddings=cfg.resize_embeddings, tokenizer=None if last_policy else
                                 cfg.tokenizer, chat_template=template)
        stop_ids = stop_token_ids(tok, model)
        pad_id = tok.pad_token_id
        summary: dict[str, Any] = {"model": cfg.model, "out": str(self.out), "device": device,
                                   "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                                   "stages": {}}
        log.info("model %s on %s (%s)", cfg.model, device, summary["dtype"])
        if progress.done:
            log.info("resuming %s: stages %s finished, skipped", self.out, ", ".join(progress.done))
        keep = self._keep_record(progress)
        done_steps = sum(r["steps"] for r in progress.done.values()) + (self.resume[0].step if self.resume else 0)
        if main:
            self.samples = JsonlSink(self.out / "samples.jsonl", keep=keep)
            sinks = Sinks(JsonlSink(self.out / "metrics.jsonl", keep=keep),
                          TensorBoardSink(self.out / "tb", purge_step=done_steps + 1 if done_steps else None))
        else:
            self.samples, sinks = NullSink(), Sinks()
        t_run = time.perf_counter()
        hooks = EvalHooks(cfg, tok, stop_ids, pad_id, device, active=main)  # rank 0 evaluates, the others go on
        curve = CurveHook(hooks, self.out / "curve.jsonl", keep=keep)
        try:
            if hooks.active:
                if "eval_before" not in progress.record:
                    progress.save_eval_before(hooks.evaluate(model))
                summary["eval"] = {"before": progress.record["eval_before"]}
            global_step = 0
            for i, (stage, sd) in enumerate(zip(cfg.stages, stage_data)):
                if stage.name in progress.done:
                    result = progress.done[stage.name]
                    summary["stages"][stage.name] = result
                    global_step += result["steps"]
                    curve.end_stage(result)
                    continue
                if self.stop.requested:  # a signal during evaluation or between stages: nothing new to save
                    raise Interrupted(f"stopped by {self.stop.name()} before stage {stage.name!r}; the finished "
                                      "stages are saved: rerun the same command to continue", self.stop.signum)
                resumed = self.resume is not None and self.resume[0].stage_index == i
                t0 = time.perf_counter() - (self.resume[1]["stage_wall_s"] if resumed else 0.0)
                if curve.every and i == 0 and not resumed:
                    curve.point(model, stage.name, 0, 0, 0, 0.0)  # the base
                result, trained = self._run_stage(i, stage, sd, model, tok, stop_ids, pad_id, device, sinks,
                                                  global_step, on_step=curve.on_step(stage.name, t0), t0=t0)
                global_step += result["steps"]
                result["wall_s"] = round(time.perf_counter() - t0, 3)
                if _trains_reward_model(stage):  # the policy goes on unchanged to the next stage
                    curve.end_stage(result)
                    stats = reward_model.score_statistics(trained, sd.encoded, pad_id, device=device)
                    trained.config.update(stats)  # saved with it: the unit an ensemble standardises it by
                    result.update(stats)
                    if sd.heldout is not None:
                        kinds = [r.get("kind") for r in sd.heldout_rows.rows]
                        result["eval"] = reward_model_accuracy(
                            trained, sd.heldout, pad_id, device=device,
                            kinds=kinds if any(k is not None for k in kinds) else None)
                        log.info("stage %s: held-out pairwise accuracy %.3f on %d pairs%s", stage.name,
                                 result["eval"]["pref_accuracy"], result["eval"]["n"], "".join(
                                     f"; {k} {v['pref_accuracy']:.3f} ({v['n']})"
                                     for k, v in result["eval"].get("by_kind", {}).items()))
                else:
                    model = trained
                    curve.end_stage(result, model)
                    if hooks.active:
                        result["eval"] = hooks.evaluate(model)
                summary["stages"][stage.name] = result
                progress.finish_stage(stage.name, result, trained, tok, stop_ids)
                self.world.barrier()  # what the stage wrote (its model, verified.jsonl) is there for the next one
            if hooks.active:
                summary["eval"]["after"] = summary["stages"][cfg.stages[-1].name]["eval"]
            faults.hit("final")
            if main:
                self._write_final(model, tok, stop_ids)
        finally:
            sinks.close()
            curve.close()
            self.samples.close()
        summary["wall_s"] = round(time.perf_counter() - t_run, 3)
        if main:
            write_atomic(self.out / "summary.json", dumps(summary))
        progress.finish_run()
        self.world.barrier()  # the other ranks return once the run directory is complete
        log.info("run finished in %.1fs: %s", summary["wall_s"], self.out)
        return summary

    def _write_final(self, model, tok, stop_ids) -> None:
        """OUT/final: the run's last product (the policy, or the reward model of a last reward-model stage)."""
        last_stage = self.cfg.stages[-1]
        if _trains_reward_model(last_stage):
            shutil.copytree(self.out / "stages" / last_stage.name / "model", self.out / "final", dirs_exist_ok=True)
        else:
            save_pretrained(model, tok, self.out / "final", stop_ids=stop_ids)
        if last_stage.lora is not None:  # the last stage's adapter beside the merged weights (peft loads it)
            shutil.copytree(self.out / "stages" / last_stage.name / "adapter", self.out / "final" / "adapter",
                            dirs_exist_ok=True)

    def _resolve_late(self, stage, sd: "StageData", tok, context) -> None:
        """Data made by an earlier stage of this run (`from_stage`) exists only now: load and check it."""
        for attr, section, kind in (("rows", stage.data, get_preset(stage.method).data), ("demos", stage.demos,
                                                                                          "demonstrations")):
            if section is not None and section.from_stage:
                path = self.out / "stages" / section.from_stage / VERIFIED_FILE
                rowset = load_rows(str(path))
                rowset = rowset.head(section.limit) if section.limit else rowset
                rowset, fmt = self._check_rows(stage, section, rowset, section.format, kind)
                setattr(sd, attr, rowset)
                setattr(sd, "fmt" if attr == "rows" else "demos_fmt", fmt)
                preset = get_preset(stage.method)
                if preset.needs_demonstrations or reads_row_demos(preset, stage):
                    self._check_paired(stage, sd)
                self._check_lengths(stage, sd, tok, context)

    def _run_stage(self, i, stage, sd: "StageData", model, tok, stop_ids, pad_id, device, sinks,
                   global_step, on_step=None, t0: float = 0.0) -> dict:
        from .training.experience import Experience
        from .training.sources import Demonstrations, PackedDemonstrations, PairedDemos

        preset = get_preset(stage.method)
        self._resolve_late(stage, sd, tok, getattr(model.config, "max_position_embeddings", None))
        self.bad_rows.verdict()
        seed = self.cfg.seed + 7919 * i
        critic = None
        if stage.advantage.kind == "gae":  # PPO's value model: a full copy, from the policy before any adapter
            from .training.critic import Critic

            critic = Critic.for_stage(stage, model, pad_id=pad_id, device=device)
        if stage.lora is not None:
            model = lora.attach(model, stage.lora, device)
        if _trains_reward_model(stage):  # the policy's backbone under a fresh scalar head
            model = reward_model.from_policy(model, pad_id)
        for m in (model, getattr(critic, "model", None)):  # every replica starts from rank 0's weights
            if m is not None:
                self.world.broadcast_(m)
        ref_model = None
        if stage.kl.beta or preset.needs_reference:  # the policy at this stage's start (LoRA: adapters disabled)
            ref_model = lora.reference(model) if stage.lora is not None else \
                copy.deepcopy(model).eval().requires_grad_(False)
        if stage.batch.activation_checkpointing:  # (after the reference was copied: it never trains)
            set_activation_checkpointing(model, True)
        if self.world.sharded:  # FSDP2, after the reference and the critic were copied from the whole policy
            shard(model, self.world)
            if ref_model is not None and self.cfg.distributed.reference == "shard":
                shard(ref_model, self.world)
            on_step = gathered_at_curve_points(on_step, self.cfg.eval, model)
        n_steps = min(stage.steps, self.max_steps) if self.max_steps else stage.steps
        explain_stage(stage, preset, sd, n_steps)
        progress = Progress(n_steps, stage.name, stage.log_every, tty=self.progress) if self.world.is_main \
            else NullSink()
        sink = _StageSink(Sinks(sinks, progress), global_step)
        result: dict[str, Any] = {"name": stage.name, "method": stage.method, "format": sd.fmt,
                                  "rows": len(sd.rows.rows)}
        kw: dict[str, Any] = dict(pad_id=pad_id, stop_ids=stop_ids, device=device, seed=seed, ref_model=ref_model,
                                  total_steps=n_steps, world=self.world)
        if stage.distill.coef and not preset.self_teacher:
            kw["teacher"] = self._teacher(tok, device, next(model.parameters()).dtype)
        if critic is not None:
            kw["critic"] = critic
        if stage.rollout.engine == "vllm" and preset.data == "prompts":
            kw["engine"] = self._vllm(stage, tok, model)
        if sd.encoded is not None and preset.data in ("preferences", "unpaired"):
            kw["pairs"] = Demonstrations(sd.encoded, seed + 1, stage.data.shuffle)
        elif sd.encoded is not None and stage.batch.pack == "rows":
            kw["demos"] = PackedDemonstrations(sd.encoded, seed + 1, stage.data.shuffle, stage.data.max_len,
                                               group=stage.batch.size)
        elif sd.encoded is not None:
            kw["demos"] = Demonstrations(sd.encoded, seed + 1, stage.data.shuffle)
        if preset.needs_demonstrations:
            kw["paired"] = PairedDemos(tok, sd.demos, sd.demos_fmt)
        resume = self.resume if self.resume is not None and self.resume[0].stage_index == i else None
        kw["on_samples"] = lambda step, recs: [self.samples.write({"stage": stage.name, "step": step, **r})
                                               for r in recs]
        if "verified" in preset.sources and self.world.is_main:
            kw["on_data"] = self._data_writer(stage, resume[1]["experience"]["pool"]["round"] if resume else 0)
        saver = Checkpointer(self, i, stage, sink, t0, start=resume[0].step if resume else 0)
        try:
            if preset.data in ("demonstrations", "preferences", "unpaired"):
                experience = Experience(stage, tok, **kw)
                state = self._start(model, stage, seed, experience, resume, sink)
                last = run_stage(state, stage, device=device, sink=sink, max_steps=self.max_steps, on_step=on_step,
                                 on_boundary=saver)
            else:
                with self._scorer(stage) as scorer:
                    experience = Experience(stage, tok, rows=sd.rows.rows, scorer=scorer, **kw)
                    state = self._start(model, stage, seed, experience, resume, sink)
                    saver.mark(state)
                    try:
                        last = run_stage(state, stage, device=device, sink=sink, max_steps=self.max_steps,
                                         on_step=on_step, on_boundary=saver)
                    except RewardFailure:
                        saver.save_before_step(state)
                        raise
                    result["reward_errors"] = sink.reward_errors
        finally:
            progress.close()
        result.update(steps=state.step, samples=state.samples, tokens=state.tokens)
        result["final"] = {k: v for k, v in last.items() if k not in ("stage", "step", "global_step")}
        if is_sharded(model):  # the next stage, the saved model and evaluation take it whole
            model = unshard(model)
        set_activation_checkpointing(model, False)
        if stage.lora is not None:  # the adapter is kept beside the stage; the weights continue merged
            model = lora.finish(model, self.out / "stages" / stage.name / "adapter" if self.world.is_main else None)
        return result, model

    def _start(self, model, stage, seed: int, experience, resume, sink):
        """A stage's TrainState: new, or restored from its checkpoint (after the reference model was copied from
        the policy at the stage's start)."""
        state = new_state(model, stage, seed, experience)
        if resume is not None:
            found, body = resume
            checkpoint.load(found.path, state)
            sink.reward_errors = body["reward_errors"]
            log.info("stage %s: resuming at step %d from %s", stage.name, state.step, found.path)
        return state

    def _data_writer(self, stage, rounds_kept: int = 0):
        """Where a stage's generated data goes: OUT/stages/NAME/verified.jsonl (every round appended). A resumed
        stage keeps the rounds its checkpoint had started (`rounds_kept`); later ones are made again."""
        path = self.out / "stages" / stage.name / VERIFIED_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        old = path.read_text(encoding="utf-8").splitlines() if rounds_kept and path.exists() else []
        write_atomic(path, "".join(line + "\n" for line in old if _round_of(line) <= rounds_kept))

        def write(round_: int, rows: list[dict]) -> None:
            with open(path, "a", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps({**r, "round": round_}, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
            log.info("stage %s round %d: %d verified samples -> %s", stage.name, round_, len(rows), path)

        return write


def _round_of(line: str) -> float:
    try:
        return json.loads(line)["round"]
    except (json.JSONDecodeError, KeyError, TypeError):  # a torn line of a killed run
        return math.inf


def _trains_reward_model(stage) -> bool:
    return get_preset(stage.method).advantage == REWARD_MODEL_LOSS


class _StageSink:
    """Adds the run-wide `global_step` and sums the reward errors of a stage."""

    def __init__(self, inner, offset: int):
        self.inner, self.offset, self.reward_errors = inner, offset, 0

    def write(self, record: dict) -> None:
        record["global_step"] = self.offset + record["step"]
        self.reward_errors += int(record.get("reward_errors", 0))
        self.inner.write(record)
