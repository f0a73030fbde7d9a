"""Per-token log-probabilities (and entropies) of a causal LM on right-padded batches.

    logp[:, t] = z[:, t-1, x_t] - logsumexp_v z[:, t-1, v],   z = logits / temperature,   t >= 1
    H[:, t]    = logsumexp_v z[:, t-1, v] - sum_v softmax(z[:, t-1])_v z[:, t-1, v]

Column 0 has no predicting distribution and is 0, as are padded columns (mask 0), so every output is
aligned with `input_ids` and can be multiplied by a response mask directly.

Memory: the log-softmax is never materialised as a (B, T, V) tensor; log-probs are one gather minus
one logsumexp. The LM head itself runs on a chunk of positions at a time (as many as fit in `chunk_mb` MB of
fp32 logits, 128 by default; or `chunk_size` positions), under activation checkpointing when gradients are on,
so peak memory holds one chunk's logits instead of (B, T, V) in both the forward and the backward pass. A
batch whose logits fit in one chunk takes the plain path (one head call, nothing recomputed): a small
vocabulary never pays for chunking.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# MB of fp32 logits computed at once (the recipe key `batch.logits_chunk_mb`): 220 positions of a 152k
# vocabulary, 1024 of a 32k one, where the (32, 1024, V) logits of a whole RL batch at 152k would be 20 GB.
CHUNK_MB = 128.0


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, T) -> (B, T): 0, 1, 2, ... over the real tokens of each row (padding gets 0 or the last index)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _logp_entropy(logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """logits (B, L, V), targets (B, L) -> logp (B, L), entropy (B, L) or None, at >= float32 precision."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logsumexp is too coarse for ratios
    if temperature != 1.0:
        z = z / temperature
    lse = z.logsumexp(-1)  # (B, L)
    logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse  # (B, L)
    if not with_entropy:
        return logp, None
    p = (z - lse.unsqueeze(-1)).exp()  # (B, L, V), only built when the entropy is asked for
    entropy = lse - (p * z).sum(-1)  # (B, L)
    return logp, entropy


def last_hidden(model: torch.nn.Module, kwargs: dict, **root_kwargs) -> Tensor:
    """(B, T, D) the last hidden states of the model's decoder (`get_decoder()`) on `kwargs`.

    A model sharded by FSDP2 runs its whole forward instead (with `root_kwargs`, e.g. `logits_to_keep=1` so its
    head's own work is one position), the decoder's output kept by a hook: the root module's hooks gather the
    weights it owns (embeddings, final norm, head) and keep them whole until its backward, which a call of the
    decoder alone would leave as shards. Gradients through the kept states reach every weight as usual."""
    from torch.distributed.fsdp import FSDPModule

    from .training.lora import runs

    inner = runs(model)  # (a LoRA stage's reference runs its policy's modules)
    if not isinstance(inner, FSDPModule):
        return model.get_decoder()(**kwargs).last_hidden_state
    kept: list[Tensor] = []
    handle = inner.get_decoder().register_forward_hook(lambda m, args, out: kept.append(out.last_hidden_state))
    try:
        model(**kwargs, **root_kwargs)
    finally:
        handle.remove()
    return kept[-1]


def _final_logits(model: torch.nn.Module, hidden: Tensor) -> Tensor:
    """Apply the LM head the way the model's own forward does (incl. Gemma-style final soft-capping)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits


def logprobs_at(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, ids: Tensor
                ) -> tuple[Tensor, Tensor]:
    """One forward pass: (logp (B, T) of each token, as `token_logprobs`, and logp of the candidate tokens `ids`
    (B, T, K) at each position, (B, T, K)); aligned with the tokens (position t: the distribution that produced
    token t), 0 at column 0 and on padding. Knowledge distillation reads the teacher's top-K there."""
    mask = attention_mask.bool()
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    z = out.logits[:, :-1]
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    lse = z.logsumexp(-1, keepdim=True)  # (B, T-1, 1)
    targets = input_ids.masked_fill(~mask, 0)[:, 1:]
    logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse.squeeze(-1)
    at = z.gather(-1, ids[:, 1:].clamp(min=0)) - lse  # (B, T-1, K)
    valid = mask[:, 1:]
    logp = torch.nn.functional.pad(torch.where(valid, logp, 0.0), (1, 0))
    at = torch.nn.functional.pad(torch.where(valid[..., None], at, 0.0), (0, 0, 1, 0))
    return logp, at


