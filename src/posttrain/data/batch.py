"""Experience as padded tensors: the one `Batch` every method's update reads (DESIGN.md §2).

A batch is built from rows of one or more **streams**. Each row carries its `stream` (how its tokens are
treated: a demonstration or a policy rollout) and its `group` (the question it answers). Group statistics
(z-scores, leave-one-out, HPT's accuracy, dynamic sampling) are computed from `group`, never from row
order, and `Batch.split` / `Batch.minibatches` keep every group whole.

Token tensors are (N, T), right-padded and aligned with `input_ids`: position t of `loss_mask`,
`advantages`, `old_logp`, ... refers to token t. Masks come from lengths, never from `id == pad`.
A rollout that continues a demonstration prefix (prefix-guided RL) marks the copied tokens in
`prefix_mask`; those tokens form the PREFIX token stream.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field, fields, replace
from typing import Optional, Sequence

import torch
from torch import Tensor

DEMO, ROLLOUT, PREFIX = 0, 1, 2  # token streams; rows are DEMO or ROLLOUT, PREFIX marks copied tokens
STREAMS = ("demo", "rollout", "prefix")


@dataclass
class Batch:
    input_ids: Tensor  # (N, T) long
    attention_mask: Tensor  # (N, T) long, 1 on real tokens
    loss_mask: Tensor  # (N, T) float, 1 on tokens the loss may touch
    advantages: Tensor  # (N, T) float
    group: Tensor  # (N,) long: the question a row belongs to
    stream: Tensor  # (N,) long: DEMO or ROLLOUT
    mix: Tensor  # (N,) float: the mixer's weight of each row (1 unless a mixer says otherwise)
    prefix_mask: Optional[Tensor] = None  # (N, T) float, 1 on demonstration tokens a rollout continued from
    old_logp: Optional[Tensor] = None  # (N, T) log q, None when q = sg(p) (one update per batch)
    ref_logp: Optional[Tensor] = None  # (N, T) log b for a KL term
    sampler_logp: Optional[Tensor] = None  # (N, T) the sampler's log-probs, only to log the mismatch
    pair_sign: Optional[Tensor] = None  # (N,) preference pairs: +1 on the chosen row, -1 on the rejected one
    #                                      (KTO: +1 on a desirable response, -1 on an undesirable one)
    ref_point: Optional[Tensor] = None  # (N,) KTO's batch reference point z0, the same on every row
    teacher_logp: Optional[Tensor] = None  # (N, T) a teacher's log-probs of the tokens (on-policy distillation)
    teacher_ids: Optional[Tensor] = None  # (N, T, K) long: the teacher's K most likely tokens at each position (KD)
    teacher_probs: Optional[Tensor] = None  # (N, T, K) ... and their probabilities under the teacher
    values: Optional[Tensor] = None  # (N, T) the critic's V(s_t) when the batch was built (PPO)
    returns: Optional[Tensor] = None  # (N, T) GAE's returns G_t = A_t + V(s_t), the critic's targets (PPO)
    position_ids: Optional[Tensor] = None  # (N, T) long, packed rows only: 0, 1, ... restarting at each document

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def token_stream(self) -> Tensor:
        """(N, T) long: each token's stream (a row's stream, PREFIX on copied demonstration tokens)."""
        ts = self.stream[:, None].expand_as(self.input_ids).clone()
        if self.prefix_mask is not None:
            ts[self.prefix_mask > 0] = PREFIX
        return ts

    def select(self, idx: Tensor | slice | list) -> "Batch":
        """Rows `idx`, trimmed to their longest real length (less padding per micro-batch)."""
        if isinstance(idx, list):
            idx = torch.as_tensor(idx, dtype=torch.long)
        kw = {f.name: (getattr(self, f.name)[idx] if getattr(self, f.name) is not None else None) for f in fields(self)}
        t = int(kw["attention_mask"].sum(1).max().item()) if kw["attention_mask"].numel() else 0
        return Batch(**{k: (v[:, :t] if v is not None and v.dim() >= 2 else v) for k, v in kw.items()})

    def to(self, device: str | torch.device) -> "Batch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})

    # ---- splits that keep groups whole ---------------------------------------------------------------

    def _groups(self, order: Sequence[int] | None = None) -> list[Tensor]:
        """Row indices of each group, groups in first-appearance order (or the order given)."""
        uniq, inverse = torch.unique(self.group, return_inverse=True)
        rows = [torch.nonzero(inverse == g).flatten() for g in range(len(uniq))]
        rows.sort(key=lambda r: int(r[0]))
        return [rows[i] for i in order] if order is not None else rows

    def share(self, rank: int, size: int) -> Tensor:
        """Rank `rank`'s rows of `size` ranks: consecutive whole groups, a group going to the rank where its first
        row falls when the rows are cut into `size` equal spans (a rank may get none)."""
        if size == 1:
            return torch.arange(self.size)
        mine = [g for g in self._groups() if min(size - 1, int(g[0]) * size // max(self.size, 1)) == rank]
        return torch.cat(mine) if mine else torch.zeros(0, dtype=torch.long)

    def split(self, max_rows: int) -> list[Tensor]:
        """Micro-batches: consecutive whole groups packed up to `max_rows` rows (a larger group goes alone)."""
        chunks, cur, n = [], [], 0
        for g in self._groups():
            if cur and n + len(g) > max_rows:
                chunks.append(torch.cat(cur))
                cur, n = [], 0
            cur.append(g)
            n += len(g)
        if cur:
            chunks.append(torch.cat(cur))
        return chunks

    def minibatches(self, k: int, generator: torch.Generator | None = None) -> list[Tensor]:
        """`k` minibatches of whole groups in a random group order, as equal in rows as groups allow."""
        groups = self._groups()
        order = torch.randperm(len(groups), generator=generator).tolist() if generator is not None \
            else list(range(len(groups)))
        k = min(k, len(groups))
        target = self.size / k
        parts: list[list[Tensor]] = [[] for _ in range(k)]
        done = 0
        for i in order:
            j = min(int(done // target), k - 1)
            parts[j].append(groups[i])
            done += len(groups[i])
        return [torch.cat(p) for p in parts if p]


def cat_batches(batches: Sequence[Batch], pad_id: int) -> Batch:
    """Rows of several batches in one (token tensors right-padded to the widest)."""
    width = max(b.input_ids.shape[1] for b in batches)

    def pad(t: Tensor | None, value: float, like: Tensor, dtype) -> Tensor:
        t = torch.zeros(like.shape, dtype=dtype) if t is None else t
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    out = {}
    for f in fields(Batch):
        vals = [getattr(b, f.name) for b in batches]
        if all(v is None for v in vals):
            out[f.name] = None
        elif vals[0] is not None and vals[0].dim() == 1:
            out[f.name] = torch.cat(vals)
        else:
            dtype = next(v.dtype for v in vals if v is not None)
            value = pad_id if f.name == "input_ids" else 0
            out[f.name] = torch.cat([pad(v, value, b.input_ids, dtype) for v, b in zip(vals, batches)])
    return Batch(**out)


# ---- rows -> Batch ----------------------------------------------------------------------------------


@dataclass
class Row:
    """One row of experience before padding."""

    input_ids: list[int]  # (L,)
    loss_mask: list[int]  # (L,) 1 on tokens the loss may touch
    stream: int  # DEMO or ROLLOUT
    group: int
    prefix_len: int = 0  # ROLLOUT rows: leading loss tokens copied from a demonstration
    sampler_logp: Optional[Tensor] = None  # (number of sampled tokens,), the tokens after the prefix
    truncated: bool = False
    valid: bool = True  # False: kept in the batch (its group's shape) but no token gets a gradient
    meta: dict = field(default_factory=dict)  # prompt / row key / completion ids (for rewards and logs)

    def completion_span(self) -> tuple[int, int]:
        """[start, end) of the loss tokens (the first and past-the-last supervised position)."""
        ones = [i for i, m in enumerate(self.loss_mask) if m]
        return (ones[0], ones[-1] + 1) if ones else (len(self.input_ids), len(self.input_ids))


def _pad(rows: Sequence[Sequence[float]], value: float, dtype: torch.dtype) -> Tensor:
    t = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), t), value, dtype=dtype)  # (N, T)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(r, dtype=dtype)
    return out


def collate(rows: Sequence[Row], pad_id: int, dtype: torch.dtype = torch.float32) -> Batch:
    """Rows -> Batch with A = 0 (advantages are assigned later) and mix = 1. Token 0 is never a loss token
    (it has no predicting distribution)."""
    ids = _pad([r.input_ids for r in rows], pad_id, torch.long)
    attn = _pad([[1] * len(r.input_ids) for r in rows], 0, torch.long)
    mask = _pad([r.loss_mask if r.valid else [0] * len(r.loss_mask) for r in rows], 0, dtype)
    if mask.numel():
        mask[:, 0] = 0
    prefix = None
    if any(r.prefix_len for r in rows):
        prefix = torch.zeros_like(mask)
        for i, r in enumerate(rows):
            if r.prefix_len:
                start, _ = r.completion_span()
                prefix[i, start: start + r.prefix_len] = mask[i, start: start + r.prefix_len]
    slp = None
    if any(r.sampler_logp is not None for r in rows):
        slp = torch.zeros_like(mask)
        for i, r in enumerate(rows):
            if r.sampler_logp is not None and len(r.sampler_logp):
                start = r.completion_span()[0] + r.prefix_len
                slp[i, start: start + len(r.sampler_logp)] = r.sampler_logp.to(dtype)
    return Batch(ids, attn, mask, torch.zeros_like(mask), group=torch.tensor([r.group for r in rows], dtype=torch.long),
                 stream=torch.tensor([r.stream for r in rows], dtype=torch.long),
                 mix=torch.ones(len(rows), dtype=dtype), prefix_mask=prefix, sampler_logp=slp)


def demo_batch(examples: Sequence, pad_id: int, dtype: torch.dtype = torch.float32) -> Batch:
    """Demonstrations (objects with input_ids, loss_mask) -> Batch with A = 1 on supervised tokens, one group each."""
    b = collate([Row(list(e.input_ids), list(e.loss_mask), DEMO, i) for i, e in enumerate(examples)], pad_id, dtype)
    b.advantages = b.loss_mask.clone()
    return b


def packed_demo_batch(examples: Sequence, pad_id: int, pack_len: int, dtype: torch.dtype = torch.float32) -> Batch:
    """Demonstrations packed into rows of at most `pack_len` tokens (in order, each into the first row with room;
    a longer one alone), A = 1 on supervised tokens: the same tokens as `demo_batch` with less padding."""
    bins: list[list] = []
    for e in examples:
        room = next((b for b in bins if sum(len(x.input_ids) for x in b) + len(e.input_ids) <= pack_len), None)
        bins.append([e]) if room is None else room.append(e)
    return packed_rows_batch(bins, pad_id, dtype)


def best_fit_rows(lengths: Sequence[int], pack_len: int) -> list[list[int]]:
    """Best-fit decreasing: indices of `lengths` in rows of at most `pack_len` tokens, longest first, each into the
    row it leaves least room in (a longer one alone). Deterministic (ties by index)."""
    rooms: list[tuple[int, int]] = []  # (room left, row), sorted
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        at = bisect.bisect_left(rooms, (n, -1))
        if at == len(rooms):
            rows.append([i])
            room, r = pack_len - n, len(rows) - 1
        else:
            room, r = rooms.pop(at)
            rows[r].append(i)
            room -= n
        if room > 0:
            bisect.insort(rooms, (room, r))
    return rows


def packed_rows_batch(bins: Sequence[Sequence], pad_id: int, dtype: torch.dtype = torch.float32) -> Batch:
    """Rows of demonstrations (objects with input_ids, loss_mask), each row's documents one after another, A = 1 on
    supervised tokens.

    `position_ids` restart at 0 at each document, which is how the model keeps documents apart: transformers
    builds a per-document causal mask from them when no attention mask is given (`logprobs.token_logprobs`). A
    document's first token is never a loss token (its predictor would be the previous document's last token).
    Each packed row is its own group; per-sequence statistics do not survive packing (token aggregation only).
    """
    rows, positions = [], []
    for i, docs in enumerate(bins):
        ids = [t for d in docs for t in d.input_ids]
        mask = [m if j else 0 for d in docs for j, m in enumerate(d.loss_mask)]
        rows.append(Row(ids, mask, DEMO, i))
        positions.append([j for d in docs for j in range(len(d.input_ids))])
    b = collate(rows, pad_id, dtype)
    width = b.input_ids.shape[1]
    # the padding tail counts on from 0 as a document of its own, so it never attends into the last real one
    b.position_ids = torch.tensor([p + list(range(width - len(p))) for p in positions], dtype=torch.long)
    b.advantages = b.loss_mask.clone()
    return b


def pair_batch(pairs: Sequence, pad_id: int, dtype: torch.dtype = torch.float32, stream: int = DEMO) -> Batch:
    """Preference pairs ((chosen, rejected) objects with input_ids, loss_mask) -> Batch: rows 2k (chosen) and
    2k + 1 (rejected) form group k; A = 0 until the update computes it from the forward pass. `stream`: DEMO
    for a dataset's pairs, ROLLOUT for pairs of the policy's own samples (online DPO)."""
    rows = [Row(list(e.input_ids), list(e.loss_mask), stream, k) for k, pair in enumerate(pairs) for e in pair]
    b = collate(rows, pad_id, dtype)
    b.pair_sign = torch.tensor([1.0, -1.0] * len(pairs), dtype=dtype)
    return b


def unpaired_batch(items: Sequence, pad_id: int, dtype: torch.dtype = torch.float32) -> Batch:
    """Unpaired responses ((encoded, desirable) items) -> Batch: one group each, pair_sign +1 / -1 by label."""
    b = collate([Row(list(e.input_ids), list(e.loss_mask), DEMO, k) for k, (e, _) in enumerate(items)], pad_id, dtype)
    b.pair_sign = torch.tensor([1.0 if good else -1.0 for _, good in items], dtype=dtype)
    return b


def mismatched(items: Sequence) -> list:
    """KTO's mismatched pairs: the prompt of item i with the response of item i + 1 (cyclic), as encoded rows
    (objects with input_ids and loss_mask), for the batch's reference point."""
    from .encode import Encoded

    out = []
    for i, (e, _) in enumerate(items):
        nxt = items[(i + 1) % len(items)][0]
        a, c = e.loss_mask.index(1), nxt.loss_mask.index(1)
        out.append(Encoded(list(e.input_ids[:a]) + list(nxt.input_ids[c:]), [0] * a + list(nxt.loss_mask[c:])))
    return out


def rollout_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], advantages: Tensor,
                  valid: Tensor, pad_id: int, group: Sequence[int] | None = None, dtype: torch.dtype = torch.float32,
                  ) -> Batch:
    """Rollouts -> Batch. advantages (N,) per sequence; valid (N,) bool: False rows get no loss tokens.
    `group` defaults to one group per row."""
    group = list(range(len(prompt_ids))) if group is None else list(group)
    rows = [Row(list(p) + list(c), [0] * len(p) + [1] * len(c), ROLLOUT, g, valid=bool(v))
            for p, c, v, g in zip(prompt_ids, completion_ids, valid.tolist(), group)]
    b = collate(rows, pad_id, dtype)
    b.advantages = advantages.to(dtype)[:, None] * b.loss_mask
    return b
