"""Evaluation of a policy on prompts with a verifier: greedy accuracy, sampled pass@k, response length.

pass@k uses the unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models Trained on
Code", eq. 1): with n samples of which c are correct,

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

The product form never builds a large binomial coefficient, so it is exact-ish in float64 for any n.

maj@k (self-consistency): the answer most of a prompt's first k samples give (ties: the one given first),
scored as correct when a sample with that answer is correct. Samples whose answer cannot be read do not
vote; a prompt where none can is wrong.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from posttrain.rollout.sampler import Rollout, sample

ScoreFn = Callable[[list[int], list[list[int]]], list[float]]
AnswerFn = Callable[[list[int], list[list[int]]], list["str | None"]]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n (draw at least k samples per prompt), got n={n}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def maj_at_k(answers: Sequence[str | None], scores: Sequence[float], k: int) -> float:
    """1.0 when the majority answer of the first k samples of one prompt is correct, else 0.0."""
    if not 1 <= k <= len(answers):
        raise ValueError(f"need 1 <= k <= {len(answers)} samples, got k={k}")
    votes: dict[str, int] = {}
    correct: dict[str, bool] = {}
    for a, s in zip(answers[:k], scores[:k]):
        if a is None:
            continue
        votes[a] = votes.get(a, 0) + 1
        correct[a] = correct.get(a, False) or s == 1.0
    if not votes:
        return 0.0
    best = max(votes.values())
    winner = next(a for a in votes if votes[a] == best)  # dicts keep insertion order: the first given wins ties
    return float(correct[winner])


def pass_k_values(samples: int) -> list[int]:
    """The k reported for `samples` draws per prompt: powers of two up to `samples`, and `samples` itself."""
    ks = {2**j for j in range(samples.bit_length()) if 2**j <= samples}
    return sorted(ks | {samples}) if samples > 0 else []


@dataclass
class EvalResult:
    n: int  # prompts evaluated
    accuracy: float  # greedy accuracy over the scored prompts (NaN when none could be scored)
    pass_at_k: dict[int, float]  # k -> mean unbiased pass@k over prompts with >= k scored samples
    mean_response_len: float  # mean greedy completion length in tokens (stop token included)
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Flat dict for metrics.jsonl: n, accuracy, pass@K for each K, response_len, then the extras."""
        out: dict = {"n": self.n, "accuracy": self.accuracy}
        out.update({f"pass@{k}": v for k, v in sorted(self.pass_at_k.items())})
        out["response_len"] = self.mean_response_len
        out.update(self.extra)
        return out


def _score(score_fn: ScoreFn, rollout: Rollout) -> list[float]:
    """Run the verifier on a rollout and check what it returned: one value in {0, 1} or NaN per completion."""
    scores = [float(s) for s in score_fn(list(rollout.prompt_index), list(rollout.completion_ids))]
    if len(scores) != len(rollout):
        raise ValueError(f"score_fn returned {len(scores)} scores for {len(rollout)} completions; return one per completion")
    bad = [s for s in scores if not (math.isnan(s) or s in (0.0, 1.0))]
    if bad:
        raise ValueError(f"score_fn must return correctness 0 or 1 (or NaN when unscorable); got e.g. {bad[:3]}")
    return scores


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _pass_at_k_table(prompt_index: list[int], scores: list[float], ks: list[int]) -> dict[int, float]:
    """Mean pass@k over prompts; unscored samples are dropped and a prompt with fewer than k left is skipped for k."""
    n_c: dict[int, list[int]] = {}
    for i, s in zip(prompt_index, scores):
        counts = n_c.setdefault(i, [0, 0])
        if not math.isnan(s):
            counts[0] += 1
            counts[1] += int(s)
    return {k: _mean([pass_at_k(n, c, k) for n, c in n_c.values() if n >= k]) for k in ks}


def evaluate(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    score_fn: ScoreFn,
    *,
    stop_ids: Sequence[int],
    pad_id: int,
    max_new_tokens: int,
    samples: int = 0,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    extra_fn: Callable[[list[int], list[list[int]]], dict[str, list[float]]] | None = None,
    answer_fn: AnswerFn | None = None,
) -> EvalResult:
    """Greedy accuracy on every prompt and, when `samples` = K > 0, pass@k from K samples per prompt at `temperature`.

    `score_fn(prompt_indices, completion_ids)` gets indices into `prompt_ids` and the completions (stop token included)
    and returns 1.0 (correct), 0.0 (wrong) or NaN (cannot be scored: excluded from the means, counted in
    extra["unscored"] for greedy and extra["unscored_samples"] for sampled completions).
    `extra_fn(prompt_indices, completion_ids) -> {name: values}` adds the mean of other per-completion metrics
    of the greedy completions (e.g. format adherence). Extras: truncated (fraction of greedy completions that hit max_new_tokens) and, with samples,
    sample_accuracy (mean correctness of all scored samples) and sample_response_len; with samples and
    `answer_fn(prompt_indices, completion_ids) -> answers` (None: unreadable), maj@k for the same k as pass@k.
    """
    greedy = sample(model, prompt_ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                    greedy=True, batch_size=batch_size)
    scores = _score(score_fn, greedy)
    scored = [s for s in scores if not math.isnan(s)]
    extra = {
        "unscored": float(len(scores) - len(scored)),
        "truncated": _mean([float(t) for t in greedy.truncated]),
    }
    if extra_fn is not None:  # other metrics of the greedy completions (format adherence, ...), NaN excluded
        for name, values in extra_fn(list(greedy.prompt_index), list(greedy.completion_ids)).items():
            extra[name] = _mean([float(v) for v in values if not math.isnan(float(v))])
    pass_table: dict[int, float] = {}
    if samples > 0:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        sampled = sample(model, prompt_ids, num_samples=samples, max_new_tokens=max_new_tokens, temperature=temperature,
                         stop_ids=stop_ids, pad_id=pad_id, generator=generator, batch_size=batch_size)
        sample_scores = _score(score_fn, sampled)
        sample_scored = [s for s in sample_scores if not math.isnan(s)]
        pass_table = _pass_at_k_table(sampled.prompt_index, sample_scores, pass_k_values(samples))
        extra["unscored_samples"] = float(len(sample_scores) - len(sample_scored))
        extra["sample_accuracy"] = _mean(sample_scored)
        extra["sample_response_len"] = _mean([float(len(c)) for c in sampled.completion_ids])
        if answer_fn is not None:
            answers = answer_fn(list(sampled.prompt_index), list(sampled.completion_ids))
            per_prompt: dict[int, tuple[list, list]] = {}
            for i, a, sc in zip(sampled.prompt_index, answers, sample_scores):
                per_prompt.setdefault(i, ([], []))
                per_prompt[i][0].append(a)
                per_prompt[i][1].append(sc)
            for k in pass_k_values(samples):
                extra[f"maj@{k}"] = _mean([maj_at_k(a, sc, k) for a, sc in per_prompt.values()])
    return EvalResult(
        n=len(prompt_ids),
        accuracy=_mean(scored),
        pass_at_k=pass_table,
        mean_response_len=_mean([float(len(c)) for c in greedy.completion_ids]),
        extra=extra,
    )
