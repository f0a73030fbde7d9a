"""Named presets: each method is a frozen choice of the estimator's components (DESIGN.md §1, algorithms.md §5.3).

Adding a method means adding a row here (and, if needed, one new component), never a new trainer.
Every default below says where it comes from; `[?]` marks a value from memory or secondary sources.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .components import AGGREGATIONS, KL_ESTIMATORS, SEQUENCE_ADVANTAGES, WEIGHTS

ADVANTAGES = tuple(SEQUENCE_ADVANTAGES) + ("reinforce_pp",)
CLIPS = ("none", "token", "sequence")


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    data: str  # "demonstrations" (offline y*) | "rollouts" (sampled from the policy, scored by rewards)
    advantage: str  # key of SEQUENCE_ADVANTAGES, or "reinforce_pp" (k1-penalised token returns, globally whitened)
    weight: str  # key of WEIGHTS: w = sg(p / D)
    clip: str  # stabilisation mask: none | token | sequence
    aggregation: str  # tok | seq | const | sum
    eps_low: float = 0.2
    eps_high: float = 0.2
    eps_max: float = 5.0  # CISPO truncation
    gamma: float = 0.1  # LUFFY shaping
    kl_beta: float = 0.0
    kl_estimator: str = "k3"
    kl_placement: str = "loss"  # "loss" (k2/k3 aggregated like the PG term) | "reward" (R -= beta * sum k1)
    entropy_coef: float = 0.0
    std_eps: float = 1e-4
    dynamic_sampling: bool = False  # DAPO: refill the batch with groups of mixed outcome
    mask_truncated: bool = False  # DAPO overlong filtering: truncated completions get no gradient
    overlong_penalty: bool = False  # DAPO soft overlong punishment added to R
    sources: str = ""

    def regularizers(self) -> str:
        parts = []
        if self.kl_beta:
            parts.append(f"kl {self.kl_estimator} in {self.kl_placement} beta={self.kl_beta:g}")
        if self.entropy_coef:
            parts.append(f"entropy {self.entropy_coef:g}")
        if self.overlong_penalty:
            parts.append("overlong penalty")
        return ", ".join(parts) or "-"

    def mask_description(self) -> str:
        parts = []
        if self.clip != "none":
            lo, hi = self.eps_low, self.eps_high
            parts.append(f"clip {self.clip} {lo:g}" + (f"/{hi:g}" if hi != lo else ""))
        if self.weight == "truncated":
            parts.append(f"truncate w<={self.eps_max:g}")
        if self.mask_truncated:
            parts.append("drop truncated")
        if self.dynamic_sampling:
            parts.append("dynamic sampling")
        return ", ".join(parts) or "-"

    def table_row(self) -> dict:
        row = asdict(self)
        row.update(mask=self.mask_description(), regularizers=self.regularizers())
        return row


_P = [
    Preset("sft", "supervised fine-tuning: NLL of demonstrations", "demonstrations", "one", "one", "none", "tok",
           sources="token mean over the global batch, as TRL SFTTrainer (nll)"),
    Preset("dft", "dynamic fine-tuning: NLL re-weighted by sg(p) (arXiv 2508.05629)", "demonstrations", "one",
           "prob", "none", "tok", sources="DFT paper/README; TRL SFTConfig(loss_type='dft')"),
    Preset("reinforce", "REINFORCE with the raw reward, on-policy", "rollouts", "raw", "one", "none", "sum",
           sources="Williams 1992; sum over tokens, mean over sequences"),
    Preset("rloo", "REINFORCE leave-one-out baseline (Ahmadian et al. 2024)", "rollouts", "loo", "ratio", "token",
           "sum", kl_beta=0.05, kl_estimator="k1", kl_placement="reward",
           sources="TRL RLOO defaults: beta 0.05 (k1 in reward), eps 0.2; TRL uses a sequence ratio of token "
                   "sums, identical to the token ratio at one update per batch"),
    Preset("reinforce_pp", "REINFORCE++: k1-penalised returns, global advantage whitening (arXiv 2501.03262)",
           "rollouts", "reinforce_pp", "ratio", "token", "tok", kl_beta=0.01, kl_estimator="k1",
           kl_placement="reward", sources="paper/OpenRLHF: eps 0.2, token mean; beta 0.01 [?]"),
    Preset("grpo", "GRPO: group z-scored rewards, clipped ratio, k3 KL in the loss (DeepSeekMath)", "rollouts",
           "group_zscore", "ratio", "token", "seq", kl_beta=0.04, kl_estimator="k3",
           sources="DeepSeekMath: beta 0.04 [?], eps 0.2, per-sequence mean; std eps 1e-4 and Bessel as TRL"),
    Preset("dr_grpo", "Dr. GRPO: centred rewards, constant normaliser (arXiv 2503.20783)", "rollouts",
           "group_center", "ratio", "token", "const", sources="paper: no std, sum / (N * L_max), no KL"),
    Preset("dapo", "DAPO: clip-higher, dynamic sampling, token mean, overlong shaping (arXiv 2503.14476)",
           "rollouts", "group_zscore", "ratio", "token", "tok", eps_low=0.2, eps_high=0.28,
           dynamic_sampling=True, mask_truncated=True, overlong_penalty=True,
           sources="paper / TRL docs: eps 0.2/0.28, token mean, no KL; soft overlong cache = 20% of L_max "
                   "(4096 of 20480 in the paper)"),
    Preset("gspo", "GSPO: sequence-level ratio and clip (arXiv 2507.18071)", "rollouts", "group_zscore",
           "seq_ratio", "sequence", "seq", eps_low=3e-4, eps_high=4e-4,
           sources="paper: eps 3e-4 / 4e-4 [2nd]"),
    Preset("cispo", "CISPO: truncated importance weight, never masked (MiniMax-M1)", "rollouts", "group_zscore",
           "truncated", "none", "tok", eps_max=5.0, sources="TRL suggests eps_max 5.0"),
]
PRESETS: dict[str, Preset] = {p.name: p for p in _P}


def _check(p: Preset) -> None:
    assert p.advantage in ADVANTAGES and p.weight in WEIGHTS and p.clip in CLIPS, p
    assert p.aggregation in AGGREGATIONS and p.kl_estimator in KL_ESTIMATORS, p


for _p in _P:
    _check(_p)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
