"""The trainer's own path, from rows to the loss, driven by a tabular softmax policy (tests/oracle_policy.py).

The oracles call what the trainer calls: `load_recipe` (preset defaults + resolution), the experience
builder's gate/mix code (`Experience._add_demonstrations`), `collate`, `token_advantages`,
`ObjectiveSpec.from_stage`, `stream_counts` and `micro_loss`. Only the model is replaced: row r of a
collated batch takes its log-probs from tabular row `sel[r]`, whose position t (t >= 1) is token t.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from oracle_policy import DTYPE, TabularBatch, token_logp
from torch import Tensor

from posttrain.data.batch import DEMO, ROLLOUT, Batch, Row
from posttrain.data.encode import Encoded
from posttrain.objective.components import entropy_from_logits
from posttrain.objective.estimator import ObjectiveTerms, stream_counts
from posttrain.recipe import load_recipe
from posttrain.training.experience import Experience, _Rows, row_baselines, rows_to_batch, token_advantages
from posttrain.training.update import ObjectiveSpec, micro_loss

MAX_LEN = 8  # rollout.max_new_tokens and data.max_len: L_max of the CONST normaliser


def stage(method: str, **overrides) -> object:
    """The resolved stage of `method` as a recipe would give it (preset defaults, dotted overrides)."""
    st = {"method": method, "data": {"path": "x.jsonl", "max_len": MAX_LEN},
          "rollout": {"group_size": 4, "max_new_tokens": MAX_LEN}}
    from posttrain.objective.presets import get_preset

    if get_preset(method).needs_rewards:
        st["rewards"] = [{"fn": "exact"}]
    return load_recipe({"model": "m", "stages": [st]}, [f"stages.0.{k}={v}" for k, v in overrides.items()]).stages[0]


@dataclass
class Pool:
    """M tabular rows; row m has lengths[m] loss tokens at positions 1..lengths[m] (position 0 is the prompt)."""

    logits: Tensor  # (M, T, V) leaf
    tokens: Tensor  # (M, T)
    lengths: list[int]

    @classmethod
    def make(cls, lengths: list[int], vocab: int = 5, seed: int = 0, scale: float = 1.5) -> "Pool":
        T = max(lengths) + 1
        g = torch.Generator().manual_seed(seed)
        logits = (scale * torch.randn(len(lengths), T, vocab, generator=g, dtype=DTYPE)).requires_grad_(True)
        return cls(logits, torch.randint(0, vocab, (len(lengths), T), generator=g), list(lengths))

    def row(self, m: int, stream: int, group: int, **meta) -> Row:
        n = self.lengths[m]
        return Row(self.tokens[m, : n + 1].tolist(), [0] + [1] * n, stream, group, meta={"tab": m, **meta})

    def encoded(self, m: int) -> Encoded:
        n = self.lengths[m]
        return Encoded(self.tokens[m, : n + 1].tolist(), [0] + [1] * n)


class StubPaired:
    """PairedDemos for tabular rows: question k's demonstration is pool row demo_rows[k]."""

    def __init__(self, pool: Pool, demo_rows: dict[int, int]):
        self.pool, self.demo_rows = pool, demo_rows

    def get(self, key: int, row: dict) -> Encoded:
        return self.pool.encoded(self.demo_rows[key])


def experience(st, pool: Pool, demo_rows: dict[int, int] | None = None, n_questions: int = 2) -> Experience:
    """An Experience over `n_questions` prompt rows whose demonstrations are tabular pool rows."""
    return Experience(st, None, pad_id=0, rows=[{"prompt": f"q{k}"} for k in range(n_questions)],
                      paired=StubPaired(pool, demo_rows or {}), total_steps=100)


def scored_rows(pool: Pool, spec: list[tuple[int, int, int]], rewards: list[float]) -> _Rows:
    """Scored rows (pool row, stream, question) with their rewards, as the sampler and scorer leave them."""
    part = _Rows()
    for (m, stream, q), r in zip(spec, rewards):
        part.rows.append(pool.row(m, stream, q, key=q))
        part.rewards.append(r)
        part.scored.append(True)
        part.free.append(stream == ROLLOUT)
    return part


