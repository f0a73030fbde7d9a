"""The sampler's decode step for the Llama family (Llama, Qwen2, Qwen3, Mistral) without transformers' modules.

A decode step feeds one token per row through every layer. For the small models of RL experiments its time is
the framework's, not the arithmetic's: transformers' decoder layers, attention interface, mask builder and
`DynamicCache` (which grows each layer's keys and values by `torch.cat`, a copy of the whole cache per token)
cost more than the products. Measured with `sample` on the benchmark's Qwen2 models (bench/assets.py), 8 prompts
x 4 samples, 2 CPU threads: 2.1M parameters, 32 new tokens 0.245 -> 0.186 s, 512 new tokens 6.25 -> 3.45 s;
25.7M parameters, 32 new tokens 0.98 -> 0.90 s (the rest is the products themselves: 32-row matmuls run at
~40 GFLOP/s on this CPU whatever calls them).

`NativeDecoder` runs the same operations in the same order on the model's own parameters: RMSNorm in float32
cast back to the input dtype, then scaled by its weight; q/k/v projections (with their biases, where the model
has them); Qwen3's per-head q/k norms; rotary embeddings from the model's own rotary module (so every rope
scaling type transformers implements applies unchanged); attention by `scaled_dot_product_attention` with a key
mask (grouped-query heads by SDPA's `enable_gqa`: 57 us a call where transformers' folding of a key head's
queries into query rows takes 130 us, for 32 rows); SiLU-gated MLP; final norm; LM head.
Keys and values go into buffers that double when full (not a copy of the whole cache per token, and no memory
held for the longest possible rollout by rows that stop early). The prompt is prefilled by the model's own
forward; its cache is copied into the buffers.

On a CUDA device `GraphDecoder` captures the step once per rollout batch as a CUDA graph and replays it per
token: a small model's decode on a GPU is the launching of its kernels, not their arithmetic. Measured on one
H200 (bench/README.md "On a GPU"), 32 rows of a 359M-parameter Qwen2 in bf16: 32 new tokens 0.62 s through the
forward, 0.50 s through the eager native step, 0.17 s replayed; 128 new tokens 2.79, 1.97 and 0.49 s. The graph
needs fixed shapes: buffers for the longest rollout from the start, and every row decoded to its batch's end.

On the CPU, a float32 projection whose weight has at least `ONEDNN_MIN_WEIGHT` entries runs through oneDNN's
matmul (`torch.ops.mkldnn._linear_pointwise`, the op torch's inductor calls for a CPU linear layer) rather than
`F.linear` (MKL's sgemm in torch's CPU wheels). A decode step reads every weight once for a few dozen rows, from
memory rather than the cache. Measured on the benchmarks' 2-core AMD EPYC with 8 or 32 rows and cold weights,
oneDNN takes 0.56-0.90x MKL's time from 2^17 entries up (32 rows, 512 x 256: 80 against 89 us; 512 x 1536: 391
against 510 us; Qwen2-0.5B's 896 x 4864: 2.0 against 3.1 ms) and up to 1.9x its time below (128 x 128: 22
against 13 us). The same products to float32 rounding (a sum in another order).

A peft LoRA wrapper of such a model decodes here too, each adapted projection computed as peft computes it.
`unsupported(model, length)` says why a model cannot take this path (another architecture or a subclass of one,
quantised layers or LoRA variants, sharded or hooked modules, a sliding window shorter than the rollout); the
sampler then decodes with the model's forward. `tests/test_decode.py` checks this path against that forward.
"""
from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CLASSES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
_FIRST_ROOM = 128  # generated tokens the key / value buffers hold before they first grow
_LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
ONEDNN_MIN_WEIGHT = 1 << 17  # weight entries from which a CPU float32 projection goes through oneDNN (above)
_ONEDNN: list = []  # [the op, or None where this torch has none usable], looked up once


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))


