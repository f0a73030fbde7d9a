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


def shared_prefix_layout(input_ids: Tensor, attention_mask: Tensor, groups: Tensor, *,
                         max_cost: float | None = None, pair_cost: float = 0.0
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
    """Right-padded rows (B, T) -> one row per group, the group's common prefix once: [prefix, tail_1, tail_2, ...].

    Returns (ids (R, L), mask (R, 1, L, L) bool, positions (R, L), row (B,), at (B, T)): under the tree `mask`
    each tail sees the prefix and itself, causally (a padding position sees only itself), with the positions it
    has in its own row; token t of row b sits at `at[b, t]` of packed row `row[b]` (padding at 0). The rows of a
    group keep at least their last token as their own, so every row's tokens after the first have a predictor.
    None, before any mask is built, where the packed rows would cost more than `max_cost`: R L + pair_cost R L^2
    (`attention_pair_cost`: positions, plus the query-key pairs that attention computes, masked or not)."""
    B, T = input_ids.shape
    ids, lengths, device = input_ids.cpu(), attention_mask.sum(1).tolist(), input_ids.device
    order: dict[int, list[int]] = {}
    for b, g in enumerate(groups.tolist()):
        order.setdefault(int(g), []).append(b)
    packed, positions, segments = [], [], []
    row, at = torch.zeros(B, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    for r, rows in enumerate(order.values()):
        n = min(lengths[b] for b in rows)
        same = (ids[rows, :n] == ids[rows[0], :n]).all(0).long().cumprod(0)
        common = min(int(same.sum()), n - 1) if len(rows) > 1 else 0
        seq, pos, seg = ids[rows[0], :common].tolist(), list(range(common)), [0] * common
        for j, b in enumerate(rows):
            own = lengths[b] - common
            row[b] = r
            at[b, :common] = torch.arange(common)
            at[b, common: lengths[b]] = len(seq) + torch.arange(own)
            seq += ids[b, common: lengths[b]].tolist()
            pos += range(common, lengths[b])
            seg += [j + 1] * own
        packed.append(seq), positions.append(pos), segments.append(seg)
    L = max(len(x) for x in packed)
    if max_cost is not None and len(packed) * (L + pair_cost * L * L) > max_cost:
        return None
    seg = torch.tensor([x + [-1] * (L - len(x)) for x in segments])  # (R, L); -1: padding
    q, k = torch.arange(L)[:, None], torch.arange(L)[None, :]
    sk, sq = seg[:, None, :], seg[:, :, None]
    mask = ((k <= q) & (sq >= 0) & ((sk == 0) | (sk == sq))) | (q == k)  # (R, L, L)
    out = (torch.tensor([x + [0] * (L - len(x)) for x in packed]), mask[:, None],
           torch.tensor([x + [0] * (L - len(x)) for x in positions]), row, at)
    return tuple(t.to(device) for t in out)  # type: ignore[return-value]


SHARED_MIN = 0.2  # batch.share_prompts null: share where the packed rows save at least this share of the cost


def shared_prompts(setting: bool | None, batch, allowed: bool = True) -> dict:
    """token_logprobs' keyword arguments for a batch under `batch.share_prompts` (True, False or None: auto)."""
    if setting is False or not allowed:
        return {}
    return {"groups": batch.group, "min_shared": None if setting else SHARED_MIN}


def attention_pair_cost(model: torch.nn.Module) -> float:
    """The FLOPs of one query-key pair of attention (q.k and the weighted v: 4 x heads x head_dim a layer) over
    those of one position through the decoder's matmuls (2 x the parameters of a layer): what a layout's L^2 term
    weighs against its L term. 0 where the config does not say its shapes."""
    cfg = model.config.get_text_config()
    h, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    if not (isinstance(h, int) and isinstance(heads, int)):
        return 0.0
    hd = getattr(cfg, "head_dim", None) or h // heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    mlp = getattr(cfg, "intermediate_size", None) or 4 * h
    per_layer = 2 * h * heads * hd + 2 * h * kv * hd + 3 * h * mlp  # q, o; k, v; gate, up, down
    return 4 * heads * hd / (2 * per_layer)


def takes_tree_mask(model: torch.nn.Module) -> bool:
    """Whether the model's attention honours a custom 4-D mask as it is: SDPA or eager attention, and no
    sliding-window layers (whose own masks a custom one would replace)."""
    cfg = model.config.get_text_config()
    sliding = getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) is not False
    sliding = sliding or "sliding_attention" in (getattr(cfg, "layer_types", None) or ())
    return getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager") and not sliding


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
    groups: Tensor | None = None,
    min_shared: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probability of every token of `input_ids` given its prefix, and optionally the entropy.

    input_ids, attention_mask: (B, T), right-padded (real tokens first, then padding).
    Returns logp (B, T) with logp[:, 0] = 0 and logp[:, t] = log softmax(logits[:, t-1] / temperature)[input_ids[:, t]],
    and entropy (B, T) of the distribution that produced token t (or None). Both are 0 where attention_mask is 0.
    Differentiable with respect to the model's parameters. `chunk_size` runs the LM head over that many positions at a
    time, `chunk_mb` over as many as hold that many MB of fp32 logits (same values, less memory); both None: the
    full (B, T, V) logits at once. `position_ids` (B, T) marks packed rows (several documents, positions restarting at
    0 at each): the model then gets no attention mask and keeps the documents apart by their positions.
    `groups` (B,): rows of one group (an RL prompt's samples) run their common prefix once (`shared_prefix_layout`),
    and each token's hidden state is gathered back to its (B, T) place before the LM head: the same values. Only
    where the model's attention takes a tree mask (`takes_tree_mask`) and, unless `min_shared` is None, the packed
    rows cost at most (1 - `min_shared`) of the padded batch (positions, plus attention's query-key pairs weighted
    by `attention_pair_cost`: longer rows pay for their longer attention); otherwise the rows run as they are.
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
    # (too little shared does not pay for the longer rows' attention: bench/README.md)
    layout = None
    if groups is not None and position_ids is None and takes_tree_mask(model):
        pair, (B, T) = attention_pair_cost(model), input_ids.shape
        budget = None if min_shared is None else (1 - min_shared) * B * (T + pair * T * T)
        layout = shared_prefix_layout(input_ids, attention_mask, groups, max_cost=budget, pair_cost=pair)
    if layout is not None:  # each group's common prefix once, under a tree mask
        ids, tree, positions, row, at = layout
        if getattr(model.config, "_attn_implementation", None) == "eager":  # eager attention adds its mask
            dtype = next(model.parameters()).dtype
            tree = torch.zeros(tree.shape, dtype=dtype, device=tree.device).masked_fill(~tree, torch.finfo(dtype).min)
        packed = last_hidden(model, dict(input_ids=ids, attention_mask=tree, position_ids=positions,
                                         use_cache=False), logits_to_keep=1)  # (R, L, D)
        hidden = packed[row[:, None], at[:, :-1]]  # (B, T-1, D): the state that predicts token t
        kwargs = None
    elif position_ids is None:
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    else:  # packed: transformers derives the per-document causal mask from the positions (no attention mask)
        kwargs = dict(input_ids=input_ids, attention_mask=None, position_ids=position_ids, use_cache=False)

    if chunk_size is None and kwargs is not None:
        logits = model(**kwargs).logits[:, :-1]  # (B, T-1, V)
        logp, entropy = _logp_entropy(logits, targets, temperature, with_entropy)
    elif chunk_size is None:
        logp, entropy = _logp_entropy(_final_logits(model, hidden), targets, temperature, with_entropy)
    else:
        if kwargs is not None:
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
