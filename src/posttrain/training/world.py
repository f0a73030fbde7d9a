"""Data parallelism on `torch.distributed` (launched by `torchrun`): the `World` every rank holds.

    torchrun --nproc-per-node 2 -m posttrain train RECIPE.yaml --out runs/x

Scheme (replicated state, sharded work), the same for every method:
  - every rank holds the whole model and optimizer state (strategy `ddp`; `fsdp` shards the policy's parameters,
    gradients and optimizer state with FSDP2, bottom of this file), and builds every step's experience from the
    same seeded sources, so all decisions that read the whole batch (group advantages, dynamic sampling, the
    hybrids' gates, the "nothing to learn: skip" decision) are taken on identical data by every rank;
  - the expensive parts are split: each rank samples the completions of its contiguous share of the step's
    prompts (whole groups, keyed noise: `rollout.seeding`), scores them, and runs the no-grad log-prob passes
    of its share of rows; the results are gathered so every rank holds the step's full batch;
  - the update: each rank forwards and backpropagates its share of each minibatch (whole groups), with the
    aggregation normalisers (token and sequence counts) of the whole minibatch, so the summed gradient over
    ranks is the one-process gradient; gradients and diagnostics are summed in one all-reduce each;
  - rank 0 writes the run directory (metrics, samples, checkpoints, models); the checkpoint holds no
    per-rank state, so it resumes on any number of ranks.

A single process is the same code with `SINGLE`, whose collectives do nothing.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

log = logging.getLogger("posttrain")

BUCKET_ELEMENTS = 1 << 24  # gradients all-reduced in flat buckets of this many elements (64 MB in fp32)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; `SINGLE` for one process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"  # fsdp: the policy's parameters, gradients and optimizer state are sharded (FSDP2)

    @property
    def sharded(self) -> bool:
        return self.size > 1 and self.strategy == "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def span(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """[start, stop) of `rank`'s contiguous share of n items (shares differ by at most one)."""
        r = self.rank if rank is None else rank
        return r * n // self.size, (r + 1) * n // self.size

    def gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order (pickled; for lists of rows, rewards, tensors on the CPU)."""
        if self.size == 1:
            return [obj]
        out: list = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce `t` in place (sum over ranks); returns it."""
        if self.size > 1:
            device = _collective_device()
            if t.device != device:  # NCCL reduces CUDA tensors only
                x = t.to(device)
                torch.distributed.all_reduce(x)
                t.copy_(x)
            else:
                torch.distributed.all_reduce(t)
        return t

    def sum_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum `.grad` over ranks in flat buckets; a parameter without a gradient on this rank counts as zeros."""
        if self.size == 1:
            return
        params = [p for p in params if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        start = 0
        while start < len(params):
            stop, n = start, 0
            while stop < len(params) and (n == 0 or n + params[stop].numel() <= BUCKET_ELEMENTS) \
                    and params[stop].grad.dtype == params[start].grad.dtype:
                n += params[stop].numel()
                stop += 1
            grads = [p.grad for p in params[start:stop]]
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
            start = stop

    def broadcast_(self, module: torch.nn.Module) -> None:
        """Every rank's `module` parameters and buffers become rank 0's."""
        if self.size == 1:
            return
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                self._broadcast_tensor(t)

    def _broadcast_tensor(self, t: torch.Tensor) -> torch.Tensor:
        device = _collective_device()
        x = t.data if t.device == device else t.data.to(device)
        torch.distributed.broadcast(x, src=0)
        if x is not t.data:
            t.data.copy_(x)
        return t

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def max_(self, n: int) -> int:
        """The largest of every rank's `n`."""
        if self.size == 1:
            return n
        t = torch.tensor([n], dtype=torch.long, device=_collective_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def agree(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank (a stop signal one rank received, say)."""
        if self.size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
        torch.distributed.all_reduce(t)
        return bool(t.item() > 0)


SINGLE = World()


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_world(device: str, timeout_s: float, strategy: str = "ddp") -> World:
    """The world of a process started by torchrun (`SINGLE` otherwise): the process group (NCCL when the run is
    on CUDA, gloo otherwise) and, on CUDA, this rank's GPU. A rank that dies makes the others fail their next
    collective within `timeout_s` instead of waiting forever."""
    if not launched():
        return SINGLE
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    world = World(rank, size, local_rank, strategy)
    log.info("rank %d of %d (local rank %d, backend %s)", rank, size, local_rank, torch.distributed.get_backend())
    return world


def check_distributed(cfg) -> None:
    """Refuse, before anything loads, what cannot be split across ranks."""
    from ..recipe import RecipeError

    fsdp = cfg.distributed.strategy == "fsdp"
    for i, stage in enumerate(cfg.stages):
        if stage.rollout.seeding == "batch":
            raise RecipeError(f"stages.{i}.rollout.seeding: 'batch' draws every sample from one generator and cannot "
                              "be split across ranks; use 'row' or 'auto' (row under torchrun)")
        if fsdp and stage.lora is not None and stage.lora.quantize:
            raise RecipeError(f"stages.{i}: lora.quantize (QLoRA's 4-bit layers) does not run under "
                              "distributed.strategy: fsdp; use distributed.strategy: ddp")


def rank_device(device: str, world: World) -> str:
    """Each rank's device: `cuda` becomes `cuda:LOCAL_RANK` under several ranks."""
    if world.size > 1 and device == "cuda":
        return f"cuda:{world.local_rank}"
    return device


def close_world() -> None:
    """End this process's part in the process group, if it has one (at the end of the CLI command)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---- FSDP2 (strategy: fsdp) ---------------------------------------------------------------------------------


def _root(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward runs: a LoRA stage's reference (lora.Reference) runs its policy's modules."""
    from .lora import runs

    return runs(model)


def _fsdp_modules(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in _root(model).modules() if isinstance(m, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    return bool(_fsdp_modules(model))


def shard(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """FSDP2 in place: each decoder layer is one unit, the rest (embeddings, final norm, head) the root's. Gradients
    are summed over ranks, not averaged: each rank's loss is already its part of the whole batch's (normalised by
    the whole batch's counts), like the replicated strategy's all-reduce."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world.size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    # the root's weights stay whole from its forward to its backward (FSDP2's default for a root): the chunked LM
    # head and a reward model's scalar head run after the forward (logprobs.last_hidden)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    for m in _fsdp_modules(model):
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied one)
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, one FSDP unit each: the modules of the classes transformers keeps whole when it
    splits a model over devices (`_no_split_modules`: LlamaDecoderLayer, GPT2Block...)."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in _root(model).modules() if type(m).__name__ in kinds]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder block class (`_no_split_modules`): "
                         "distributed.strategy: fsdp cannot tell its layers; use ddp")
    return layers


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """A sharded model's full parameters on every rank for the duration (no-grad passes: sampling, old and
    reference log-probs, evaluation), so ranks may run different numbers of forward passes; entered by every
    rank together (gathering is collective). Nothing for a model that is not sharded."""
    mods = _fsdp_modules(model)
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        root = _root(model)
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(m is not root, recurse=False)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict on every rank (collective when sharded; the module's own otherwise)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    tied: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    for names in tied.values():  # tied weights stay one tensor, as in a plain module's state dict
        first = next((n for n in names if n in weights), None)
        for n in names:
            if first is not None:
                weights[n] = weights[first]
    return weights


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict in the plain layout (parameters numbered in `model.parameters()` order, whole
    tensors), whatever the strategy: a checkpoint of a sharded run resumes on any number of ranks."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    index = {name: i for i, name in enumerate(n for n, p in model.named_parameters() if p.requires_grad)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]
    return {"state": {index[n]: st for n, st in sd["state"].items()}, "param_groups": groups}


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, weights: dict,
                    optimizer_state: dict | None) -> None:
    """Load whole tensors (the plain layout) into a sharded model and its optimizer: each rank keeps its shard.
    A LoRA model's `weights` are its trainable parameters alone (what its checkpoints hold; checkpoint.load checks
    that they are exactly those)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
        set_optimizer_state_dict

    from . import lora

    options = StateDictOptions(full_state_dict=True, strict=not lora.is_lora(model))
    set_model_state_dict(model, weights, options=options)
    if optimizer is not None and optimizer_state is not None:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        sd = {"state": {names[int(i)]: st for i, st in optimizer_state["state"].items()},
              "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                               for g in optimizer_state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, sd, options=options)


def unshard(model: torch.nn.Module) -> torch.nn.Module:
    """A plain module with a sharded model's whole weights (collective): what a finished stage hands on (its saved
    model, the next stage's policy and reference)."""
    from . import lora

    weights = full_state_dict(model)
    base = model.get_base_model() if lora.is_lora(model) else model
    cls = next(c for c in type(base).__mro__ if not _is_fsdp_class(c))
    device = next(iter(weights.values())).device
    with torch.device("meta"):
        plain = cls(base.config)
        if base is not model:  # the same adapters on the plain base (peft's layers, still empty)
            from peft import get_peft_model

            plain = get_peft_model(plain, model.peft_config[model.active_adapter])
    plain.load_state_dict(weights, assign=True, strict=False)
    for name, buf in model.named_buffers():  # buffers are not sharded (rotary frequencies...)
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner)._buffers[leaf] = buf.detach().clone()
    inner = plain.get_base_model() if base is not model else plain
    if getattr(base.config, "tie_word_embeddings", False):
        inner.tie_weights()
    if getattr(base, "generation_config", None) is not None:  # (a sequence-classification model has none)
        inner.generation_config = base.generation_config
    left = [n for n, p in plain.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"unsharding left parameters without weights: {left[:5]}")
    plain.train(model.training)
    return plain.to(device)


def _is_fsdp_class(cls) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return issubclass(cls, FSDPModule)


def gathered_at_curve_points(on_step, eval_cfg, model):
    """A sharded policy is gathered whole on every rank at the learning curve's steps, for rank 0's evaluation
    (`on_step`, None on the other ranks)."""
    every = eval_cfg.every if eval_cfg is not None else 0
    if not every:
        return on_step

    def hook(state, record) -> bool:
        if state.step % every:
            return False
        with gathered(model):
            return bool(on_step(state, record)) if on_step is not None else False

    return hook
