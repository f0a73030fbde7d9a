"""Resolution: the one place where a preset's defaults meet the user's overrides, and where a combination
that cannot run is refused (RecipeError) before any model is loaded."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ..objective.advantages import GROUP_ADVANTAGES
from ..objective.preference import NEEDS_REFERENCE, PAIRED_LOSSES, PREFERENCE_LOSSES, REWARD_MODEL_LOSS
from ..objective.presets import STREAM_NAMES, Preset, get_preset
from .schema import Recipe, RecipeError, StageConfig, StreamConfig



def resolve_stage(stage: StageConfig) -> StageConfig:
    """Fill every None component field from the stage's preset; check the combination can run."""
    p: Preset = get_preset(stage.method)
    s = stage.model_copy(deep=True)
    s.name = s.name or s.method
    _resolve_streams(s, p)
    if s.normaliser is None:
        s.normaliser = p.normaliser
    if s.shaping_gamma is None:
        s.shaping_gamma = p.shaping_gamma
    if s.success_threshold is None:
        s.success_threshold = p.success_threshold
    _fill(s.sources, demos_per_group=p.demos_per_group, demo_share=p.demo_share, buffer_size=p.buffer_size or 1,
          prefixed_rows=p.prefixed_rows, prefix_start=p.prefix_start, prefix_end=p.prefix_end, rounds=p.rounds or 1)
    _fill(s.mix, mu_peak=p.mu_peak, mu_valley=p.mu_valley, mu_warmup=p.mu_warmup, mu_decay=p.mu_decay,
          hpt_gamma=p.hpt_gamma, sft_coef=p.sft_coef, soft_table=[list(r) for r in p.soft_table], w_sft=p.w_sft,
          w_rl=p.w_rl)
    _fill(s.clip, eps_low=p.eps_low, eps_high=p.eps_high, eps_max=p.eps_max, tv_delta=p.tv_delta)
    _fill(s.kl, beta=p.kl_beta, estimator=p.kl_estimator, placement=p.kl_placement)
    _fill(s.entropy, coef=p.entropy_coef)
    _fill(s.advantage, kind=p.advantage, std_eps=p.std_eps)
    _fill(s.preference, beta=p.pref_beta, gamma=p.pref_gamma, lam=p.pref_lam)
    _fill(s.distill, coef=p.distill_coef)
    _fill(s.dynamic_sampling, enabled=p.dynamic_sampling)
    _fill(s.overlong, mask_truncated=p.mask_truncated, soft_penalty=p.overlong_penalty,
          cache=max(1, s.rollout.max_new_tokens // 5))
    if s.rollout.engine == "vllm" and s.rollout.correction is None:  # vLLM's numbers are not the trainer's
        s.rollout.correction = "token"
    _check_combination(s, p)
    return s


def _resolve_streams(s: StageConfig, p: Preset) -> None:
    """Every stream of the preset gets all four components: the recipe's `streams.NAME`, then (for the main
    stream) the stage's `weight` / `clip_level` / `aggregation`, then the preset. Other streams are refused."""
    main = p.primary()
    for name in STREAM_NAMES:
        given = getattr(s.streams, name)
        if given is not None and name not in p.streams:
            raise RecipeError(f"stage {s.name!r}: method {s.method!r} has no {name!r} stream (its streams: "
                              f"{', '.join(p.streams)}); remove streams.{name}")
    for name, spec in p.streams.items():
        cfg = getattr(s.streams, name) or StreamConfig()
        if name == main:
            cfg.weight = cfg.weight or s.weight
            cfg.clip_level = cfg.clip_level or s.clip_level
            cfg.aggregation = cfg.aggregation or s.aggregation
        _fill(cfg, weight=spec.weight, clip_level=spec.clip, aggregation=spec.aggregation, advantage=spec.advantage)
        setattr(s.streams, name, cfg)
    m = getattr(s.streams, main)
    s.weight, s.clip_level, s.aggregation = m.weight, m.clip_level, m.aggregation


def stage_streams(s: StageConfig) -> dict[str, StreamConfig]:
    """The resolved streams of a stage, by name."""
    return {n: getattr(s.streams, n) for n in STREAM_NAMES if getattr(s.streams, n) is not None}


def _fill(section: BaseModel, **defaults: Any) -> None:
    for key, value in defaults.items():
        if getattr(section, key) is None:
            setattr(section, key, value)


def _check_combination(s: StageConfig, p: Preset) -> None:
    where = f"stage {s.name!r}"
    if s.demos is not None and not ({"demonstrations", "paired", "prefixed", "buffer"} & set(p.sources)) \
            or s.demos is not None and p.data == "demonstrations":
        raise RecipeError(f"{where}: method {s.method!r} reads no separate demonstrations; remove `demos` "
                          "(SFT methods read their demonstrations from `data`)")
    preference = s.advantage.kind in PREFERENCE_LOSSES
    rm = s.advantage.kind == REWARD_MODEL_LOSS
    if rm != (p.advantage == REWARD_MODEL_LOSS):
        raise RecipeError(f"{where}: only method reward_model trains a scalar head (advantage bradley_terry), and "
                          "its advantage cannot be changed; remove advantage.kind")
    if s.heldout is not None and not rm:
        raise RecipeError(f"{where}: `heldout` pairs are scored after a reward_model stage; method {s.method!r} "
                          "reads none (evaluate a policy with `eval:`)")
    if rm and s.lora is not None:
        raise RecipeError(f"{where}: a reward_model stage trains the whole model and its new head; remove `lora`")
    if s.critic.shared and (s.critic.model or s.lora is not None):
        raise RecipeError(f"{where}: critic.shared puts the value head on the policy's own backbone, trained in full; "
                          "it reads no critic.model and cannot train adapters only (remove critic.model / lora, or "
                          "critic.shared)")
    if "coef" in s.critic.model_fields_set and not s.critic.shared:
        raise RecipeError(f"{where}: critic.coef weighs the value loss of a shared value head (critic.shared: true); "
                          "a separate critic has its own optimizer")
    if s.critic.model_fields_set and s.advantage.kind != "gae":
        raise RecipeError(f"{where}: `critic` configures the value model of advantage gae (method ppo); method "
                          f"{s.method!r} with advantage {s.advantage.kind!r} has none")
    online = p.data == "prompts" and {p.advantage, s.advantage.kind} <= set(PAIRED_LOSSES)  # online DPO
    if s.rollout.correction and (online or p.data != "prompts"):
        raise RecipeError(f"{where}: rollout.correction reweights the advantages of sampled tokens; method "
                          f"{s.method!r} has none to reweight (remove rollout.correction)")
    if s.preference.refresh_every and not (online and s.advantage.kind in NEEDS_REFERENCE):
        raise RecipeError(f"{where}: preference.refresh_every renews the reference of online DPO / IPO (method "
                          "online_dpo); remove it")
    if s.preference.refresh_every and s.lora is not None:
        raise RecipeError(f"{where}: with LoRA the reference is the model with its adapters off, which cannot be "
                          "refreshed; remove preference.refresh_every or lora")
    if (preference or rm) != (p.data in ("preferences", "unpaired")) and not online:
        raise RecipeError(f"{where}: advantage {s.advantage.kind!r} and method {s.method!r} do not go together: a "
                          "preference advantage (dpo, ipo, simpo, orpo, kto) needs a preference method and the reverse")
    if preference or rm:  # the preference losses set A, w = 1, no mask and their own mean (objective/preference.py)
        if s.kl.beta or s.entropy.coef:
            raise RecipeError(f"{where}: a preference loss has no KL or entropy term of its own (its beta already "
                              "ties the policy to the reference); remove kl.beta / entropy.coef, or tune "
                              "preference.beta")
        want = "sum" if s.advantage.kind == "kto" else "pair"
        for name, st in stage_streams(s).items():
            if (st.weight, st.clip_level, st.aggregation) != ("one", "none", want):
                raise RecipeError(f"{where}: a preference loss fixes its stream's components (weight one, clip_level "
                                  f"none, aggregation {want}); remove the overrides of streams.{name}")
    if s.batch.pack and not (p.sources == ("demonstrations",) and not s.distill.coef and s.ppo_epochs * s.minibatches == 1
                             and all(st.aggregation == "tok" for st in stage_streams(s).values())):
        raise RecipeError(f"{where}: batch.pack packs demonstrations for a token-mean loss on them alone (methods sft "
                          f"and dft, one update per batch); method {s.method!r} here cannot use it: remove batch.pack")
    if p.data == "demonstrations" and s.distill.coef and s.distill.coef > 1:
        raise RecipeError(f"{where}: on demonstrations distill.coef is the teacher's share of the target, in [0, 1]; "
                          f"got {s.distill.coef}")
    if p.data in ("demonstrations", "preferences", "unpaired"):
        if s.rewards:
            raise RecipeError(f"{where}: method {s.method!r} trains on {p.data} and uses no rewards; "
                              "remove `rewards` or choose an RL method (see `posttrain methods`)")
        return
    if not s.rewards and not s.distill.coef:
        raise RecipeError(f"{where}: method {s.method!r} samples rollouts and needs `rewards` "
                          "(e.g. rewards: [{fn: math}] or a task's reward)")
    if not s.rewards and s.advantage.kind != "zero":
        raise RecipeError(f"{where}: advantage {s.advantage.kind!r} reads rewards; give `rewards`, or use "
                          "advantage.kind: zero (the teacher term alone)")
    if s.kl.placement == "loss" and s.kl.estimator == "k1" and s.kl.beta:
        raise RecipeError(f"{where}: kl.estimator k1 in the loss has zero expected gradient (E_p[grad log p] = 0); "
                          "use k2 or k3 in the loss, or kl.placement: reward for k1")
    if s.kl.placement == "reward" and s.kl.estimator != "k1" and s.kl.beta:
        raise RecipeError(f"{where}: a KL penalty in the reward uses the k1 estimator; set kl.estimator: k1")
    group_based = s.advantage.kind in GROUP_ADVANTAGES
    if group_based and s.rollout.group_size < 2:
        raise RecipeError(f"{where}: advantage {s.advantage.kind!r} compares samples within a group; "
                          f"rollout.group_size must be >= 2 (got {s.rollout.group_size})")
    in_group = s.sources.demos_per_group + s.sources.prefixed_rows
    if in_group >= s.rollout.group_size and "verified" not in p.sources:
        raise RecipeError(f"{where}: sources.demos_per_group + sources.prefixed_rows ({in_group}) must leave at "
                          f"least one free rollout in each group of rollout.group_size={s.rollout.group_size}")
    if p.mixer == "hpt_soft":
        table = s.mix.soft_table
        if not table or any(a[0] > b[0] for a, b in zip(table, table[1:])) or table[-1][0] < 1:
            raise RecipeError(f"{where}: mix.soft_table rows are (max_accuracy, rl_weight, sft_weight) sorted by "
                              "max_accuracy, the last covering accuracy 1.0")
    if s.dynamic_sampling.enabled and not group_based:
        raise RecipeError(f"{where}: dynamic_sampling keeps groups of mixed outcome; it needs a group advantage")
    updates = s.ppo_epochs * s.minibatches
    if updates > 1 and s.streams.rollout is not None and s.streams.rollout.weight == "one":
        raise RecipeError(f"{where}: weight 'one' assumes the data come from the current policy, which stops being "
                          f"true after the first of {updates} updates per rollout batch; use a ratio-weighted "
                          "method (grpo, dr_grpo, dapo, ...) or ppo_epochs: 1, minibatches: 1")
    if s.overlong.soft_penalty and s.overlong.cache > s.rollout.max_new_tokens:
        raise RecipeError(f"{where}: overlong.cache ({s.overlong.cache}) must be <= rollout.max_new_tokens "
                          f"({s.rollout.max_new_tokens}): the penalty ramps over the last `cache` tokens")
    for name, st in stage_streams(s).items():
        if (st.weight, st.clip_level) in (("ratio", "sequence"), ("seq_ratio", "token")):
            raise RecipeError(f"{where}: stream {name!r}: weight {st.weight!r} with clip_level {st.clip_level!r} "
                              "mixes token and sequence ratios; use weight ratio + clip_level token, or seq_ratio "
                              "+ sequence")
    if s.minibatches > s.batch.size * s.rollout.group_size:
        raise RecipeError(f"{where}: minibatches ({s.minibatches}) exceeds the sequences per rollout batch")
    if s.clip.eps_high is not None and s.clip.eps_low is not None and s.clip_level != "none" \
            and s.clip.eps_low + s.clip.eps_high <= 0:
        raise RecipeError(f"{where}: clip eps_low + eps_high must be > 0")


def resolve(recipe: Recipe) -> Recipe:
    r = recipe.model_copy(deep=True)
    r.stages = [resolve_stage(s) for s in r.stages]
    taught = [s.name for s in r.stages if s.distill.coef and not get_preset(s.method).self_teacher]
    if taught and not r.teacher:
        raise RecipeError(f"stage {taught[0]!r} distils from a teacher: set `teacher:` (builtin:tiny-teacher, a local "
                          "model directory or a hub id with the same tokenizer as the model)")
    if r.distributed.strategy == "fsdp":  # AdamW's per-tensor loop, sharded or not: the fused kernel rounds a shard's
        for s in r.stages:                 # tail elements apart from the whole tensor's, and a sharded run's
            if s.optim.fused is None:      # checkpoint resumes on any number of ranks
                s.optim.fused = False
    names = [s.name for s in r.stages]
    if len(set(names)) != len(names):
        raise RecipeError(f"stage names must be unique, got {names}; set `name:` on each stage")
    for i, s in enumerate(r.stages):  # {fn: model, path: STAGE}: a reward_model stage that runs before it
        for path in (p for rw in s.rewards for p in rw.model_paths()):
            if path in names and (path not in names[:i] or
                                  get_preset(r.stages[names.index(path)].method).advantage != REWARD_MODEL_LOSS):
                raise RecipeError(f"stage {s.name!r}: reward model {path!r} names a stage of this recipe, which "
                                  "must be a reward_model stage that runs before it")
    for i, s in enumerate(r.stages):
        for d in (s.data, s.demos):
            if d is not None and d.from_stage is not None and d.from_stage not in names[:i]:
                raise RecipeError(f"stage {s.name!r}: from_stage {d.from_stage!r} is not an earlier stage "
                                  f"(earlier: {', '.join(names[:i]) or 'none'})")
            if d is not None and d.from_stage is not None and \
                    "verified" not in get_preset(r.stages[names.index(d.from_stage)].method).sources:
                raise RecipeError(f"stage {s.name!r}: stage {d.from_stage!r} makes no data (only rft stages write "
                                  "their verified samples)")
    return r
