"""A study's evaluation of one model on held-out data: every question split (greedy accuracy, pass@k, maj@k,
format adherence, response length), NLL on held-out plain text, and KL to the base on held-out prompts."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..data.encode import encode_prompt
from ..eval.forgetting import kl_to_base
from ..eval.task_eval import evaluate_task
from ..models import load_policy, stop_token_ids


@dataclass(frozen=True)
class EvalSpec:
    task: str = "arith"
    splits: tuple[str, ...] = ("id", "ood", "ood_phrasing")  # question splits; the first is in distribution
    n: int = 200  # prompts per split
    samples: int = 4  # K samples per prompt for pass@k and maj@k (0: greedy only)
    max_new_tokens: int = 48
    plain_split: str = "plain"  # held-out plain text: NLL drift
    kl_split: str = "dev"  # held-out prompts for KL(policy || base)
    kl_n: int = 64
    curve_every: int = 25  # learning-curve points every N optimizer steps (greedy accuracy on kl_split)
    curve_n: int = 100
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_model(model, tok, spec: EvalSpec, base=None) -> dict:
    """{split: metrics} for the question splits, plus "plain" ({nll}) and, with a base, "kl" (kl_to_base)."""
    from ..tasks import get_task

    stop_ids, pad_id = stop_token_ids(tok, model), tok.pad_token_id
    out: dict = {}
    for split in spec.splits:
        out[split] = evaluate_task(model, tok, spec.task, split, n=spec.n, max_new_tokens=spec.max_new_tokens,
                                   samples=spec.samples, temperature=1.0, stop_ids=stop_ids, pad_id=pad_id,
                                   seed=spec.seed)
    if spec.plain_split:
        out["plain"] = evaluate_task(model, tok, spec.task, spec.plain_split, n=spec.n, max_new_tokens=1,
                                     stop_ids=stop_ids, pad_id=pad_id)
    if spec.kl_n:
        prompts = [encode_prompt(r["prompt"], tok) for r in get_task(spec.task).rows(spec.kl_split)[: spec.kl_n]]
        out["kl"] = kl_to_base(model, base if base is not None else model, prompts, stop_ids=stop_ids, pad_id=pad_id,
                               max_new_tokens=spec.max_new_tokens, seed=spec.seed)
    return out


def evaluate_dir(model_dir: str, base_dir: str, spec: EvalSpec) -> dict:
    """Load a trained model and its base (CPU or GPU as `load_policy` picks) and evaluate."""
    torch.manual_seed(spec.seed)
    model, tok = load_policy(model_dir)
    base = None
    if spec.kl_n:
        base, _ = load_policy(base_dir)
    result = evaluate_model(model, tok, spec, base)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    return result