def _is_lora_linear(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear" and type(module).__module__ == "peft.tuners.lora.layer"


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft LoRA wrapper (whose adapted layers `_lora_linear` computes); else `model`."""
    base = getattr(model, "base_model", None)
    if type(model).__module__.startswith("peft.") and type(base).__name__ == "LoraModel":
        return base.model
    return model


def _linear_unsupported(module: nn.Module) -> str | None:
    if type(module) is nn.Linear:
        return None
    if not _is_lora_linear(module):
        return f"is {type(module).__name__} (quantised or another adapter type)"
    if type(module.base_layer) is not nn.Linear:
        return f"is LoRA on {type(module.base_layer).__name__} (quantised)"
    for name in module.active_adapters:
        if name in module.lora_variant:
            return f"uses a LoRA variant ({type(module.lora_variant[name]).__name__})"
        if type(module.lora_dropout[name]) not in (nn.Dropout, nn.Identity):
            return f"has LoRA dropout {type(module.lora_dropout[name]).__name__}"
    return None


def unsupported(model: nn.Module, length: int) -> str | None:
    """None when `model` can decode sequences of up to `length` positions through `NativeDecoder`; else why not."""
    inner = _unwrap(model)
    name = type(inner).__name__
    if name not in _CLASSES or type(inner).__module__.split(".")[:2] != ["transformers", "models"]:
        return f"{name} is not one of transformers' {', '.join(_CLASSES)}"
    cfg = inner.config
    if cfg.hidden_act != "silu":
        return f"hidden_act {cfg.hidden_act!r} (silu only)"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return f"pretraining_tp {cfg.pretraining_tp}"
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or any(type(p) is not nn.Parameter or p.is_meta for p in model.parameters()):
        return "parameters that are not plain tensors on one device (sharded, quantised or offloaded)"
    if any(_hooked(m) for m in model.modules()):
        return "modules with forward hooks (sharded, offloaded or instrumented)"
    if type(inner.lm_head) is not nn.Linear or type(inner.model.embed_tokens) is not nn.Embedding:
        return "a replaced embedding or LM head"
    for layer in inner.model.layers:
        for part, names in _LINEARS.items():
            for n in names:
                why = _linear_unsupported(getattr(getattr(layer, part), n))
                if why:
                    return f"{part}.{n} {why}"
        window = getattr(layer.self_attn, "sliding_window", None)
        if name == "MistralForCausalLM":
            window = cfg.sliding_window
        if window is not None and length > window:
            return f"sliding window {window} shorter than the rollout's {length} positions"
    return None


def graph_unsupported(model: nn.Module) -> str | None:
    """None when `NativeDecoder`'s step can be captured as a CUDA graph (`GraphDecoder`); else why not. Rotary
    embeddings that adapt to the longest position seen (dynamic NTK, LongRoPE) read it back to the host each step."""
    rope = getattr(_unwrap(model).model.rotary_emb, "rope_type", "default")
    if "dynamic" in str(rope) or rope == "longrope":
        return f"rope type {rope!r} updates its frequencies on the host"
    return None


def onednn_linear_op():
    """torch's oneDNN linear (x, weight, bias, "none", [], "") -> x W^T + b, or None where this torch lacks it."""
    if not _ONEDNN:
        op = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
        try:
            if op is not None:
                op(torch.ones(2, 2), torch.ones(3, 2), torch.ones(3), "none", [], "")
        except (RuntimeError, NotImplementedError):
            op = None
        _ONEDNN.append(op)
    return _ONEDNN[0]


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b by oneDNN's matmul (`onednn_linear_op`)."""
    return _ONEDNN[0](x, weight, bias, "none", [], "")


def _linear(weight: Tensor):
    """The product x -> x W^T + b for `weight`, chosen once per decoder: oneDNN's for a large float32 weight on the
    CPU outside autocast (see the module's docstring), else F.linear."""
    if (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.numel() >= ONEDNN_MIN_WEIGHT
            and not torch.is_autocast_enabled("cpu") and onednn_linear_op() is not None):
        return _onednn_linear
    return F.linear


def _lora_linear(module: nn.Module, base_product, x: Tensor) -> Tensor:
    """peft's LoRA Linear computed as peft does, W x + b + sum_a s_a B_a A_a x (dropout is the identity: the sampler
    decodes in eval mode); `base_product` is `_linear` of its base weight."""
    base = module.base_layer
    out = base_product(x, base.weight, base.bias)
    if module.disable_adapters or module.merged:
        return out
    dtype = out.dtype
    for name in module.active_adapters:
        if name in module.lora_A:
            a, b = module.lora_A[name], module.lora_B[name]
            low = F.linear(x.to(a.weight.dtype), a.weight, a.bias)
            out = out + F.linear(low, b.weight, b.bias) * module.scaling[name]
    return out.to(dtype)


def _rms(x: Tensor, norm: tuple[Tensor, float]) -> Tensor:
    """transformers' RMSNorm of `norm` = (weight, eps): normalise in float32, cast back, scale by the weight."""
    weight, eps = norm
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _norm(module: nn.Module) -> tuple[Tensor, float]:
    return module.weight, module.variance_epsilon


def _projection(module: nn.Module):
    """x -> the projection of x: `_linear` on an nn.Linear's tensors, `_lora_linear` for a LoRA layer."""
    if type(module) is nn.Linear:
        return partial(_linear(module.weight), weight=module.weight, bias=module.bias)
    return partial(_lora_linear, module, _linear(module.base_layer.weight))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class NativeDecoder:
    """One token per active row -> next-token logits, with keys and values in buffers that grow by doubling.

    Built after the prompt's prefill from its `DynamicCache` (P rows) and attention mask (P, L); each prompt row is
    repeated `num_samples` times, prompt-major, as the sampler's rows are. `step` writes the new token's keys and
    values at the next column of every active row; `select` keeps a subset of rows (finished rows leave the batch).

    `static=True` keeps every shape fixed for the whole rollout, as a CUDA graph needs (`GraphDecoder`): buffers
    sized for the longest rollout from the start (zeroed: masked columns must hold finite numbers), the column
    written and unmasked taken from a tensor, attention over all columns under the key mask, and every row
    decoded to the end (finished rows' tokens are computed and dropped; `select` only narrows what `step`
    returns). The same operations otherwise, so its logits equal the growing path's.
    """

    def __init__(self, model: nn.Module, cache, attention_mask: Tensor, *, num_samples: int, max_new_tokens: int,
                 static: bool = False):
        self.model = model = _unwrap(model)
        self.layers = []  # per layer: its norms and projections, looked up once (not once per token)
        for layer in model.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            qk_norms = (_norm(a.q_norm), _norm(a.k_norm)) if hasattr(a, "q_norm") else None  # Qwen3
            self.layers.append((_norm(layer.input_layernorm), _norm(layer.post_attention_layernorm), qk_norms,
                                *(_projection(getattr(a, n)) for n in _LINEARS["self_attn"]),
                                *(_projection(getattr(mlp, n)) for n in _LINEARS["mlp"])))
        self.final_norm = _norm(model.model.norm)
        self.head = _projection(model.lm_head)
        attn = model.model.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.groups = model.config.num_attention_heads // model.config.num_key_value_heads
        self.scaling = attn.scaling
        rows, width = attention_mask.shape[0] * num_samples, attention_mask.shape[1]
        self.col = width  # the column the next token's keys and values go to
        self.limit = width + max_new_tokens  # the most columns a row can need
        self.static = static
        room = self.limit if static else width + min(max_new_tokens, _FIRST_ROOM)
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        for layer in cache.layers:
            for src, dst in ((layer.keys, self.keys), (layer.values, self.values)):
                buf = (src.new_zeros if static else src.new_empty)((rows, src.shape[1], room, src.shape[3]))
                buf[:, :, :width] = src.repeat_interleave(num_samples, dim=0)
                dst.append(buf)
        device = attention_mask.device
        self.mask = torch.zeros((rows, 1, 1, room), dtype=torch.bool, device=device)
        self.mask[:, 0, 0, :width] = attention_mask.bool().repeat_interleave(num_samples, dim=0)
        if static:  # the step's inputs, in place: every row's token and position, and the column written
            self.active: Tensor | None = None  # rows still decoding (None: all of them)
            self.ids = torch.zeros(rows, dtype=torch.long, device=device)
            self.position_ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
            self.column = torch.full((1,), width, dtype=torch.long, device=device)

    def _reserve(self, columns: int) -> None:
        """Room for `columns` columns: the buffers double (up to the limit) when full, so a rollout copies its cache
        O(log length) times, and rows that stop early never hold memory for the longest possible rollout."""
        room = self.mask.shape[-1]
        if columns <= room:
            return
        extra = min(self.limit, max(columns, 2 * room)) - room

        def grow(t: Tensor, dim: int, fill=torch.empty) -> Tensor:  # (columns past `col` are never read)
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t, fill(shape, dtype=t.dtype, device=t.device)], dim=dim)

        self.keys = [grow(k, 2) for k in self.keys]
        self.values = [grow(v, 2) for v in self.values]
        self.mask = grow(self.mask, 3, torch.zeros)

    def select(self, keep: Tensor) -> None:
        """Keep rows `keep` (A',) of the active rows, in that order."""
        if self.static:
            self.active = keep if self.active is None else self.active[keep]
            return
        self.keys = [k[keep] for k in self.keys]
        self.values = [v[keep] for v in self.values]
        self.mask = self.mask[keep]

    def step(self, ids: Tensor, position_ids: Tensor) -> Tensor:
        """ids (A,), position_ids (A, 1) -> logits (A, V) of the token after each."""
        if not self.static:
            self._reserve(self.col + 1)
            self.col += 1
            return self._forward(ids, position_ids, self.col - 1)
        if self.active is None:
            self.ids.copy_(ids)
            self.position_ids.copy_(position_ids)
        else:
            self.ids[self.active] = ids
            self.position_ids[self.active] = position_ids
        self.column.fill_(self.col)
        self.col += 1
        logits = self._run()
        return logits.clone() if self.active is None else logits[self.active]

    def _run(self) -> Tensor:
        """The static step on the tensors in place (`GraphDecoder` replays it instead)."""
        return self._forward(self.ids, self.position_ids, None)

    def _forward(self, ids: Tensor, position_ids: Tensor, c: int | None) -> Tensor:
        """Every layer for one token per row, its keys and values written at column `c` (None: at `self.column`,
        attending over every column under the mask)."""
        m = self.model
        rows = ids.shape[0]
        if c is None:
            self.mask.index_fill_(3, self.column, True)
            mask = self.mask
        else:
            self.mask[:, :, :, c] = True
            mask = self.mask[:, :, :, : c + 1]
        x = m.model.embed_tokens(ids.unsqueeze(-1))  # (A, 1, H)
        cos, sin = m.model.rotary_emb(x, position_ids)  # (A, 1, D)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (A, 1, 1, D)
        d = self.head_dim
        for i, (norm1, norm2, qk_norms, q_proj, k_proj, v_proj, o_proj, gate, up, down) in enumerate(self.layers):
            h = _rms(x, norm1)
            q, k, v = q_proj(h).view(rows, 1, -1, d), k_proj(h).view(rows, 1, -1, d), v_proj(h).view(rows, 1, -1, d)
            if qk_norms is not None:  # Qwen3: RMSNorm over each head's dimensions before the rotation
                q, k = _rms(q, qk_norms[0]), _rms(k, qk_norms[1])
            q = _rotate(q.transpose(1, 2), cos, sin)  # (A, heads, 1, D)
            k, v = _rotate(k.transpose(1, 2), cos, sin), v.transpose(1, 2)
            if c is None:  # (index_copy_ does not cast: under autocast the rotated keys are fp32)
                keys = self.keys[i].index_copy_(2, self.column, k.to(self.keys[i].dtype))
                values = self.values[i].index_copy_(2, self.column, v.to(self.values[i].dtype))
            else:
                self.keys[i][:, :, c : c + 1], self.values[i][:, :, c : c + 1] = k, v
                keys, values = self.keys[i][:, :, : c + 1], self.values[i][:, :, : c + 1]
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling,
                                               enable_gqa=self.groups > 1)
            x = x + o_proj(o.reshape(rows, 1, -1))
            h = _rms(x, norm2)
            x = x + down(F.silu(gate(h)) * up(h))
        x = _rms(x, self.final_norm)
        return self.head(x[:, 0])  # (A, V)


class GraphDecoder(NativeDecoder):
    """`NativeDecoder`'s static step captured once as a CUDA graph and replayed for every later token.

    On a GPU a small model's decode step is the launching of its kernels (dozens per layer, microseconds
    each from Python), not their arithmetic: a replay launches them all at once. The first step runs eagerly on a
    side stream (CUDA's warm-up before a capture: it computes that step, which the first replay recomputes
    identically), then is captured. Under bf16 autocast the capture runs with autocast's cast cache off, so the
    graph holds the casts of the fp32 weights rather than tensors the cache would free. The graph and its memory
    pool live as long as the decoder, one rollout batch.
    """

    graph: torch.cuda.CUDAGraph | None = None

    def __init__(self, *args, **kw):
        super().__init__(*args, static=True, **kw)

    def _run(self) -> Tensor:
        if self.graph is None:
            context = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False) \
                if torch.is_autocast_enabled("cuda") else contextlib.nullcontext()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), context:
                super()._run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA work on the application's other threads during the capture does not void it
            with torch.cuda.graph(graph, capture_error_mode="thread_local"), context:
                self.logits = super()._run()
            self.graph = graph
        self.graph.replay()
        return self.logits
