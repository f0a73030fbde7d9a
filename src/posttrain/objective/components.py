"""The interchangeable parts of the one estimator (DESIGN.md §1), as pure functions of tensors.

Shapes: N sequences, T token positions. Advantages, keyed by group ids, live in `advantages.py`;
the per-row stream weights (`mix`) in `mixers.py`.
Token tensors are aligned with `input_ids`: position t holds the quantity for predicting token t.
`mask` (N, T) is 1 on the tokens the loss may touch (response / demonstration tokens), else 0.
Everything here except `kl_penalty` and `entropy` runs under no-grad on detached inputs: these build
the detached coefficient c = W * mix * M * A * w of

    loss = - sum_{i,t} c_it * logp_it

Notation follows research/algorithms.md §0: p = pi_theta, q = pi_old, b = pi_ref, r = p / q.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# ----------------------------------------------------------------------------------------------
# Weights w = sg(p / D): the reference denominator. Inputs detached (N, T) log-probs.
# Each has a value form T(p) with w = p * T'(p), used for the logged surrogate.
# ----------------------------------------------------------------------------------------------


def weight_one(logp: Tensor, old_logp: Tensor, **_: float) -> Tensor:
    """D = p (current policy): w = 1. SFT, on-policy REINFORCE."""
    return torch.ones_like(logp)


def weight_ratio(logp: Tensor, old_logp: Tensor, **_: float) -> Tensor:
    """D = q (old / rollout policy): w = r = p / q. PPO, GRPO."""
    return torch.exp(logp - old_logp)


def weight_prob(logp: Tensor, old_logp: Tensor, **_: float) -> Tensor:
    """D = 1: w = p. DFT (the likelihood term is p itself)."""
    return torch.exp(logp)


def weight_shaped(logp: Tensor, old_logp: Tensor, *, shaping_gamma: float, **_: float) -> Tensor:
    """LUFFY policy shaping, T(p) = p / (p + gamma):  w = p T'(p) = gamma p / (p + gamma)^2."""
    p = torch.exp(logp)
    return shaping_gamma * p / (p + shaping_gamma) ** 2


def weight_phi(logp: Tensor, old_logp: Tensor, **_: float) -> Tensor:
    """CHORD-phi, T(p) = p - p^2 / 2:  w = p (1 - p)."""
    p = torch.exp(logp)
    return p * (1 - p)


def weight_truncated(logp: Tensor, old_logp: Tensor, *, eps_max: float, **_: float) -> Tensor:
    """CISPO: w = min(r, eps_max): the importance weight is truncated, never masked."""
    return torch.exp(logp - old_logp).clamp(max=eps_max)


