"""LoRA stages (peft): a stage with `lora:` trains low-rank adapters on top of the frozen policy.

    attach(model, cfg)    wrap the policy: only the adapters' A and B train (B starts at 0, so the wrapped
                          model equals the policy at the stage's start)
    reference(model)      that start policy without a second copy of the weights: the same model with its
                          adapters disabled (the KL reference of the stage)
    finish(model, dir)    save the adapter (peft's format, in `dir`) and merge it into the weights, W + (alpha/r) B A,
                          so the next stage, evaluation and `final/` see a plain model

Checkpoints of a LoRA stage hold the trainable parameters only (training/checkpoint.py asks `trainable`).
"""
from __future__ import annotations

import torch


def attach(model, cfg, device: str):
    if cfg.quantize:
        if not str(device).startswith("cuda"):
            from ..recipe import RecipeError

            raise RecipeError(f"lora.quantize: {cfg.quantize!r} (QLoRA) needs a CUDA GPU and bitsandbytes; this run is "
                              f"on {device}. Remove lora.quantize to train the adapters on an unquantised base")
        from ..recipe import RecipeError

        raise RecipeError("lora.quantize (QLoRA) is not available in this version of posttrain; train the adapters on "
                          "an unquantised base (remove lora.quantize)")
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_lora(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


class Reference(torch.nn.Module):
    """The wrapped model with its adapters disabled: the policy at the LoRA stage's start, sharing its weights."""

    def __init__(self, model):
        super().__init__()
        self.__dict__["peft"] = model  # not a submodule: no second registration of the policy's parameters

    def forward(self, *args, **kwargs):
        with self.peft.disable_adapter():
            return self.peft(*args, **kwargs)

    @property
    def config(self):
        return self.peft.config


def reference(model) -> Reference:
    return Reference(model)


def trainable(model) -> dict[str, torch.Tensor]:
    """The parameters a LoRA stage trains (and checkpoints), by name."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def finish(model, adapter_dir):
    """Save the adapter to `adapter_dir` (loadable by peft), then merge it: returns the plain merged model."""
    model.save_pretrained(str(adapter_dir))
    merged = model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged
