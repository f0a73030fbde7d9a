"""Typed, strict recipes: YAML -> validated objects, dotted overrides, preset defaults resolved in one place.

A recipe names a model and one or more stages; each stage names a method (a preset) and may override
its components (`clip.eps_high: 0.28`). Every config class forbids unknown keys: a typo is an error
naming the key path and the closest valid key, raised before any model is loaded.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .logprobs import CHUNK_MB
from .objective.advantages import ADVANTAGES, GROUP_ADVANTAGES
from .objective.preference import NEEDS_REFERENCE, PAIRED_LOSSES, PREFERENCE_LOSSES, REWARD_MODEL_LOSS
from .objective.components import AGGREGATIONS, KL_ESTIMATORS, WEIGHTS
from .objective.presets import CLIPS, PRESETS, STREAM_ADVANTAGES, STREAM_NAMES, Preset, get_preset

DATA_FORMATS = ("auto", "text", "messages", "prompt_completion", "prompt_answer", "prompt_only")


class RecipeError(ValueError):
    """A recipe that cannot run. The message names the key path and what to do."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    """Where a stage's rows come from."""

    path: Optional[str] = None  # JSONL / JSON / Parquet file, dataset directory, or hub id
    task: Optional[str] = None  # a built-in task name (`posttrain tasks`), instead of `path`
    from_stage: Optional[str] = None  # the data an earlier stage of this run made (RFT's verified samples)
    split: str = "train"  # the split of a task or dataset dictionary
    format: Literal[DATA_FORMATS] = "auto"  # type: ignore[valid-type]
    max_len: int = Field(1024, gt=0)  # longest tokenised demonstration / prompt; a longer row is a bad row
    # Bad rows (unreadable, missing or mistyped fields, over-long, ...) are listed in OUT/bad_rows.jsonl; up to
    # this share of the rows they are dropped with a warning, beyond it the run stops before step 0.
    max_bad_fraction: float = Field(0.0, ge=0, le=1)  # bad rows dropped up to this share; above: stop
    limit: Optional[int] = Field(None, gt=0)  # use only the first `limit` rows
    shuffle: bool = True  # a fresh permutation each epoch
    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        given = [k for k in ("path", "task", "from_stage") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of path, task or from_stage, not {' and '.join(given)}")
        return self


class RewardConfig(Strict):
    """One reward function."""

    fn: str  # builtin name (exact, numeric, math, format, code, or a task's reward) or "module:function"
    weight: float = 1.0  # weight in the total reward
    kwargs: dict[str, Any] = Field(default_factory=dict)  # fixed keyword arguments
    name: Optional[str] = None  # its name in metrics (default: the function's)
    primary: bool = False  # `accuracy` is this reward's success rate (default: the first reward's)
    threshold: float = 1.0  # the value at which this reward counts a sample as a success
    path: Optional[str] = None  # fn: model -- the reward model (a directory or hub id) scoring each completion

    @model_validator(mode="after")
    def _model_path(self) -> "RewardConfig":
        if (self.fn == "model") != (self.path is not None):
            raise ValueError("a reward model is given as {fn: model, path: DIR} (DIR a local directory or hub id "
                             "of a sequence-classification model); `path` belongs to fn: model only")
        return self


class OptimConfig(Strict):
    """AdamW and the guard against non-finite steps."""

    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)  # None disables clipping
    # a step whose loss or gradient is NaN/inf is skipped (weights and optimizer state untouched); this many
    # such steps in a row stop the run
    max_nonfinite_steps: int = Field(3, ge=1)


class ScheduleConfig(Strict):
    """The learning-rate schedule."""

    kind: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class BatchConfig(Strict):
    """How many rows (prompts for RL) a step takes, and its micro-batches."""

    size: int = Field(8, gt=0)  # SFT: sequences per optimizer step; RL: prompts per rollout batch
    micro_size: Optional[int] = Field(None, gt=0)  # sequences per forward/backward (gradient accumulation)
    # The LM head's outputs computed at once for log-probs and entropy, so a large batch never holds its whole
    # (B, T, V) logits; null: all at once.
    logits_chunk_mb: Optional[float] = Field(CHUNK_MB, gt=0)  # MB of fp32 logits per chunk; null: all at once
    pack: bool = False  # SFT / DFT: pack each step's demonstrations into rows of data.max_len tokens (less padding)
    # Recompute each decoder layer's activations in the backward pass instead of keeping them: less memory for a
    # long batch, about one more forward pass of time (training passes only; sampling is unaffected)
    activation_checkpointing: bool = False


