"""The recipe's typed config classes: every one forbids unknown keys, and each field's trailing comment is its
meaning in docs/recipe-keys.md (`posttrain recipe-keys`)."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..logprobs import CHUNK_MB
from ..objective.advantages import ADVANTAGES
from ..objective.components import AGGREGATIONS, KL_ESTIMATORS, WEIGHTS
from ..objective.presets import CLIPS, STREAM_ADVANTAGES, get_preset

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
    path: Optional[Union[str, list[str]]] = None  # fn: model -- the reward model (a directory, hub id or reward_model stage) scoring each completion; a list: an ensemble
    ensemble: Optional[Literal["min", "mean"]] = None  # a list of reward models: each one's scores standardised by its score statistics, then their worst case (default) or mean

    @model_validator(mode="after")
    def _model_path(self) -> "RewardConfig":
        if (self.fn == "model") != (self.path is not None):
            raise ValueError("a reward model is given as {fn: model, path: DIR} (DIR a local directory or hub id "
                             "of a sequence-classification model); `path` belongs to fn: model only")
        if isinstance(self.path, list):
            if len(self.path) < 2:
                raise ValueError(f"an ensemble of reward models lists at least two paths; got {self.path} (give "
                                 "one reward model as a string)")
            if self.ensemble is None:  # (not by assignment: that would validate again)
                object.__setattr__(self, "ensemble", "min")
        elif self.ensemble is not None:
            raise ValueError("`ensemble` combines several reward models: give `path` as a list of them")
        return self

    def model_paths(self) -> list[str]:
        """fn: model -- the reward models named (one, or an ensemble's members); otherwise none."""
        return [] if self.path is None else [self.path] if isinstance(self.path, str) else list(self.path)


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
    # null: torch's fused AdamW kernel on CPU or CUDA (the per-tensor loop under distributed.strategy fsdp, so a
    # sharded run resumes on any number of ranks with the same rounding); false: the per-tensor loop always (the
    # same update to float rounding: what the shipped base was built with)
    fused: Optional[bool] = None


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
    pack: Union[bool, Literal["rows"]] = False  # SFT / DFT: demonstrations in rows of data.max_len tokens (less padding); true: each step's batch.size documents, in order; rows: each epoch's documents by best fit, 2048 at a time, and batch.size rows of similar length a step
    share_prompts: Optional[bool] = None  # RL: each prompt's samples run their common prefix once per log-prob pass (a tree attention mask; the same values to float32 rounding); null: where it saves >= 20% of the cost (positions and attention pairs); true: always; not with a shared value head
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
    # builtin engine: Llama, Qwen2, Qwen3 and Mistral models decode through posttrain's own step (the same
    # operations without transformers' modules, keys and values in buffers that double when full;
    # rollout/decode.py), LoRA-wrapped or not; other models (another architecture, quantised or sharded layers)
    # through their own forward, as all do with false
    native_decode: bool = True  # builtin: Llama-family models decode through posttrain's step; false: their forward
    # builtin engine on a CUDA device: that step captured once per rollout batch as a CUDA graph and replayed per
    # token (a small model's decode is kernel launches; every row then decodes to its batch's end)
    cuda_graphs: bool = True
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
    heldout: Optional[DataConfig] = None  # reward_model: held-out pairs, pairwise accuracy after the stage (per `kind`
    #                                       too, where the rows have that column)
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
