"""Evaluate a policy on a dataset or a built-in task split: greedy accuracy, pass@k, and the task's other
metrics (format adherence, step correctness) on the greedy completions. `plain` splits report NLL."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..data.encode import completion_text, encode_prompt
from .metrics import evaluate


def reward_metrics(model, tok, rows: list[dict], rewards: dict[str, Callable], primary: str, *, stop_ids, pad_id,
                   max_new_tokens: int, samples: int = 0, temperature: float = 1.0, seed: int = 0,
                   answer: Callable[[str], "str | None"] | None = None, threshold: float = 1.0,
                   keep: list | None = None) -> dict:
    """Generic evaluation of `rows` (prompt + answer columns): a completion is correct when the `primary` reward
    reaches `threshold` (accuracy, pass@k); `reward_mean` is that reward's mean over the greedy completions, and
    every other reward in `rewards` is averaged over them under its name. `answer` reads the answer out of a
    completion's text, for maj@k. `keep`, a list, receives every greedy completion: prompt, completion, reward."""
    prompts = [r["prompt"] for r in rows]
    prompt_ids = [encode_prompt(p, tok) for p in prompts]
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"} if rows else {}

    def call(fn, idx: list[int], comp_ids: list[list[int]]) -> list[float]:
        ps = [prompts[i] for i in idx]
        comps = [completion_text(p, c, tok) for p, c in zip(ps, comp_ids)]
        kw = {k: [v[i] for i in idx] for k, v in columns.items()}
        out = fn(ps, comps, completion_ids=comp_ids, **kw)
        return [float("nan") if v is None else float(v) for v in out]

    last: dict = {}  # the primary's raw values of the last scored completions (the greedy ones precede `extra`)

    def score(idx, comp_ids):
        last["raw"] = call(rewards[primary], idx, comp_ids)
        if keep is not None and "greedy" not in last:  # the first call scores the greedy completions
            last["greedy"] = True
            keep.extend({**{k: v for k, v in rows[i].items() if k != "prompt"}, "prompt": prompts[i],
                         "completion": completion_text(prompts[i], c, tok), "reward": r}
                        for i, c, r in zip(idx, comp_ids, last["raw"]))
        return [float(v >= threshold) if not math.isnan(v) else v for v in last["raw"]]

    def extra(idx, comp_ids):
        out = {name: call(fn, idx, comp_ids) for name, fn in rewards.items() if name != primary}
        return {**out, "reward_mean": last["raw"]}

    def answers(idx, comp_ids):
        return [answer(tok.decode(list(c), skip_special_tokens=True)) for c in comp_ids]

    res = evaluate(model, prompt_ids, score, stop_ids=stop_ids, pad_id=pad_id, max_new_tokens=max_new_tokens,
                   samples=samples, temperature=temperature, seed=seed, extra_fn=extra,
                   answer_fn=answers if answer is not None else None)
    return res.to_dict()


def load_eval_rows(path, tok, *, answer_column: str | None = None, origin: str = "the model") -> list[dict]:
    """Prompt rows to evaluate on, checked: every row valid (the first bad one is an error), the reference in
    `answer` (read from `answer_column` when given), and a chat template when prompts are chats."""
    from ..data import DataError, detect_format, load_rows, validate
    from ..rewards.builtin import completion_text as content

    rowset = load_rows(path)
    if answer_column:  # the reference answer sits in another column (e.g. completion)
        missing = [i + 1 for i, r in enumerate(rowset.rows) if answer_column not in r]
        if missing:
            raise DataError(rowset.origin, missing[0], answer_column, f"missing (the answer column; {len(missing)} "
                            "rows lack it)")
        rowset.rows = [{**r, "answer": content(r[answer_column])} for r in rowset.rows]
    validate(rowset, detect_format(rowset, ("prompt_answer", "prompt_only")))
    chat = next((i for i, r in enumerate(rowset.rows) if isinstance(r.get("prompt"), list)), None)
    if chat is not None and not getattr(tok, "chat_template", None):
        raise DataError(rowset.origin, rowset.number(chat), "prompt", f"is a chat (a list of messages), but the "
                        f"tokenizer of {origin} has no chat template; give it one, or use string prompts")
    return rowset.rows


def evaluate_data(model, tok, rows: list[dict], reward: str, *, threshold: float = 1.0, reward_timeout: float = 30.0,
                  keep: list | None = None, **common) -> dict:
    """`reward_metrics` on the user's rows, the verifier `reward` (a built-in name or module:function) running
    like a training reward: out of process, with a timeout; a sample it fails on is unscored."""
    from ..rewards import RewardScorer, RewardSpec

    with RewardScorer([RewardSpec(fn=reward)], timeout_s=reward_timeout) as scorer:
        def verifier(prompts, completions, completion_ids, **columns):
            batch = scorer(prompts, completions, columns=columns, completion_ids=completion_ids,
                           row_ids=list(range(len(prompts))))
            return [None if math.isnan(v) else v for v in batch.total.tolist()]

        return reward_metrics(model, tok, rows, {reward: verifier}, reward, threshold=threshold, keep=keep, **common)


@torch.no_grad()
def mean_nll(model, encoded: Sequence, pad_id: int, batch_size: int = 32) -> tuple[float, int]:
    """Mean negative log-likelihood per supervised token of encoded examples -> (nll, tokens)."""
    from ..data.batch import demo_batch
    from ..logprobs import token_logprobs

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for start in range(0, len(encoded), batch_size):
        b = demo_batch(encoded[start:start + batch_size], pad_id).to(device)
        lp, _ = token_logprobs(model, b.input_ids, b.attention_mask)
        total += float(-(lp.float() * b.loss_mask).sum())
        count += float(b.loss_mask.sum())
    model.train(was_training)
    return total / max(count, 1.0), int(count)


def _encode_all(rows: list[dict], fmt: str, tok) -> list:
    from ..data.encode import encode_sft

    return [encode_sft(r, fmt, tok) for r in rows]


def evaluate_task(model, tok, task: str, split: str, *, n: int, max_new_tokens: int, samples: int = 0,
                  temperature: float = 1.0, stop_ids, pad_id, seed: int = 0) -> dict:
    from ..tasks import get_task

    t = get_task(task)
    rows = t.rows(split)[:n]
    if rows and "text" in rows[0] and "prompt" not in rows[0]:  # held-out plain text: forgetting
        nll, tokens = mean_nll(model, _encode_all(rows, "text", tok), pad_id)
        return {"n": len(rows), "nll": nll, "tokens": tokens}
    out = reward_metrics(model, tok, rows, dict(t.rewards), t.primary, stop_ids=stop_ids, pad_id=pad_id,
                         max_new_tokens=max_new_tokens, samples=samples, temperature=temperature, seed=seed,
                         answer=t.answer)
    if rows and "messages" in rows[0]:  # likelihood of the held-out worked demonstrations
        out["demo_nll"], _ = mean_nll(model, _encode_all(rows, "messages", tok), pad_id)
    return out
