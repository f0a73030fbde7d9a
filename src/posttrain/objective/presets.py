"""Named presets: each method is a frozen choice of the estimator's components (DESIGN.md §1, algorithms.md §5.3).

A preset names its **sources** (where a step's rows come from), its advantage, and per **stream** the
weight, mask and aggregation applied to that stream's tokens, plus the mixer that weighs the streams.
Adding a method means adding a row here (and, if needed, one new component), never a new trainer.
Every default lives here and says where it comes from; `[?]` marks a value from memory or secondary sources.

Sources:
  demonstrations  offline y* (the stage's rows, or a separate `demos:` dataset)
  rollouts        G samples per prompt from the policy, scored by the rewards
  paired          the demonstration of each prompt in the step, in its question's group (LUFFY) or gated
                  by the group's accuracy (HPT), or beside the group (SRFT)
  prefixed        rollouts that continue a demonstration prefix (prefix-guided RL)
  buffer          ReLIFT: questions whose rollouts all failed, replayed as demonstrations when full
  verified        rejection sampling: K samples per prompt, the verified ones become demonstrations
  pairs           preference pairs (prompt, chosen, rejected): both responses in one micro-batch, the advantage
                  computed in the update from that forward pass (objective/preference.py)
  unpaired        labelled responses (prompt, completion, label: desirable or not; KTO), with the batch's
                  reference point from a no-grad pass over mismatched prompts and responses
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .advantages import ADVANTAGES
from .components import AGGREGATIONS, KL_ESTIMATORS, WEIGHTS
from .preference import NEEDS_REFERENCE

CLIPS = ("none", "token", "sequence", "tv")
SOURCES = ("demonstrations", "rollouts", "paired", "prefixed", "buffer", "verified", "pairs", "unpaired")
MIXERS = ("none", "chord", "hpt", "hpt_soft", "srft")
STREAM_NAMES = ("demo", "rollout", "prefix")
STREAM_ADVANTAGES = ("group", "one")  # the preset's advantage over the row's group, or A = 1


@dataclass(frozen=True)
class StreamSpec:
    """How one stream's tokens enter the estimator."""

    weight: str  # key of WEIGHTS: w = sg(p / D)
    clip: str = "none"  # none | token | sequence
    aggregation: str = "tok"  # tok | seq | const | sum
    advantage: str = "group"  # "group": the preset's advantage; "one": A = 1 (a demonstration's SFT term)