class RolloutConfig(Strict):
    """How the policy samples completions."""

    group_size: int = Field(8, gt=0)  # completions sampled per prompt (G)
    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    # Truncated importance weights min(q / mu, C) on the advantages, for a sampler that is not exactly the trainer
    # (another engine or precision); token or sequence level. null: none (the built-in sampler is the policy).
    correction: Optional[Literal["token", "sequence"]] = None  # truncated IS weights q / mu: token or sequence
    correction_cap: float = Field(2.0, gt=0)  # C, the truncation of the importance weights
    # Sampling noise: `batch` draws every row from one generator (what one process has always done); `row` keys
    # each row's noise by (seed, step, the row's place in the step), so samples do not depend on how rows are
    # split across ranks or batches and a run on N ranks equals the run on one; `auto`: row under torchrun.
    seeding: Literal["auto", "batch", "row"] = "auto"
    # builtin: posttrain's KV-cached sampler on the policy itself; vllm: a colocated vLLM instance (the `vllm`
    # extra, GPU only) given the policy's weights before each step, its samples reweighted by `correction`
    # (token level unless set)
    engine: Literal["builtin", "vllm"] = "builtin"
    vllm_memory: float = Field(0.3, gt=0, lt=1)  # vllm: the share of the GPU's memory vLLM may take
    vllm_max_len: Optional[int] = Field(None, gt=0)  # vllm: its context (prompt + completion); null: the model's


class ClipConfig(Strict):
    """Ratio clipping of the policy-gradient weight."""

    eps_low: Optional[float] = Field(None, ge=0, lt=1)
    eps_high: Optional[float] = Field(None, ge=0)
    eps_max: Optional[float] = Field(None, gt=0)  # CISPO truncation
    tv_delta: Optional[float] = Field(None, gt=0, le=1)  # DPPO: the bound on |p - q| of clip_level tv


class KLConfig(Strict):
    """A KL penalty to the stage's reference policy."""

    beta: Optional[float] = Field(None, ge=0)
    estimator: Optional[Literal[KL_ESTIMATORS]] = None  # type: ignore[valid-type]
    placement: Optional[Literal["loss", "reward"]] = None


class DistillConfig(Strict):
    """Distillation from the recipe's `teacher:`. On rollouts (opd): coef * (log pi_teacher - log pi) added to the
    advantage of every sampled token. On demonstrations (kd, or sft with a coef): the target of each token is
    (1 - coef) one-hot(y*) + coef * the teacher's distribution over its top_k tokens (forward KL)."""

    coef: Optional[float] = Field(None, ge=0)  # lambda; 0: no teacher term. On demonstrations (kd, sft): the share
    #                                            of the teacher's distribution in the target (1: pure KD)
    top_k: int = Field(64, gt=0)  # on demonstrations: the teacher's K most likely tokens per position are the target
    context: str = ("{prompt}\n\nA correct solution, for reference:\n{demonstration}\n\nNow answer in your own "
                    "words.")  # sdft: the teacher's question (the last user turn), with the row's demonstration


class EntropyConfig(Strict):
    """An entropy bonus."""

    coef: Optional[float] = Field(None, ge=0)


class AdvantageConfig(Strict):
    """The advantage estimator."""

    kind: Optional[Literal[ADVANTAGES]] = None  # type: ignore[valid-type]
    std_eps: Optional[float] = Field(None, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)  # gae: discount
    lam: float = Field(1.0, ge=0, le=1)  # gae: lambda of the exponentially weighted sum of TD errors
    whiten: bool = True  # gae: advantages to mean 0, std 1 over the batch's response tokens


class CriticConfig(Strict):
    """PPO's value model (advantage gae): its own copy of a backbone under a fresh scalar head, its own AdamW; or
    (`shared`) a value head on the policy's own backbone, its loss added to the policy's with weight `coef`."""

    model: Optional[str] = None  # start from this model (a directory or hub id); default: the policy at the stage's start
    shared: bool = False  # a value head on the policy's backbone (one forward pass, L = L_pg + coef L_V)
    coef: float = Field(0.1, gt=0)  # shared: the value loss's weight in the policy's loss
    lr: Optional[float] = Field(None, gt=0)  # default: the stage's optim.lr
    clip: Optional[float] = Field(0.2, gt=0)  # eps_v of the clipped value loss; null: the plain squared error
    max_grad_norm: float = Field(1.0, gt=0)


