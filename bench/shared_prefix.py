"""What sharing each group's prompt would save in the RL training pass (a measurement for a path posttrain does
not have yet): forward + backward of the completions' log-probs, G prompts x K completions, laid out two ways.

  padded   K rows per prompt, the prompt repeated in each (what posttrain's training pass runs today)
  shared   one row per prompt: [prompt, completion 1, ..., completion K] under a 4-D tree mask (each completion
           sees the prompt and itself, causally), positions restarting after the prompt for each completion; a
           completion's first token is read from the prompt's last position

Both give the same log-probs (the largest difference is printed). One JSON line:

    python -m bench.shared_prefix --size small [--prompts 8 --group 4 --prompt-len 22 --completion-len 32]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from .assets import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=22)
    ap.add_argument("--completion-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=6)
    a = ap.parse_args()
    torch.set_num_threads(2)
    model = build_model(None, a.size, vocab_size=1024)
    G, K, P, C = a.prompts, a.group, a.prompt_len, a.completion_len
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, 1024, (G, P), generator=gen)
    comps = torch.randint(5, 1024, (G, K, C), generator=gen)

    ids_a = torch.cat([prompts.repeat_interleave(K, 0), comps.reshape(G * K, C)], 1)

    def padded() -> torch.Tensor:
        logits = model(input_ids=ids_a, attention_mask=torch.ones_like(ids_a), use_cache=False).logits[:, P - 1:-1]
        return torch.log_softmax(logits.float(), -1).gather(-1, ids_a[:, P:, None])[..., 0]  # (G K, C)

    L = P + K * C
    ids_b = torch.cat([prompts, comps.reshape(G, K * C)], 1)
    pos = torch.cat([torch.arange(P), (P + torch.arange(C)).repeat(K)])
    seg = torch.cat([torch.zeros(P, dtype=torch.long), torch.arange(1, K + 1).repeat_interleave(C)])
    q, k = torch.arange(L)[:, None], torch.arange(L)[None, :]
    tree = ((k <= q) & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None])))[None, None].expand(G, 1, L, L)
    pred = torch.stack([torch.where(torch.arange(C) == 0, P - 1, P + j * C + torch.arange(C) - 1) for j in range(K)])

    def shared() -> torch.Tensor:
        h = model.model(input_ids=ids_b, attention_mask=tree, position_ids=pos[None].expand(G, L),
                        use_cache=False).last_hidden_state
        logits = model.lm_head(h[:, pred.reshape(-1)])  # (G, K C, V): each token's predictor
        return torch.log_softmax(logits.float(), -1).gather(-1, comps.reshape(G, K * C, 1))[..., 0].reshape(G * K, C)

    with torch.no_grad():
        diff = float((padded() - shared()).abs().max())

    def seconds(f) -> float:
        times = []
        for _ in range(a.repeats):
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            f().sum().backward()
            times.append(time.perf_counter() - t)
        return sorted(times[1:])[len(times[1:]) // 2]  # the median after a warm-up

    t_padded, t_shared = seconds(padded), seconds(shared)
    print(json.dumps({"bench": "shared_prefix", "model": a.size, "prompts": G, "group": K, "prompt_len": P,
                      "completion_len": C, "tokens_padded": G * K * (P + C), "tokens_shared": G * L,
                      "padded_s": round(t_padded, 4), "shared_s": round(t_shared, 4),
                      "speedup": round(t_padded / t_shared, 3), "max_logp_diff": diff}))


if __name__ == "__main__":
    main()