SFT_STREAM = StreamSpec("one", "none", "tok", "one")
# preference pairs: w = 1, no mask, mean over pairs; A is the preset's preference loss (objective/preference.py)
PAIR_STREAMS = {"demo": StreamSpec("one", "none", "pair", "group")}
HPT_SOFT_TABLE = ((0.125, 0.0, 1.0), (0.375, 0.25, 0.25), (1.0, 1.0, 0.0))


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    sources: tuple[str, ...]
    advantage: str  # key of advantages.ADVANTAGES (used by streams whose advantage is "group")
    streams: dict[str, StreamSpec] = field(default_factory=dict)
    normaliser: str = "stream"  # "stream": each stream its own W counts; "joint": one set over all streams
    eps_low: float = 0.2
    eps_high: float = 0.2
    eps_max: float = 5.0  # CISPO truncation
    tv_delta: float = 0.2  # DPPO: the divergence mask's bound on |p - q| [?]
    shaping_gamma: float = 0.1  # LUFFY policy shaping f(p) = p / (p + gamma)
    kl_beta: float = 0.0
    kl_estimator: str = "k3"
    kl_placement: str = "loss"  # "loss" (k2/k3 aggregated like the PG term) | "reward" (R -= beta * sum k1)
    entropy_coef: float = 0.0
    std_eps: float = 1e-4
    dynamic_sampling: bool = False  # DAPO: refill the batch with groups of mixed outcome
    mask_truncated: bool = False  # DAPO overlong filtering: truncated completions get no gradient
    overlong_penalty: bool = False  # DAPO soft overlong punishment added to R
    success_threshold: float = 1.0  # a sample with total reward >= this counts as correct (HPT, ReLIFT, RFT)
    # sources
    demos_per_group: int = 0  # LUFFY: k demonstrations inside each group of G (G - k rollouts)
    demo_share: float = 0.0  # CHORD / SRFT: demonstration rows per step as a share of the rollout rows
    buffer_size: int = 0  # ReLIFT: SFT on the buffered questions once it holds this many
    prefixed_rows: int = 0  # prefix-guided RL: rows of each group that continue a demonstration prefix
    prefix_start: float = 0.0  # share of the demonstration copied at step 0 ...
    prefix_end: float = 0.0  # ... decaying by a cosine to this share at the end of the stage
    rounds: int = 0  # RFT: sample / verify / fine-tune rounds in the stage
    # mixer
    mixer: str = "none"
    mu_peak: float = 0.0  # CHORD mu(t): warm-up to mu_peak, cosine to mu_valley
    mu_valley: float = 0.0
    mu_warmup: int = 0
    mu_decay: int = 0
    hpt_gamma: float = 0.0  # HPT: SFT iff the question's accuracy <= hpt_gamma
    sft_coef: float = 1.0  # weight of the SFT term of a switched (HPT) or buffered (ReLIFT) question
    soft_table: tuple = HPT_SOFT_TABLE  # HPT soft mode: (max accuracy, rl weight, sft weight) rows
    w_sft: float = 0.5  # SRFT: demonstration weight w_sft * exp(-H)
    w_rl: float = 0.1  # SRFT: positive-rollout weight w_rl * exp(H)
    # preference losses (advantage dpo / ipo / simpo / orpo)
    pref_beta: float = 0.1  # DPO / SimPO beta, IPO tau
    pref_gamma: float = 0.0  # SimPO target margin
    pref_lam: float = 0.1  # ORPO odds-ratio weight
    distill_coef: float = 0.0  # on-policy distillation: lambda of the teacher term lambda (log pi_T - log pi)
    self_teacher: bool = False  # SDFT: the teacher is the policy itself, shown the question's demonstration
    references: str = ""

    @property
    def data(self) -> str:
        """What a stage's rows must hold: "demonstrations" (SFT-style rows), "preferences" (prompt + chosen +
        rejected), "unpaired" (prompt + completion + label) or "prompts" (prompt + answer)."""
        if self.sources == ("pairs",):
            return "preferences"
        if self.sources == ("unpaired",):
            return "unpaired"
        return "demonstrations" if self.sources == ("demonstrations",) else "prompts"

    @property
    def needs_reference(self) -> bool:
        """A reference model is needed whatever the KL setting (DPO, IPO)."""
        return self.advantage in NEEDS_REFERENCE

    @property
    def needs_demonstrations(self) -> bool:
        """Whether every prompt row must carry a demonstration (its own, or one from `demos:`)."""
        return bool(set(self.sources) & {"paired", "prefixed", "buffer"})

    @property
    def needs_rewards(self) -> bool:
        return self.data == "prompts"

    def primary(self) -> str:
        """The main stream: the one the stage-level `weight` / `clip_level` / `aggregation` keys set."""
        return "rollout" if "rollout" in self.streams else next(iter(self.streams))

    def regularizers(self) -> str:
        parts = []
        if self.kl_beta:
            parts.append(f"kl {self.kl_estimator} in {self.kl_placement} beta={self.kl_beta:g}")
        if self.distill_coef:
            parts.append(f"teacher term {self.distill_coef:g}")
        if self.entropy_coef:
            parts.append(f"entropy {self.entropy_coef:g}")
        if self.overlong_penalty:
            parts.append("overlong penalty")
        return ", ".join(parts) or "-"

    def mask_description(self) -> str:
        parts = []
        for name, s in self.streams.items():
            if s.clip == "tv":
                parts.append(f"{name}: drop |p - q| > {self.tv_delta:g} (TV)")
            elif s.clip != "none":
                lo, hi = self.eps_low, self.eps_high
                parts.append(f"{name}: clip {s.clip} {lo:g}" + (f"/{hi:g}" if hi != lo else ""))
            if s.weight == "truncated":
                parts.append(f"{name}: truncate w<={self.eps_max:g}")
        if self.mask_truncated:
            parts.append("drop truncated")
        if self.dynamic_sampling:
            parts.append("dynamic sampling")
        return ", ".join(parts) or "-"

    def mixer_description(self) -> str:
        if self.mixer == "chord":
            if self.mu_peak == self.mu_valley:
                return f"mu={self.mu_peak:g}"
            return f"mu {self.mu_peak:g}->{self.mu_valley:g} (warm-up {self.mu_warmup}, cosine {self.mu_decay})"
        if self.mixer == "hpt":
            return f"switch to SFT iff accuracy <= {self.hpt_gamma:g}"
        if self.mixer == "hpt_soft":
            return "soft table by accuracy"
        if self.mixer == "srft":
            return f"entropy weights w_sft={self.w_sft:g} w_rl={self.w_rl:g}"
        if "buffer" in self.sources:
            return f"buffer of {self.buffer_size} failed questions -> SFT"
        if "prefixed" in self.sources:
            return f"prefix share {self.prefix_start:g}->{self.prefix_end:g}"
        if "verified" in self.sources:
            return f"{self.rounds} rounds of sample / verify / SFT"
        return "-"

    def preference_description(self) -> str:
        if self.advantage == "bradley_terry":
            return "Bradley-Terry on a scalar head (not a policy gradient)"
        if self.advantage in NEEDS_REFERENCE:
            return f"{self.advantage} beta={self.pref_beta:g}"
        if self.advantage == "simpo":
            return f"simpo beta={self.pref_beta:g} gamma={self.pref_gamma:g}"
        if self.advantage == "orpo":
            return f"orpo lambda={self.pref_lam:g}"
        return ""

    def _per_stream(self, attr: str) -> str:
        vals = {n: getattr(s, attr) for n, s in self.streams.items()}
        if len(set(vals.values())) == 1:
            return next(iter(vals.values()))
        return ", ".join(f"{n}: {v}" for n, v in vals.items())

    def table_row(self) -> dict:
        row = asdict(self)
        row["streams"] = {n: asdict(s) for n, s in self.streams.items()}
        row.update(sources=", ".join(self.sources), data=self.data, mask=self.mask_description(),
                   regularizers=self.regularizers(), weight=self._per_stream("weight"),
                   aggregation=self._per_stream("aggregation"), mix=self.mixer_description())
        if self.data in ("preferences", "unpaired"):
            row["advantage"] = self.preference_description()
        return row


