"""LoRA stages (peft): a stage with `lora:` trains low-rank adapters on top of the frozen policy.

    attach(model, cfg)    wrap the policy: only the adapters' A and B train (B starts at 0, so the wrapped
                          model equals the policy at the stage's start)
    reference(model)      that start policy without a second copy of the weights: the same model with its
                          adapters disabled (the KL reference of the stage)
    finish(model, dir)    save the adapter (peft's format, in `dir`) and merge it into the weights, W + (alpha/r) B A,
                          so the next stage, evaluation and `final/` see a plain model

QLoRA (`lora.quantize: 4bit`): before the adapters attach, every Linear but the output head becomes a frozen
bitsandbytes NF4 layer holding quant(W) (the embeddings and norms stay as they are); the adapters train on
top, gradients flowing through the 4-bit matmuls. The reference is that quantized base, which is also the
policy at the stage's start (B = 0). At the end the weights are dequantized and the adapter merged in full
precision, dequant(quant(W)) + (alpha/r) B A: `final/` is a plain model, never re-quantized.

Checkpoints of a LoRA stage hold the trainable parameters only (training/checkpoint.py asks `trainable`).
"""
from __future__ import annotations

import torch


def attach(model, cfg, device: str):
    if cfg.quantize:
        quantize_4bit(model, device)
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_lora(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


class _AdaptersOff(torch.nn.Module):
    """A part of the wrapped model (or all of it) called with the adapters disabled."""

    def __init__(self, module, peft):
        super().__init__()
        self.__dict__["module"], self.__dict__["peft"] = module, peft  # not submodules: no second registration

    def forward(self, *args, **kwargs):
        with self.peft.disable_adapter():
            return self.module(*args, **kwargs)


class Reference(_AdaptersOff):
    """The wrapped model with its adapters disabled: the policy at the LoRA stage's start, sharing its weights.
    Its decoder and LM head are disabled alike, so the chunked log-probs (`logprobs.token_logprobs`) read it too."""

    def __init__(self, model):
        super().__init__(model, model)

    @property
    def config(self):
        return self.peft.config

    def get_decoder(self):
        return _AdaptersOff(self.peft.get_decoder(), self.peft)

    def get_output_embeddings(self):
        return _AdaptersOff(self.peft.get_output_embeddings(), self.peft)


def runs(model):
    """The module whose forward a call of `model` runs: a Reference's policy, any other model itself."""
    return model.peft if isinstance(model, _AdaptersOff) else model


def reference(model) -> Reference:
    return Reference(model)


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def trainable(model) -> dict[str, torch.Tensor]:
    """The parameters a LoRA stage trains (and checkpoints), by name."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def finish(model, adapter_dir):
    """Save the adapter to `adapter_dir` (loadable by peft; None: not saved), then merge it: returns the plain
    merged model."""
    if adapter_dir is not None:
        model.save_pretrained(str(adapter_dir))
    merged = _merge_dequantized(model) if _quantized_layers(model) else model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


# ------------------------------------------------------------------ QLoRA


def _bnb():
    import logging

    # its CPU backend warns at import that an optional kernel for a packed weight layout is missing: posttrain
    # keeps the standard layout (see quantize_4bit), so that kernel is never used
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        from ..recipe import RecipeError

        raise RecipeError("lora.quantize: '4bit' (QLoRA) needs bitsandbytes: pip install 'posttrain[qlora]' (or "
                          "remove lora.quantize to train the adapters on an unquantised base)") from None
    return bitsandbytes


def quantize_4bit(model, device) -> int:
    """Replace every `torch.nn.Linear` of `model` but its output head by a frozen NF4 layer holding quant(W), in
    place; returns how many were replaced. QLoRA's quantization: blocks of 64 weights share one absmax scale,
    and the scales are themselves quantized to 8 bits (double quantization)."""
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        from ..recipe import RecipeError

        raise RecipeError(f"lora.quantize: '4bit' (QLoRA) runs on CUDA GPUs and CPUs, not on {device}; remove "
                          "lora.quantize, or set `device: cpu`")
    bnb = _bnb()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=child.weight.dtype, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4", blocksize=64,
                                               compress_statistics=True)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            layer.support_avx512bf16_for_cpu = False  # keep the standard layout, which dequantize_4bit reads
            setattr(parent, name, layer.to(child.weight.device))  # moving a Params4bit quantizes it
            replaced += 1
    if not replaced:
        from ..recipe import RecipeError

        raise RecipeError("lora.quantize: this model has no Linear layer to quantize (besides its output head)")
    return replaced


def _quantized_layers(model) -> list:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def dequantized(layer) -> torch.nn.Linear:
    """A plain Linear holding dequant(quant(W)) of an NF4 layer (and its bias)."""
    import bitsandbytes.functional as F

    weight = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    dense.weight = torch.nn.Parameter(weight.to(layer.compute_dtype or weight.dtype))
    if layer.bias is not None:
        dense.bias = torch.nn.Parameter(layer.bias.data.to(dense.weight.dtype))
    return dense


def _merge_dequantized(model):
    """The plain model under a QLoRA wrapper: each adapted layer dequant(quant(W)) + (alpha/r) B A in full
    precision, every other NF4 layer dequantized."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    for parent in list(base.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                dense = dequantized(child.get_base_layer())
                with torch.no_grad():
                    for adapter in child.active_adapters:
                        dense.weight += child.get_delta_weight(adapter).to(dense.weight.dtype)
                setattr(parent, name, dense)
            elif isinstance(child, bnb.nn.Linear4bit):
                setattr(parent, name, dequantized(child))
    return base