def token_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    chunk_mb: float | None = CHUNK_MB,
    position_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probability of every token of `input_ids` given its prefix, and optionally the entropy.

    input_ids, attention_mask: (B, T), right-padded (real tokens first, then padding).
    Returns logp (B, T) with logp[:, 0] = 0 and logp[:, t] = log softmax(logits[:, t-1] / temperature)[input_ids[:, t]],
    and entropy (B, T) of the distribution that produced token t (or None). Both are 0 where attention_mask is 0.
    Differentiable with respect to the model's parameters. `chunk_size` runs the LM head over that many positions at a
    time, `chunk_mb` over as many as hold that many MB of fp32 logits (same values, less memory); both None: the
    full (B, T, V) logits at once. `position_ids` (B, T) marks packed rows (several documents, positions restarting at
    0 at each): the model then gets no attention mask and keeps the documents apart by their positions.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be (B, T)"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions or None, got {chunk_size}")
    if chunk_mb is not None and not chunk_mb > 0:
        raise ValueError(f"chunk_mb must be a positive number of megabytes or None, got {chunk_mb}")
    if chunk_size is None and chunk_mb is not None:
        vocab = getattr(model.config.get_text_config(), "vocab_size", None) or 2**15  # sizing only
        chunk_size = max(1, int(chunk_mb * 2**20 / (4 * vocab)) // input_ids.shape[0])
    if chunk_size is not None and chunk_size >= input_ids.shape[1] - 1 and input_ids.shape[1] > 1:
        chunk_size = None  # one chunk holds every position: the plain path computes the same without recompute
    mask = attention_mask.bool()
    # Padded positions' values are zeroed below; their targets are set to 0 so the gather never depends on them.
    targets = input_ids.masked_fill(~mask, 0)[:, 1:]  # (B, T-1)
    if position_ids is None:
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    else:  # packed: transformers derives the per-document causal mask from the positions (no attention mask)
        kwargs = dict(input_ids=input_ids, attention_mask=None, position_ids=position_ids, use_cache=False)

    if chunk_size is None:
        logits = model(**kwargs).logits[:, :-1]  # (B, T-1, V)
        logp, entropy = _logp_entropy(logits, targets, temperature, with_entropy)
    else:
        hidden = last_hidden(model, kwargs, logits_to_keep=1)[:, :-1]  # (B, T-1, D)

        def head(h: Tensor, x: Tensor) -> tuple[Tensor, ...]:
            out = _logp_entropy(_final_logits(model, h), x, temperature, with_entropy)
            return tuple(o for o in out if o is not None)

        # Recompute each chunk's logits in backward instead of keeping them all alive.
        recompute = torch.is_grad_enabled()
        parts = [
            checkpoint(head, hidden[:, s : s + chunk_size], targets[:, s : s + chunk_size], use_reentrant=False)
            if recompute
            else head(hidden[:, s : s + chunk_size], targets[:, s : s + chunk_size])
            for s in range(0, max(hidden.shape[1], 1), chunk_size)  # one (maybe empty) chunk when T = 1
        ]
        logp = torch.cat([p[0] for p in parts], dim=1)
        entropy = torch.cat([p[1] for p in parts], dim=1) if with_entropy else None

    valid = mask[:, 1:]  # (B, T-1): token t is real
    logp = torch.nn.functional.pad(torch.where(valid, logp, 0.0), (1, 0))  # (B, T)
    if entropy is not None:
        entropy = torch.nn.functional.pad(torch.where(valid, entropy, 0.0), (1, 0))  # (B, T)
    return logp, entropy