def sequence_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO: s_i = exp((1/|y_i|) sum_t (logp - old_logp)), (N,)."""
    n = mask.sum(1).clamp(min=1)
    return torch.exp(((logp - old_logp) * mask).sum(1) / n)


def weight_seq_ratio(logp: Tensor, old_logp: Tensor, *, mask: Tensor, **_: float) -> Tensor:
    """GSPO: w_it = s_i on every token of sequence i (the 1/|y_i| comes from SEQ aggregation)."""
    return sequence_ratio(logp, old_logp, mask)[:, None].expand_as(logp)


WEIGHTS = {
    "one": weight_one,
    "ratio": weight_ratio,
    "prob": weight_prob,
    "shaped": weight_shaped,
    "phi": weight_phi,
    "truncated": weight_truncated,
    "seq_ratio": weight_seq_ratio,
}


def likelihood_value(kind: str, logp: Tensor, old_logp: Tensor, mask: Tensor, *, shaping_gamma: float,
                     eps_max: float) -> Tensor:
    """T(p) per token, the value whose gradient w * grad(logp) the weight stands for (for the logged loss)."""
    if kind == "one":
        return logp
    if kind == "ratio":
        return torch.exp(logp - old_logp)
    if kind == "prob":
        return torch.exp(logp)
    if kind == "shaped":
        p = torch.exp(logp)
        return p / (p + shaping_gamma)
    if kind == "phi":
        p = torch.exp(logp)
        return p - p * p / 2
    if kind == "seq_ratio":
        return sequence_ratio(logp, old_logp, mask)[:, None].expand_as(logp)
    if kind == "truncated":  # CISPO's own loss form: sg(min(r, eps_max)) * logp
        return weight_truncated(logp, old_logp, eps_max=eps_max) * logp
    raise ValueError(f"unknown weight {kind!r}; choose one of {', '.join(WEIGHTS)}")


# ----------------------------------------------------------------------------------------------
# Masks M: the stabilisation mask.
# ----------------------------------------------------------------------------------------------


def clip_mask(ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """PPO clip as a mask: 0 where the clipped branch of min(r A, clip(r, 1-eps_low, 1+eps_high) A) is active.

    That is (A > 0 and r > 1 + eps_high) or (A < 0 and r < 1 - eps_low): there the surrogate is flat in theta.
    ratio and advantages broadcast to (N, T); for sequence-level clip pass the (N, 1) sequence ratio.
    """
    clipped = ((advantages > 0) & (ratio > 1 + eps_high)) | ((advantages < 0) & (ratio < 1 - eps_low))
    return (~clipped).to(advantages.dtype)


def tv_mask(logp: Tensor, old_logp: Tensor, advantages: Tensor, delta: float) -> Tensor:
    """DPPO's divergence mask in place of the ratio clip: 0 where the sampled token's probability has already
    moved more than `delta` from the rollout policy's (|p - q|, the binary total-variation estimate) in the
    direction the advantage pushes it, (A > 0 and p - q > delta) or (A < 0 and q - p > delta); else 1."""
    diff = torch.exp(logp) - torch.exp(old_logp)
    out = ((advantages > 0) & (diff > delta)) | ((advantages < 0) & (-diff > delta))
    return (~out).to(advantages.dtype)


# ----------------------------------------------------------------------------------------------
# Aggregation W: how token terms are summed. Normalisers are global (the whole optimizer step), so
# gradient accumulation over micro-batches leaves the gradient unchanged.
# ----------------------------------------------------------------------------------------------

AGGREGATIONS = ("tok", "seq", "const", "sum", "pair")


def aggregation_weights(mask: Tensor, mode: str, *, num_tokens: float, num_seqs: float, max_len: int) -> Tensor:
    """W (N, T) for the micro-batch `mask`, given the global token and sequence counts of the optimizer step.

    tok:   W = m / num_tokens                  (token mean over the global batch; DAPO)
    seq:   W = m / (|y_i| * num_seqs)          (mean over sequences of the per-sequence token mean; GRPO)
    const: W = m / (num_seqs * max_len)        (constant normaliser; Dr. GRPO)
    sum:   W = m / num_seqs                    (mean over sequences of the per-sequence token sum; REINFORCE)
    pair:  W = 2 m / num_seqs                  (mean over preference pairs, each two sequences; DPO)
    """
    if mode == "tok":
        return mask / max(num_tokens, 1.0)
    if mode == "seq":
        return mask / (mask.sum(1, keepdim=True).clamp(min=1) * max(num_seqs, 1.0))
    if mode == "const":
        return mask / (max(num_seqs, 1.0) * max_len)
    if mode == "sum":
        return mask / max(num_seqs, 1.0)
    if mode == "pair":
        return 2 * mask / max(num_seqs, 2.0)
    raise ValueError(f"unknown aggregation {mode!r}; choose one of {', '.join(AGGREGATIONS)}")


# ----------------------------------------------------------------------------------------------
# Regularisers (differentiable).
# ----------------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3", "k3_ratio")


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str, old_logp: Tensor | None = None) -> Tensor:
    """Per-token KL estimate with delta = logp - ref_logp (research/algorithms.md §3.5), (N, T).

    k1 = delta;  k2 = delta^2 / 2;  k3 = exp(-delta) - 1 + delta (clamped to [-10, 10] like verl);
    k3_ratio = (p / q) * k3 with the ratio differentiable (as TRL's use_bias_correction_kl, which multiplies by
    the differentiable coef_1): d/dlogp = r * (k3 + 1 - b/p), which at q = sg(p) is exactly delta, an unbiased
    grad KL(p||b). A detached ratio would leave k3's coefficient 1 - b/p, i.e. grad KL(b||p).
    Gradient coefficients d/dlogp: k1 -> 1, k2 -> delta, k3 -> 1 - b/p, k3_ratio (on-policy) -> delta.
    """
    delta = logp - ref_logp
    if estimator == "k1":
        return delta
    if estimator == "k2":
        return 0.5 * delta**2
    k3 = (torch.exp(-delta) - 1 + delta).clamp(-10, 10)
    if estimator == "k3":
        return k3
    if estimator == "k3_ratio":
        old = logp.detach() if old_logp is None else old_logp
        return torch.exp(logp - old) * k3  # the ratio carries gradient: that is the whole point of the correction
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H = -sum_v p_v log p_v over the last axis; (..., V) -> (...). dH/dz = -p (log p + H)."""
    logz = torch.log_softmax(logits, dim=-1)
    return -(logz.exp() * logz).sum(-1)