def demo_rows(pool: Pool, rows: list[int]) -> _Rows:
    """Pool rows as unscored demonstrations, one group each (what an SFT stage's batch holds)."""
    part = _Rows()
    for j, m in enumerate(rows):
        part.rows.append(pool.row(m, DEMO, 1000 + j, key=0))
        part.rewards.append(float("nan"))
        part.scored.append(False)
        part.free.append(False)
    return part


@dataclass
class TrainerBatch:
    batch: Batch
    sel: list[int]  # pool row of each batch row
    pool: Pool

    @property
    def logits(self) -> Tensor:
        """(N, T, V) the batch rows' logits, views of the pool's leaf (gradients land there)."""
        return self.pool.logits[self.sel][:, : self.batch.input_ids.shape[1]]

    def tab(self) -> TabularBatch:
        return TabularBatch(self.logits, self.batch.input_ids, self.batch.loss_mask.to(DTYPE))

    @property
    def logp(self) -> Tensor:
        return token_logp(self.logits, self.batch.input_ids) * (self.batch.attention_mask > 0)


def build(st, part: _Rows, pool: Pool, *, exp: Experience | None = None, step: int = 0,
          demo_rows: dict[int, int] | None = None, values: dict | None = None) -> TrainerBatch:
    """Rows -> Batch as `Experience._rollouts` finishes a step: gates and extra demonstrations
    (`_add_demonstrations`), then what `_assemble` does without a model (`rows_to_batch`, `token_advantages`);
    stages that read q or b get them, and their advantages again, from `with_logps`."""
    exp = exp or experience(st, pool, demo_rows)
    mix = exp._add_demonstrations(part, step, 100, {} if values is None else values)
    batch = rows_to_batch(part.rows, part.rewards, part.scored, mix, 0, DTYPE)
    if not (st.kl.beta and st.kl.placement == "reward"):  # else they need q and b: see with_logps
        batch.advantages, _ = token_advantages(batch, torch.tensor(part.rewards, dtype=DTYPE), st,
                                               baseline=row_baselines(part.rows))
    rows = part.rows
    sel = [r.meta["tab"] if "tab" in r.meta else (demo_rows or {}).get(r.meta.get("key"), -1) for r in rows]
    return TrainerBatch(batch, sel, pool)


def with_logps(tb: TrainerBatch, st, rewards: list[float], old_logp: Tensor | None, ref_logp: Tensor | None
               ) -> None:
    """Set q and b on the batch (and recompute advantages, which read them when the KL is in the reward)."""
    tb.batch.old_logp, tb.batch.ref_logp = old_logp, ref_logp
    if st.advantage.kind == "gae":  # PPO: a critic's values, away from 0 and different on every token
        g = torch.Generator().manual_seed(11)
        tb.batch.values = 0.5 * torch.randn(tb.batch.loss_mask.shape, generator=g, dtype=DTYPE) * tb.batch.loss_mask
    if st.kl.beta and st.kl.placement == "reward" or st.advantage.kind == "gae":
        tb.batch.advantages, _ = token_advantages(tb.batch, torch.tensor(rewards, dtype=DTYPE), st)


def loss(tb: TrainerBatch, st) -> ObjectiveTerms:
    """The trainer's loss of the whole batch (one micro-batch) under the tabular policy."""
    spec = ObjectiveSpec.from_stage(st)
    b = tb.batch
    counts = stream_counts(b.loss_mask, b.token_stream(), spec.streams, joint=spec.joint)
    entropy = entropy_from_logits(tb.logits) if spec.with_entropy else None
    if entropy is not None:
        entropy = entropy * (b.attention_mask > 0)
    return micro_loss(tb.logp, entropy, b, spec, counts)


__all__ = ["token_logp", "DEMO", "ROLLOUT", "MAX_LEN", "Pool", "stage", "experience", "scored_rows", "build", "with_logps", "loss"]