class DynamicSamplingConfig(Strict):
    """DAPO's dynamic sampling."""

    enabled: Optional[bool] = None
    max_rounds: int = Field(4, gt=0)  # extra sampling rounds allowed to refill the batch with mixed groups


class StreamConfig(Strict):
    """Overrides of one stream's components (the preset's choice when unset)."""

    weight: Optional[Literal[tuple(WEIGHTS)]] = None  # type: ignore[valid-type]
    clip_level: Optional[Literal[CLIPS]] = None  # type: ignore[valid-type]
    aggregation: Optional[Literal[AGGREGATIONS]] = None  # type: ignore[valid-type]
    advantage: Optional[Literal[STREAM_ADVANTAGES]] = None  # type: ignore[valid-type]


class StreamsConfig(Strict):
    """Components per stream (demo, rollout, prefix), over the preset's."""

    demo: Optional[StreamConfig] = None
    rollout: Optional[StreamConfig] = None
    prefix: Optional[StreamConfig] = None


class SourcesConfig(Strict):
    """How many rows each source adds per step (defaults from the preset)."""

    demos_per_group: Optional[int] = Field(None, ge=0)  # LUFFY: demonstrations inside each group of G
    demo_share: Optional[float] = Field(None, ge=0)  # CHORD / SRFT: demonstration rows per rollout row
    buffer_size: Optional[int] = Field(None, ge=1)  # ReLIFT: buffered questions that trigger an SFT term
    prefixed_rows: Optional[int] = Field(None, ge=0)  # prefix-guided RL: prefixed rows per group
    prefix_start: Optional[float] = Field(None, ge=0, le=1)  # prefix share of the demonstration at step 0
    prefix_end: Optional[float] = Field(None, ge=0, le=1)  # ... at the last step (cosine in between)
    rounds: Optional[int] = Field(None, ge=1)  # RFT: sample / verify / fine-tune rounds
    round_prompts: Optional[int] = Field(None, ge=1)  # RFT: prompts sampled per round (default: every row)


class MixConfig(Strict):
    """The mixer's constants (defaults from the preset)."""

    mu_peak: Optional[float] = Field(None, ge=0, le=1)  # CHORD
    mu_valley: Optional[float] = Field(None, ge=0, le=1)
    mu_warmup: Optional[int] = Field(None, ge=0)
    mu_decay: Optional[int] = Field(None, ge=0)
    hpt_gamma: Optional[float] = Field(None, le=1)  # HPT: SFT iff accuracy <= hpt_gamma (< 0: never)
    sft_coef: Optional[float] = Field(None, ge=0)  # HPT / ReLIFT: weight of the SFT term
    soft_table: Optional[list[tuple[float, float, float]]] = None  # HPT soft: (max accuracy, rl, sft) rows
    w_sft: Optional[float] = Field(None, ge=0)  # SRFT
    w_rl: Optional[float] = Field(None, ge=0)


class PreferenceConfig(Strict):
    """The constants of a preference loss (dpo, ipo, simpo, orpo; defaults from the preset)."""

    beta: Optional[float] = Field(None, gt=0)  # DPO / SimPO beta; IPO's tau
    gamma: Optional[float] = Field(None, ge=0)  # SimPO target margin
    lam: Optional[float] = Field(None, ge=0)  # ORPO: weight of the odds-ratio term beside the chosen NLL
    desirable_weight: float = Field(1.0, gt=0)  # KTO lam_D
    undesirable_weight: float = Field(1.0, gt=0)  # KTO lam_U
    refresh_every: int = Field(0, ge=0)  # online DPO: the reference becomes the policy every N steps (iterative
    #                                      DPO); 0 keeps the stage's start policy


class OverlongConfig(Strict):
    """What happens to completions cut at rollout.max_new_tokens."""

    mask_truncated: Optional[bool] = None
    soft_penalty: Optional[bool] = None
    cache: Optional[int] = Field(None, gt=0)  # soft-penalty ramp length; default 20% of max_new_tokens


class RewardPolicyConfig(Strict):
    """When failing rewards stop the run, and the limits of the process they run in."""

    max_error_rate: float = Field(0.5, ge=0, le=1)  # masked samples / scored samples over `window` steps
    window: int = Field(5, gt=0)  # steps
    memory_mb: int = Field(8192, gt=0)  # address space the reward worker may add (RLIMIT_AS)
    cpu_s: int = Field(300, gt=0)  # CPU seconds per batch of reward calls (RLIMIT_CPU; threads add up)
    file_size_mb: int = Field(1024, gt=0)  # largest file a reward may write (RLIMIT_FSIZE)


