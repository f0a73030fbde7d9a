"""Experience: demonstrations and rollouts turned into the padded tensors the estimator reads.

All token tensors are (N, T), right-padded and aligned with `input_ids`: position t of `loss_mask`,
`advantages`, `old_logp`, ... refers to token t. Masks come from lengths, never from `id == pad`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass
class Batch:
    input_ids: Tensor  # (N, T) long
    attention_mask: Tensor  # (N, T) long, 1 on real tokens
    loss_mask: Tensor  # (N, T) float, 1 on tokens the loss may touch
    advantages: Tensor  # (N, T) float
    old_logp: Optional[Tensor] = None  # (N, T) log q, None when q = sg(p) (one update per batch)
    ref_logp: Optional[Tensor] = None  # (N, T) log b for a KL term in the loss
    sampler_logp: Optional[Tensor] = None  # (N, T) the sampler's log-probs, only to log the mismatch

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: Tensor | slice) -> "Batch":
        """Rows `idx`, trimmed to their longest real length (less padding per micro-batch)."""
        kw = {f.name: (getattr(self, f.name)[idx] if getattr(self, f.name) is not None else None) for f in fields(self)}
        t = int(kw["attention_mask"].sum(1).max().item()) if kw["attention_mask"].numel() else 0
        return Batch(**{k: (v[:, :t] if v is not None else None) for k, v in kw.items()})

    def to(self, device: str | torch.device) -> "Batch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})


def _pad(rows: Sequence[Sequence[float]], value: float, dtype: torch.dtype) -> Tensor:
    t = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), t), value, dtype=dtype)  # (N, T)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(r, dtype=dtype)
    return out


def demo_batch(examples: Sequence, pad_id: int, dtype: torch.dtype = torch.float32) -> Batch:
    """Demonstrations (objects with input_ids, loss_mask) -> Batch with A = 1 on supervised tokens."""
    ids = _pad([e.input_ids for e in examples], pad_id, torch.long)
    attn = _pad([[1] * len(e.input_ids) for e in examples], 0, torch.long)
    mask = _pad([e.loss_mask for e in examples], 0, dtype)
    mask[:, 0] = 0  # token 0 has no prediction (no logp)
    return Batch(ids, attn, mask, mask.clone())


def rollout_batch(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    advantages: Tensor,
    valid: Tensor,
    pad_id: int,
    sampler_logp: Sequence[Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Batch:
    """Rollouts -> Batch. advantages: (N,) sequence-level or (N, Tc) token-level over completion tokens;
    valid (N,) bool: False rows (reward error, filtered, truncated-and-masked) get no gradient."""
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    ids = _pad(seqs, pad_id, torch.long)
    attn = _pad([[1] * len(s) for s in seqs], 0, torch.long)
    n, t = ids.shape
    mask = torch.zeros(n, t, dtype=dtype)
    adv = torch.zeros(n, t, dtype=dtype)
    slp = torch.zeros(n, t, dtype=dtype) if sampler_logp is not None else None
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        a, b = len(p), len(p) + len(c)
        if valid[i] and len(c):
            mask[i, a:b] = 1
        adv[i, a:b] = advantages[i] if advantages.dim() == 1 else advantages[i, : len(c)].to(dtype)
        if slp is not None:
            slp[i, a:b] = sampler_logp[i].to(dtype)
    return Batch(ids, attn, mask, adv * mask, sampler_logp=slp)