def _rl(weight: str = "ratio", clip: str = "token", aggregation: str = "seq") -> dict[str, StreamSpec]:
    return {"rollout": StreamSpec(weight, clip, aggregation)}


_P = [
    Preset("sft", "supervised fine-tuning: NLL of demonstrations", ("demonstrations",), "one",
           {"demo": SFT_STREAM}, references="token mean over the global batch, as TRL SFTTrainer (nll)"),
    Preset("dft", "dynamic fine-tuning: NLL re-weighted by sg(p) (arXiv 2508.05629)", ("demonstrations",), "one",
           {"demo": StreamSpec("prob", "none", "tok", "one")},
           references="DFT paper/README; TRL SFTConfig(loss_type='dft')"),
    Preset("kd", "Knowledge distillation on demonstrations: each token's target is the teacher's distribution over "
           "its top-k tokens, the forward KL(pi_T || pi) (Hinton et al. 2015); distill.coef < 1 mixes in the one-hot "
           "demonstration", ("demonstrations",), "one", {"demo": SFT_STREAM}, distill_coef=1.0,
           references="classic KD / TRL GKD with lambda 0 (no student samples) and beta 0 (forward KL), temperature "
                      "1; the teacher's top 64 tokens per position (distill.top_k)"),
    Preset("psft", "Proximal SFT: the NLL of demonstrations as a PPO-clipped ratio to the policy before the batch's "
           "updates, A = 1 (arXiv 2508.17784)", ("demonstrations",), "one",
           {"demo": StreamSpec("ratio", "token", "tok", "one")},
           references="paper: a trust region for SFT; it matters with several updates per batch (ppo_epochs / "
                      "minibatches > 1); with one it is SFT exactly. eps 0.2 [?]"),
    Preset("reinforce", "REINFORCE with the raw reward, on-policy", ("rollouts",), "raw", _rl("one", "none", "sum"),
           references="Williams 1992; sum over tokens, mean over sequences"),
    Preset("remax", "ReMax: REINFORCE with the reward of the prompt's greedy decode as the baseline (arXiv "
           "2310.10505)", ("rollouts",), "remax", _rl("one", "none", "sum"),
           references="paper: one sample and one greedy decode per prompt, A = R - R_greedy on every token, sum "
                      "over tokens, mean over sequences; KL optional (off)"),
    Preset("rloo", "REINFORCE leave-one-out baseline (Ahmadian et al. 2024)", ("rollouts",), "loo",
           _rl("ratio", "token", "sum"), kl_beta=0.05, kl_estimator="k1", kl_placement="reward",
           references="TRL RLOO defaults: beta 0.05 (k1 in reward), eps 0.2; TRL uses a sequence ratio of token "
                      "sums, identical to the token ratio at one update per batch"),
    Preset("reinforce_pp", "REINFORCE++ (group-mean baseline): k1-penalised returns, global whitening "
           "(arXiv 2501.03262)", ("rollouts",), "reinforce_pp", _rl("ratio", "token", "tok"), kl_beta=0.01,
           kl_estimator="k1", kl_placement="reward",
           references="paper/OpenRLHF: eps 0.2, token mean; the 'baseline' variant for G > 1 samples per prompt "
                      "(group mean subtracted before the returns); beta 0.01 [?]"),
    Preset("ppo", "PPO with a value model: GAE over per-token rewards (R at the end, k1 KL on each token), whitened, "
           "clipped ratio; the critic trained beside with a clipped value loss (Ouyang et al. 2022)", ("rollouts",),
           "gae", _rl("ratio", "token", "tok"), kl_beta=0.05, kl_estimator="k1", kl_placement="reward",
           references="legacy TRL PPOConfig: eps 0.2, eps_v 0.2, kl 0.05 (k1 in the reward), advantages whitened, "
                      "token mean; gamma 1 and lambda 1 as verl / OpenRLHF (TRL's 0.95 learned less on arith: see "
                      "recipes/rm_then_ppo.yaml); one sample per prompt is enough (no group)"),
    Preset("grpo", "GRPO: group z-scored rewards, clipped ratio, k3 KL in the loss (DeepSeekMath)", ("rollouts",),
           "group_zscore", _rl("ratio", "token", "seq"), kl_beta=0.04, kl_estimator="k3",
           references="DeepSeekMath: beta 0.04 [?], eps 0.2, per-sequence mean; std eps 1e-4 and Bessel as TRL"),
    Preset("dr_grpo", "Dr. GRPO: centred rewards, constant normaliser (arXiv 2503.20783)", ("rollouts",),
           "group_center", _rl("ratio", "token", "const"), references="paper: no std, sum / (N * L_max), no KL"),
    Preset("dapo", "DAPO: clip-higher, dynamic sampling, token mean, overlong shaping (arXiv 2503.14476)",
           ("rollouts",), "group_zscore", _rl("ratio", "token", "tok"), eps_low=0.2, eps_high=0.28,
           dynamic_sampling=True, mask_truncated=True, overlong_penalty=True,
           references="paper / TRL docs: eps 0.2/0.28, token mean, no KL; soft overlong cache = 20% of L_max "
                      "(4096 of 20480 in the paper)"),
    Preset("dppo", "DPPO: GRPO's advantage with a divergence mask in place of the ratio clip: a token whose "
           "probability moved more than delta from the rollout policy's, in the advantage's direction, gets no "
           "gradient (arXiv 2602.04879)", ("rollouts",), "group_zscore", _rl("ratio", "tv", "tok"), tv_delta=0.2,
           references="verl / prime-rl DPPO: binary TV estimate |p - q| of the sampled token, token mean; delta "
                      "0.2 [?]; no KL"),
    Preset("gspo", "GSPO: sequence-level ratio and clip (arXiv 2507.18071)", ("rollouts",), "group_zscore",
           _rl("seq_ratio", "sequence", "seq"), eps_low=3e-4, eps_high=4e-4,
           references="paper: eps 3e-4 / 4e-4 [2nd]"),
    Preset("cispo", "CISPO: truncated importance weight, never masked (MiniMax-M1)", ("rollouts",), "group_zscore",
           _rl("truncated", "none", "tok"), eps_max=5.0, references="TRL suggests eps_max 5.0"),
    Preset("maxrl", "MaxRL: group advantage (R - mean) / mean, toward maximum likelihood of the right answers "
           "(arXiv 2602.02710)", ("rollouts",), "maxrl", _rl("ratio", "token", "tok"),
           references="paper / prime-rl: A = (R - mean_G R) / mean_G R; clip 0.2 and token mean as DAPO [?]"),
    # ---- hybrids: demonstrations and rollouts in one step ----------------------------------------------------
    Preset("luffy", "LUFFY: G-k rollouts + k demonstrations per group, advantages over the mixed group, "
           "shaped weight p/(p+gamma) on demonstration tokens (arXiv 2504.14945)", ("rollouts", "paired"),
           "group_zscore", {"rollout": StreamSpec("ratio", "token", "tok"),
                            "demo": StreamSpec("shaped", "none", "tok", "group")},
           normaliser="joint", demos_per_group=1, shaping_gamma=0.1, entropy_coef=0.001,
           references="LUFFY code: 7 rollouts + 1 trace per group of 8, gamma 0.1, entropy 0.001, no KL, one token "
                      "mean over the mixed batch; the paper's z-score over the mixed group (the released script "
                      "centres only); the rollout ratio clip kept (the script removes it)"),
    Preset("hpt", "HPT: per question, RL on its rollouts, or SFT on its demonstration when the group's accuracy "
           "<= gamma (arXiv 2509.04419); gamma = 0 is SuperRL", ("rollouts", "paired"), "group_center",
           {"rollout": StreamSpec("ratio", "token", "const"), "demo": SFT_STREAM}, mixer="hpt", hpt_gamma=0.0,
           sft_coef=1.0, entropy_coef=0.001,
           references="HPT code (Qwen2.5-Math-7B): SFT iff #correct = 0, c_sft 1.0, Dr. GRPO-like RL part, entropy "
                      "0.001, no KL; the CONST normaliser counts switched rollouts, so gamma = 0 adds exactly the SFT "
                      "term of the all-wrong questions to the RL gradient (O19)"),
    Preset("hpt_soft", "HPT soft mode: each question's RL and SFT weights from a table of its group's accuracy",
           ("rollouts", "paired"), "group_center",
           {"rollout": StreamSpec("ratio", "token", "const"), "demo": SFT_STREAM}, mixer="hpt_soft",
           entropy_coef=0.001,
           references="HPT code soft_type 1 points (1 of 8 correct -> (rl 0, sft 1), 3 -> (0.25, 0.25), >= 5 -> "
                      "(1, 0)); the rows between are ours"),
    Preset("srft", "SRFT: entropy-weighted SFT on demonstrations plus RL on rollouts in one stage "
           "(arXiv 2506.19767)", ("rollouts", "paired"), "group_center",
           {"rollout": StreamSpec("ratio", "token", "tok"), "demo": SFT_STREAM}, mixer="srft", w_sft=0.5, w_rl=0.1,
           references="SRFT port: w_sft = 0.5 exp(-H), w_rl = 0.1 exp(H) on positive rollouts, H the policy's mean "
                      "token entropy (here per row, same forward pass); the LUFFY-style off-policy demo term of "
                      "the paper is left out (use luffy for it)"),
    Preset("chord_mu", "CHORD-mu: (1 - mu) GRPO + mu SFT, mu from 0.9 to 0.05 by a cosine over 200 steps "
           "(arXiv 2508.11408)", ("rollouts", "demonstrations"), "group_zscore",
           {"rollout": StreamSpec("ratio", "token", "tok"), "demo": SFT_STREAM}, mixer="chord", mu_peak=0.9,
           mu_valley=0.05, mu_warmup=0, mu_decay=200, demo_share=0.2,
           references="Trinity-RFT CHORD yaml: mu 0.9 -> 0.05 over 200 steps, no warm-up, ~20% expert rows, "
                      "clip 0.2, no KL, token mean per stream"),
    Preset("chord_phi", "CHORD-phi: GRPO + mu SFT with the token weight phi = p (1 - p), mu = 0.1 "
           "(arXiv 2508.11408)", ("rollouts", "demonstrations"), "group_zscore",
           {"rollout": StreamSpec("ratio", "token", "tok"), "demo": StreamSpec("phi", "none", "tok", "one")},
           mixer="chord", mu_peak=0.1, mu_valley=0.1, demo_share=0.2,
           references="Trinity-RFT CHORD yaml: mu = 0.1 constant, phi on, ~20% expert rows, clip 0.2, no KL"),
    Preset("relift", "ReLIFT: RL, plus SFT on the demonstrations of questions whose rollouts all failed, once "
           "a buffer of them is full (arXiv 2506.07527)", ("rollouts", "buffer"), "group_zscore",
           {"rollout": StreamSpec("ratio", "token", "seq"), "demo": SFT_STREAM}, buffer_size=16, sft_coef=1.0,
           references="paper: RL main loop, buffer size = the SFT batch size; here the SFT update on the buffer "
                      "is taken in the same optimizer step as that step's RL update (its own token mean)"),
    Preset("prefix_rft", "Prefix-guided RL (Prefix-RFT / UFT): some rollouts of each group continue a "
           "demonstration prefix whose share decays to zero (arXiv 2507.01679, 2505.16984)", ("rollouts", "prefixed"),
           "group_center", {"rollout": StreamSpec("ratio", "token", "const"),
                            "prefix": StreamSpec("one", "none", "const", "group")},
           normaliser="joint", prefixed_rows=2, prefix_start=0.95, prefix_end=0.0,
           references="Prefix-RFT: Dr. GRPO update over the mixed group, prefix share cosine 0.95 -> 0.05 [2nd] "
                      "(here -> 0, the issue's schedule); prefix tokens carry the row's advantage with weight 1; "
                      "its top-20% entropy mask on prefix tokens is left out"),
    # ---- preference optimisation: pairs, the advantage from the update's forward pass --------------------------
    Preset("dpo", "DPO: -log sigma(beta h), h the chosen-minus-rejected log-ratio to the reference "
           "(arXiv 2305.18290)", ("pairs",), "dpo", PAIR_STREAMS,
           pref_beta=0.1, references="paper / TRL DPOConfig: beta 0.1, sigmoid loss, summed log-probs"),
    Preset("ipo", "IPO: (h - 1/(2 tau))^2 on length-averaged log-ratios (arXiv 2310.12036)", ("pairs",), "ipo",
           PAIR_STREAMS, pref_beta=0.1,
           references="TRL loss_type='ipo': beta is tau, default 0.1, log-ratios averaged over tokens"),
    Preset("simpo", "SimPO: -log sigma(beta (avg logp_w - avg logp_l) - gamma), no reference (arXiv 2405.14734)",
           ("pairs",), "simpo", PAIR_STREAMS, pref_beta=2.0, pref_gamma=0.5,
           references="paper: beta 2-2.5, gamma/beta about 0.5 [?]; TRL CPO simpo_gamma 0.5"),
    Preset("orpo", "ORPO: NLL on chosen - lambda log sigma(log-odds ratio), no reference (arXiv 2403.07691)",
           ("pairs",), "orpo", PAIR_STREAMS, pref_lam=0.1,
           references="TRL ORPOConfig beta (lambda) 0.1; NLL a token mean over the chosen responses"),
    Preset("reward_model", "Reward model, not a policy gradient: a scalar head on the model's backbone trained on "
           "preference pairs with -log sigma(r_w - r_l) (Bradley-Terry); saved as a sequence-classification model, "
           "used by RL stages as the reward {fn: model, path: DIR}", ("pairs",), "bradley_terry", PAIR_STREAMS,
           references="InstructGPT / TRL RewardTrainer: last-token score, sigmoid pairwise loss, no margin term"),
    # ---- distillation ----------------------------------------------------------------------------------------
    Preset("opd", "On-policy distillation: the student's own samples, per-token advantage log pi_T - log pi "
           "(reverse KL to the teacher); rewards optional (Thinking Machines 2025; prime-rl, slime)",
           ("rollouts",), "zero", _rl("ratio", "token", "tok"), distill_coef=1.0,
           references="tinker-cookbook / prime-rl opd: A_t = log pi_T(y_t) - log pi(y_t) on sampled tokens, token "
                      "mean; with rewards and advantage.kind group_zscore it is A - lambda (log pi - log pi_T), as "
                      "slime"),
    Preset("sdft", "Self-distillation fine-tuning: on-policy distillation whose teacher is the policy itself with the "
           "question's demonstration in its prompt; reverse KL on the student's samples, no reward (arXiv "
           "2601.19897)", ("rollouts", "paired"), "zero", _rl("ratio", "token", "tok"), distill_coef=1.0,
           self_teacher=True,
           references="paper: the teacher is the same model conditioned on the demonstration, the student its "
                      "own samples, A_t = log pi(y_t | x, y*) - log pi(y_t | x); the context template "
                      "(distill.context) is posttrain's"),
    Preset("online_dpo", "Online DPO: G samples per prompt from the current policy, the best and the worst by "
           "reward as a pair, DPO on them (arXiv 2402.04792); preference.refresh_every: iterative DPO",
           ("rollouts",), "dpo", {"rollout": StreamSpec("one", "none", "pair", "group")}, pref_beta=0.1,
           references="TRL OnlineDPOConfig: beta 0.1, sigmoid loss; pairs from a verifier or reward functions; "
                      "groups whose samples all score the same give no pair"),
    Preset("kto", "KTO: unpaired desirable / undesirable responses against the batch's reference point "
           "(arXiv 2402.01306)", ("unpaired",), "kto", {"demo": StreamSpec("one", "none", "sum", "group")},
           pref_beta=0.1, references="TRL KTOConfig: beta 0.1, desirable and undesirable weights 1, z0 from "
                                     "mismatched pairs of the batch, detached and clamped at 0"),
    Preset("rft", "Rejection-sampling fine-tuning (RFT / STaR / expert iteration): K samples per prompt, "
           "SFT on the verified ones, for R rounds", ("verified",), "indicator", {"demo": SFT_STREAM}, rounds=1,
           references="RFT (Yuan et al. 2023), STaR, RAFT: keep samples whose reward >= success_threshold, token "
                      "mean NLL over the kept tokens (O20); no restart from the base between rounds"),
]
PRESETS: dict[str, Preset] = {p.name: p for p in _P}


def _check(p: Preset) -> None:
    assert p.advantage in ADVANTAGES and p.kl_estimator in KL_ESTIMATORS, p
    assert set(p.sources) <= set(SOURCES) and p.mixer in MIXERS and p.normaliser in ("stream", "joint"), p
    assert p.streams and set(p.streams) <= set(STREAM_NAMES), p
    for s in p.streams.values():
        assert s.weight in WEIGHTS and s.clip in CLIPS and s.aggregation in AGGREGATIONS, p
        assert s.advantage in STREAM_ADVANTAGES, p


for _p in _P:
    _check(_p)


# Methods users ask for that posttrain does not have yet: named plainly instead of a near miss ("dapo").
NOT_YET = {"distill": "distillation", "gkd": "distillation"}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        if name.lower() in NOT_YET:
            raise ValueError(f"method {name!r} ({NOT_YET[name.lower()]}) is not in posttrain yet; the methods are "
                             f"{', '.join(PRESETS)}")
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
