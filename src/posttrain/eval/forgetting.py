"""Forgetting: how far a trained policy moved from its base, measured on held-out data.

KL(policy || base) on held-out prompts: completions are sampled from the policy (temperature 1), and at
every generated position the exact KL between the two models' next-token distributions is summed over
the whole vocabulary,

    KL_t = sum_v pi(v | s_t) * (log pi(v | s_t) - log b(v | s_t)),

so the estimate has no per-token sampling noise (only the states s_t are sampled). Reported per token
(mean over generated positions) and per sequence (mean over completions of the sum over its positions),
with the policy's mean token entropy on the same positions. The other measure, NLL drift on held-out
plain text, is `task_eval.mean_nll` before and after.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..data.batch import Row, collate
from ..rollout.sampler import sample


@torch.no_grad()
def kl_to_base(policy, base, prompt_ids: Sequence[Sequence[int]], *, stop_ids: Sequence[int], pad_id: int,
               max_new_tokens: int, seed: int = 0, batch_size: int = 32) -> dict[str, float]:
    """{"kl_token", "kl_seq", "entropy", "n", "tokens"} of `policy` against `base` on completions sampled from
    the policy for each prompt (one each). Both models must share the tokenizer; the base may be the policy."""
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    ro = sample(policy, [list(p) for p in prompt_ids], max_new_tokens=max_new_tokens, temperature=1.0,
                stop_ids=stop_ids, pad_id=pad_id, generator=generator, batch_size=batch_size)
    rows = [Row(list(p) + list(c), [0] * len(p) + [1] * len(c), 1, i)
            for i, (p, c) in enumerate(zip(ro.prompt_ids, ro.completion_ids))]
    batch = collate(rows, pad_id)
    kl_sum, ent_sum, tokens, per_seq = 0.0, 0.0, 0.0, []
    was = (policy.training, base.training)
    policy.eval()
    base.eval()
    try:
        for start in range(0, batch.size, batch_size):
            mb = batch.select(slice(start, start + batch_size)).to(device)
            kw = dict(input_ids=mb.input_ids, attention_mask=mb.attention_mask)
            lp = torch.log_softmax(policy(**kw).logits[:, :-1].float(), -1)  # (B, T-1, V): predicts token t+1
            lb = torch.log_softmax(base(**kw).logits[:, :-1].float(), -1)
            m = mb.loss_mask[:, 1:]  # (B, T-1): positions that generated a completion token
            p = lp.exp()
            kl = (p * (lp - lb)).sum(-1) * m  # (B, T-1)
            ent = -(p * lp).sum(-1) * m
            kl_sum += float(kl.sum())
            ent_sum += float(ent.sum())
            tokens += float(m.sum())
            per_seq += kl.sum(1).tolist()
    finally:
        policy.train(was[0])
        base.train(was[1])
    n_tok = max(tokens, 1.0)
    return {"kl_token": kl_sum / n_tok, "kl_seq": sum(per_seq) / max(len(per_seq), 1), "entropy": ent_sum / n_tok,
            "n": len(per_seq), "tokens": int(tokens)}
