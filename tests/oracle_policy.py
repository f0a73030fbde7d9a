"""A tabular softmax policy for exact gradient oracles (research/algorithms.md §6).

Every response position (i, t) owns an independent row of logits z_it (V,), the parameters. Hence
log p_it = log_softmax(z_it)[y_it] and grad_{z_it} log p_it = e_{y_it} - p_it exactly, with no coupling
between positions: a per-token gradient coefficient c_it can be read straight off the gradient row.

Everything is float64 so identities hold to rtol 1e-9 / atol 1e-12. The helpers here are plain
references written from the formulas, independent of `posttrain.objective`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DTYPE = torch.float64
RTOL, ATOL = 1e-9, 1e-12

# log r offsets cycled over the tokens of `old_logp`: some tokens clip at eps 0.2 (|d| = 0.5, 2), some
# sit between 1 + 0.2 and 1 + 0.28 (0.22, to tell eps_high from eps_low), some truncate at eps_max 5
# (d = 2, r = 7.39), none lies on a clip boundary.
LOG_RATIO_CYCLE = (0.5, -0.1, 0.22, -0.5, 2.0, 0.1, -2.0, -0.25)


def assert_close(actual: Tensor, expected: Tensor, msg: str = "") -> None:
    """The exact-relation tolerance of these oracles (rtol 1e-9, atol 1e-12); raises AssertionError."""
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{msg}\n{m}")


@dataclass
class TabularBatch:
    """N sequences of T positions over a vocabulary of V tokens, right padded to ragged lengths."""

    logits: Tensor  # (N, T, V) leaf, requires grad: the parameters
    tokens: Tensor  # (N, T) long
    mask: Tensor  # (N, T) float64, 1 on the first lengths[i] positions

    @property
    def logp(self) -> Tensor:
        """log p_it of the sampled token, differentiable, (N, T)."""
        return token_logp(self.logits, self.tokens)

    @property
    def probs(self) -> Tensor:
        """p_it(v) detached, (N, T, V)."""
        return torch.softmax(self.logits.detach(), dim=-1)

    @property
    def num_tokens(self) -> float:
        return float(self.mask.sum())

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(1)  # (N,)


def ragged_mask(lengths: list[int], T: int) -> Tensor:
    """(N, T) float64 with ones on positions t < lengths[i]."""
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(DTYPE)


def make_batch(lengths: list[int], *, T: int | None = None, vocab: int = 5, seed: int = 0,
               scale: float = 1.5) -> TabularBatch:
    """Random logits ~ N(0, scale^2) and tokens; positions past lengths[i] are padding."""
    T = max(lengths) if T is None else T
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(len(lengths), T, vocab, generator=g, dtype=DTYPE)).requires_grad_(True)
    tokens = torch.randint(0, vocab, (len(lengths), T), generator=g)
    return TabularBatch(logits, tokens, ragged_mask(lengths, T))


def token_logp(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[tokens]: (..., V), (...) -> (...)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def grad_log_p(batch: TabularBatch) -> Tensor:
    """Analytic grad_{z_it} log p_it = e_{y_it} - p_it, (N, T, V)."""
    onehot = torch.nn.functional.one_hot(batch.tokens, batch.logits.shape[-1]).to(DTYPE)
    return onehot - batch.probs


def grad(loss: Tensor, params: Tensor) -> Tensor:
    """d loss / d params by autograd (the graph is kept so one batch serves several losses)."""
    (g,) = torch.autograd.grad(loss, params, retain_graph=True)
    return g


def log_ratio_offsets(N: int, T: int, start: int = 0) -> Tensor:
    """(N, T) offsets d with old_logp = logp - d, i.e. r = exp(d), cycling LOG_RATIO_CYCLE."""
    k = torch.arange(N * T).reshape(N, T) + start
    cycle = torch.tensor(LOG_RATIO_CYCLE, dtype=DTYPE)
    return cycle[k % len(cycle)]


# ---- reference aggregations, written from algorithms.md §4 (x and mask (N, T) -> scalar) ----------


def agg_tok(x: Tensor, mask: Tensor) -> Tensor:
    """TOK: sum over every response token / number of response tokens."""
    return (x * mask).sum() / mask.sum()


def agg_seq(x: Tensor, mask: Tensor) -> Tensor:
    """SEQ: mean over sequences of the per-sequence token mean."""
    return ((x * mask).sum(1) / mask.sum(1)).mean()


def agg_const(x: Tensor, mask: Tensor, max_len: int) -> Tensor:
    """CONST: sum / (N * L_max) (Dr. GRPO)."""
    return (x * mask).sum() / (mask.shape[0] * max_len)


def agg_sum(x: Tensor, mask: Tensor) -> Tensor:
    """SUM: mean over sequences of the per-sequence token sum."""
    return (x * mask).sum(1).mean()


def aggregate(mode: str, x: Tensor, mask: Tensor, max_len: int) -> Tensor:
    if mode == "const":
        return agg_const(x, mask, max_len)
    return {"tok": agg_tok, "seq": agg_seq, "sum": agg_sum}[mode](x, mask)


# ---- reference advantages (rewards (P, G) -> (P, G)) ----------------------------------------------


def zscore_ref(R: Tensor, eps: float = 1e-4) -> Tensor:
    """(R - mean_G R) / (std_G R + eps) with torch's Bessel-corrected std."""
    return (R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + eps)


def center_ref(R: Tensor) -> Tensor:
    return R - R.mean(1, keepdim=True)


def loo_ref(R: Tensor) -> Tensor:
    """R_i - mean of the other G - 1 rewards of the group, by an explicit loop."""
    P, G = R.shape
    out = torch.empty_like(R)
    for p in range(P):
        for i in range(G):
            others = [R[p, j] for j in range(G) if j != i]
            out[p, i] = R[p, i] - sum(others) / (G - 1)
    return out


def kl_k3_ref(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = b/p - log(b/p) - 1, per token."""
    return torch.exp(ref_logp - logp) - (ref_logp - logp) - 1


def ppo_clip_ref(r: Tensor, A: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), per token or per sequence."""
    return torch.minimum(r * A, r.clamp(1 - eps_low, 1 + eps_high) * A)