def sampler_correction(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, level: str, cap: float) -> Tensor:
    """Truncated importance weights (N, T) for a sampler that is not exactly the trainer's policy q
    (another engine or precision: vLLM, bf16 kernels), detached, 1 off `mask`:

        token:     w_t = min(q(y_t) / mu(y_t), C) = min(exp(old_logp_t - sampler_logp_t), C)
        sequence:  w_i = min(prod_t q(y_t) / mu(y_t), C), on every token of sequence i

    mu is the distribution the tokens were drawn from (the sampler's log-probs). Multiplying the advantages by w
    makes the estimator's expectation one under q again, up to the truncation (variance bounded by C).
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"sampler correction level must be 'token' or 'sequence', got {level!r}")
    log_w = ((old_logp - sampler_logp) * mask).detach()
    if level == "sequence":
        log_w = log_w.sum(-1, keepdim=True).expand_as(mask)
    w = log_w.clamp(max=math.log(cap)).exp()
    return torch.where(mask > 0, w, torch.ones_like(w))


def overlong_penalty(lengths: Tensor, max_len: int, cache: int) -> Tensor:
    """DAPO soft overlong penalty, added to R: 0 up to max_len - cache, then linear to -1 at max_len, -1 beyond."""
    start = max_len - cache
    ramp = (start - lengths.to(torch.float64)) / cache
    pen = torch.where(lengths <= start, torch.zeros_like(ramp), ramp)
    return torch.where(lengths > max_len, torch.full_like(ramp, -1.0), pen)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float | None,
               tokens: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss, summed over `mask` and divided by `tokens` (the whole minibatch's count):

        L_V = (1/2) sum_t max((V - G)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - G)^2) / tokens

    values (N, T) differentiable, old_values / returns (N, T) detached. `clip` None: the plain squared error.
    Returns (loss, clipped tokens), the second the count where the clipped term is the larger one."""
    err = (values - returns) ** 2
    if clip is None:
        return 0.5 * (err * mask).sum() / max(tokens, 1.0), values.new_zeros(())
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    err_c = (clipped - returns) ** 2
    worse = (err_c > err).to(mask.dtype) * mask
    return 0.5 * (torch.maximum(err, err_c) * mask).sum() / max(tokens, 1.0), worse.sum().detach()


def soft_target_loss(logp_at: Tensor, probs: Tensor, *, tokens: float) -> Tensor:
    """Knowledge distillation's cross-entropy to the teacher's distribution (Hinton et al. 2015), token mean:

        L = -(1/tokens) sum_{i,t} sum_k p_T(v_k | x, y_<t) log pi(v_k | x, y_<t)

    over the teacher's top-K tokens v_k at each position; logp_at (N, T, K) differentiable, probs (N, T, K) 0 off
    the loss tokens. With K = V it is the forward KL(pi_T || pi) up to the teacher's entropy (no gradient)."""
    return -(probs.to(logp_at) * logp_at).sum() / max(tokens, 1.0)