class SamplesConfig(Strict):
    """A few of the policy's completions, with their rewards, in OUT/samples.jsonl every `every` steps."""

    every: int = Field(10, ge=0)  # 0: never
    n: int = Field(4, gt=0)


class LoraConfig(Strict):
    """Train low-rank adapters instead of the whole policy (peft); merged into the weights at the stage's end."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)  # the update is (alpha / r) B A
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Union[str, list[str]] = "all-linear"  # peft's names; "all-linear": every Linear but the head
    quantize: Optional[Literal["4bit"]] = None  # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes; CUDA or CPU)


class StopConfig(Strict):
    """End the stage early once this much has been trained on (checked after every optimizer step)."""

    samples: Optional[int] = Field(None, gt=0)  # sequences trained on, summed over updates
    tokens: Optional[int] = Field(None, gt=0)  # loss tokens trained on, summed over updates


class StageConfig(Strict):
    """One stage: a method, its data, and any component it overrides."""

    name: Optional[str] = None  # default: the method
    method: str  # a preset: `posttrain methods`
    data: DataConfig
    demos: Optional[DataConfig] = None  # demonstrations from a separate dataset (CHORD, ReLIFT, LUFFY, ...)
    heldout: Optional[DataConfig] = None  # reward_model: held-out preference pairs, pairwise accuracy after the stage
    rewards: list[RewardConfig] = Field(default_factory=list)  # reward functions (RL methods)
    steps: int = Field(100, gt=0)  # optimizer steps (the schedule's length)
    stop: StopConfig = Field(default_factory=StopConfig)  # a budget of samples / tokens ending it sooner
    optim: OptimConfig = Field(default_factory=OptimConfig)  # AdamW
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)  # learning-rate schedule
    batch: BatchConfig = Field(default_factory=BatchConfig)  # sizes
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)  # sampling
    ppo_epochs: int = Field(1, gt=0)  # passes over each rollout batch
    minibatches: int = Field(1, gt=0)  # optimizer steps per pass
    # Components of the preset's main stream (rollout for RL methods, demo for SFT methods); `streams` sets any.
    weight: Optional[Literal[tuple(WEIGHTS)]] = None  # type: ignore[valid-type]
    clip_level: Optional[Literal[CLIPS]] = None  # type: ignore[valid-type]
    aggregation: Optional[Literal[AGGREGATIONS]] = None  # type: ignore[valid-type]
    streams: StreamsConfig = Field(default_factory=StreamsConfig)  # per-stream components (demo, rollout, prefix)
    normaliser: Optional[Literal["stream", "joint"]] = None  # stream: one normaliser per stream; joint: one over all
    shaping_gamma: Optional[float] = Field(None, gt=0)  # LUFFY's f(p) = p / (p + gamma)
    success_threshold: Optional[float] = None  # total reward at which a sample counts as correct
    sources: SourcesConfig = Field(default_factory=SourcesConfig)
    mix: MixConfig = Field(default_factory=MixConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)  # dpo, ipo, simpo, orpo
    clip: ClipConfig = Field(default_factory=ClipConfig)  # ratio clipping
    kl: KLConfig = Field(default_factory=KLConfig)  # KL to the reference (the policy at the stage's start)
    distill: DistillConfig = Field(default_factory=DistillConfig)  # the teacher term (method opd)
    critic: CriticConfig = Field(default_factory=CriticConfig)  # the value model (method ppo, advantage gae)
    entropy: EntropyConfig = Field(default_factory=EntropyConfig)  # entropy bonus
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig)  # advantage estimator
    dynamic_sampling: DynamicSamplingConfig = Field(default_factory=DynamicSamplingConfig)  # DAPO's refill
    overlong: OverlongConfig = Field(default_factory=OverlongConfig)  # completions cut at max_new_tokens
    reward_timeout_s: float = Field(30.0, gt=0)  # seconds per reward call
    reward_policy: RewardPolicyConfig = Field(default_factory=RewardPolicyConfig)
    samples: SamplesConfig = Field(default_factory=SamplesConfig)
    lora: Optional[LoraConfig] = None
    log_every: int = Field(1, gt=0)  # steps between progress lines (metrics.jsonl has every step)
    @field_validator("method")
    @classmethod
    def _method_known(cls, v: str) -> str:
        get_preset(v)  # raises with the closest name and the valid choices
        return v


class EvalConfig(Strict):
    """Evaluation before the first stage and after each: on a built-in task, or on your data with your verifier."""

    task: Optional[str] = None  # a built-in task (its splits and rewards)
    data: Optional[str] = None  # or your prompt rows (a file, directory or hub id), scored by `reward`
    reward: Optional[str] = None  # the verifier of `data`: exact, numeric, math, code or module:function
    answer_column: Optional[str] = None  # the column holding the reference answer of `data` (default: answer)
    threshold: float = 1.0  # a completion is correct when the verifier's reward reaches this
    splits: list[str] = Field(default_factory=lambda: ["id"])  # the task's splits (with `data`: one, named data)
    n: int = Field(200, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    samples: int = Field(0, ge=0)  # K samples per prompt for pass@K (0: greedy only)
    temperature: float = Field(1.0, gt=0)
    every: int = Field(0, ge=0)  # also every N optimizer steps: greedy accuracy on curve_split -> curve.jsonl
    curve_split: str = "dev"  # the task's split for the curve (with `data`: its first curve_n rows)
    curve_n: int = Field(100, gt=0)

    @model_validator(mode="after")
    def _task_or_data(self) -> "EvalConfig":
        if (self.task is None) == (self.data is None):
            raise ValueError("give eval.task (a built-in task) or eval.data (your rows, with eval.reward), not "
                             + ("both" if self.task else "neither"))
        if self.data is not None and not self.reward:
            raise ValueError("eval.data needs eval.reward, its verifier: exact, numeric, math, code or "
                             "module:function")
        if self.data is not None:
            self.__dict__["splits"] = ["data"]
        return self


class CheckpointConfig(Strict):
    """How often a run saves what it needs to resume (OUT/checkpoints/); a signal always saves too."""

    every: int = Field(100, ge=0)  # optimizer steps between checkpoints (0: only when stopped by a signal)
    keep: int = Field(2, gt=0)  # the newest `keep` checkpoints are kept, older ones deleted


class DistributedConfig(Strict):
    """Several processes under torchrun (training/world.py); ignored in one process."""

    # ddp: every rank holds the model and optimizer; work is split by whole groups and gradients are summed.
    # fsdp: FSDP2 shards the policy's parameters, gradients and optimizer state over the ranks (each decoder
    # layer a unit), gathering them whole for the no-grad passes (sampling, old log-probs, evaluation)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    reference: Literal["replicate", "shard"] = "replicate"  # fsdp: the reference model whole on every rank, or sharded
    teacher: Literal["replicate", "shard"] = "replicate"  # fsdp: the recipe's teacher whole on every rank, or sharded
    timeout_s: float = Field(1800, gt=0)  # a collective waiting longer (a rank died or hangs) fails the run


class Recipe(Strict):
    model: str  # builtin:tiny, a local model directory, or a hub id
    tokenizer: Optional[str] = None  # another tokenizer for the model (a directory or hub id); default: the model's
    chat_template: Optional[str] = None  # a Jinja chat template (text or a file) replacing the tokenizer's
    resize_embeddings: bool = False  # give the model an embedding row for every token of its tokenizer
    teacher: Optional[str] = None  # distillation's teacher: builtin:tiny-teacher, a local directory or a hub id
    #                                (same tokenizer as the model)
    seed: int = 0  # seeds every stage (stage i uses seed + 7919 i)
    device: str = "auto"  # auto (cuda if present), cpu or cuda[:N]
    # auto: bf16 on a GPU with it; bf16-mixed: fp32 weights and optimizer state, matmuls autocast to bf16
    dtype: Literal["auto", "float32", "bfloat16", "float16", "bf16-mixed"] = "auto"
    stages: list[StageConfig] = Field(min_length=1)  # run in order; each starts from the previous one's policy
    eval: Optional[EvalConfig] = None  # evaluation before and after each stage (a task, or your data)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)  # checkpoint cadence and retention
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)  # torchrun: strategy, timeout
# ------------------------------------------------------------------------------------------------
# Resolution: one place where preset defaults meet user overrides.
# ------------------------------------------------------------------------------------------------


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
    names = [s.name for s in r.stages]
    if len(set(names)) != len(names):
        raise RecipeError(f"stage names must be unique, got {names}; set `name:` on each stage")
    for i, s in enumerate(r.stages):  # {fn: model, path: STAGE}: a reward_model stage that runs before it
        for rw in s.rewards:
            if rw.path in names and (rw.path not in names[:i] or
                                     get_preset(r.stages[names.index(rw.path)].method).advantage != REWARD_MODEL_LOSS):
                raise RecipeError(f"stage {s.name!r}: reward model {rw.path!r} names a stage of this recipe, which "
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


# ------------------------------------------------------------------------------------------------
# Loading, overrides, and errors that name the key path and the closest valid key.
# ------------------------------------------------------------------------------------------------


def apply_overrides(data: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """Apply dotted overrides: ["stages.0.clip.eps_high=0.28", "model=builtin:tiny"] (values parsed as YAML)."""
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
    for path, value in items:
        keys = path.split(".")
        node: Any = data
        for i, key in enumerate(keys[:-1]):
            nxt = keys[i + 1]
            if isinstance(node, list):
                node = node[_index(node, key, path)]
            else:
                node = node.setdefault(key, [] if nxt.isdigit() else {})
        last = keys[-1]
        if isinstance(node, list):
            node[_index(node, last, path)] = value
        else:
            node[last] = value
    return data


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not key.path=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _index(node: list, key: str, path: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise RecipeError(f"override {path!r}: {key!r} is not an index of a list of {len(node)}")
    return int(key)


BUILTIN_RECIPES = Path(__file__).resolve().parent / "recipes"


def builtin_recipe(name: str) -> Path:
    """The recipe shipped in the package as `builtin:NAME` (the repository's `recipes/NAME.yaml`)."""
    path = BUILTIN_RECIPES / f"{name}.yaml"
    if not path.is_file():
        stems = sorted(p.stem for p in BUILTIN_RECIPES.glob("*.yaml"))
        close = difflib.get_close_matches(name, stems, n=1)
        hint = f" (did you mean builtin:{close[0]}?)" if close else ""
        raise RecipeError(f"no built-in recipe builtin:{name}{hint}; the built-in recipes: {', '.join(stems)}")
    return path


def recipe_data(source: str | Path | dict | Recipe) -> tuple[dict, str]:
    """The raw (unvalidated) mapping of a recipe given as a YAML path, `builtin:NAME` (a shipped recipe), a
    dict or a Recipe, and where it came from (for error messages). The mapping is the caller's to change."""
    if isinstance(source, Recipe):
        return source.model_dump(mode="json", exclude_none=True), "<recipe>"
    if isinstance(source, dict):
        return copy.deepcopy(source), "<dict>"
    origin = str(source)
    path = builtin_recipe(origin.removeprefix("builtin:")) if origin.startswith("builtin:") else Path(source)
    if not path.is_file():
        raise RecipeError(f"recipe file {origin} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{origin}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe is a mapping with keys {', '.join(Recipe.model_fields)}")
    return data, origin


def load_recipe(source: str | Path | dict | Recipe, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Load, override, validate and resolve a recipe from a YAML path, `builtin:NAME` (a shipped recipe),
    a dict, or a Recipe."""
    data, origin = recipe_data(source)
    if overrides:
        data = apply_overrides(data, overrides)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{origin}: invalid recipe\n" + explain(e, data)) from None
    return resolve(recipe)


def explain(err: ValidationError, data: dict) -> str:
    lines = []
    for item in err.errors():
        loc = [str(x) for x in item["loc"]]
        path = ".".join(loc)
        if item["type"] == "extra_forbidden":
            valid = _valid_keys(loc[:-1], data)
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join(loc[:-1] + [close[0]])!r}?" if close else ""
            lines.append(f"  {path}: unknown key{hint} (valid keys here: {', '.join(valid)})")
        else:
            msg = item["msg"]
            if "did you mean" not in msg and "choose one of" not in msg:
                msg = f"{msg} (got {item.get('input')!r})"
            lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def _valid_keys(loc: list[str], data: dict) -> list[str]:
    """The field names of the config class at `loc` (e.g. ['stages', '0', 'clip'] -> ClipConfig fields)."""
    model: type[BaseModel] = Recipe
    for key in loc:
        if key.isdigit():
            continue
        field = model.model_fields.get(key)
        if field is None:
            return []
        ann = field.annotation
        for cand in (ann, *getattr(ann, "__args__", ())):
            inner = getattr(cand, "__args__", (cand,))
            found = [c for c in (cand, *inner) if isinstance(c, type) and issubclass(c, BaseModel)]
            if found:
                model = found[0]
                break
        else:
            return []
    return list(model.model_fields)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def method_table() -> list[dict]:
    return [p.table_row() for p in PRESETS.values()]
