"""Find, load, check and save policies: a built-in model, a local directory, or a hub id in the local cache.

The checks here guard faults that trained models silently: a tokenizer whose ids reach past the
embedding matrix, a missing pad token (pad falls back to eos; masks never come from `id == pad`, so
eos stays supervised), and stop tokens that leave out the chat template's end-of-turn token (the model
then never stops). `save_pretrained` writes a directory that plain `transformers` loads back, with the
stop ids in `generation_config.json`, and never leaves a half-written directory under the final name.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from .jsonio import fsync

log = logging.getLogger("posttrain")

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN_MODELS: dict[str, str] = {"builtin:tiny": str(ASSETS / "tiny"),
                                  "builtin:tiny-teacher": str(ASSETS / "tiny-teacher")}  # scripts/build_teacher.py
# the built-in task's reward-model ensemble (scripts/build_reward_models.py)
TINY_REWARD_MODELS = tuple(f"builtin:tiny-rm-{m}" for m in ("operands", "onpolicy", "kinds", "mixed", "onpolicy-teacher"))
BUILTIN_MODELS.update({name: str(ASSETS / name.removeprefix("builtin:")) for name in TINY_REWARD_MODELS})
# End-of-turn tokens of common chat templates (ChatML/Qwen, Llama 3, Gemma, Phi-3).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIXED = {"bf16-mixed": torch.bfloat16}  # fp32 weights and optimizer, matmuls under autocast in this dtype


# ---------------------------------------------------------------- where the model is

def resolve_model(name_or_path: str, *, required_file: str = "config.json") -> str:
    """A local directory holding `required_file` for a built-in name, a local dir or a hub id.

    Hub ids resolve to their snapshot in the local hub cache when present (so nothing touches the
    network); offline and not cached is an error that lists every place looked at.
    """
    name = str(name_or_path)
    if name.startswith("builtin:"):
        if name not in BUILTIN_MODELS:
            raise ValueError(f"unknown built-in model {name!r}; available: {', '.join(BUILTIN_MODELS)}")
        path = Path(BUILTIN_MODELS[name])
        if not (path / required_file).exists():
            raise FileNotFoundError(f"built-in model {name!r} is not installed: {path / required_file} is missing. "
                                    "Reinstall posttrain, or build the asset with the repository's asset script")
        return str(path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / required_file).exists():
            raise FileNotFoundError(f"{path} is a directory but has no {required_file}; "
                                    "point to a directory written by save_pretrained")
        return str(path)
    tried = [f"local directory {path.resolve()} (does not exist)"]
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        from posttrain.data.loading import hub_cache_dir

        cache = hub_cache_dir()
        try:
            snapshot = snapshot_download(name, local_files_only=True, cache_dir=str(cache))
        except Exception:  # not cached; huggingface_hub raises several types
            snapshot = None
        if snapshot is not None and (Path(snapshot) / required_file).exists():
            return snapshot
        tried.append(f"hub cache {cache / ('models--' + name.replace('/', '--'))} (no snapshot with {required_file})")
        if not _offline():
            return name  # from_pretrained may download it
        tried.append("download (HF_HUB_OFFLINE=1)")
    raise FileNotFoundError(f"cannot find model {name!r}; tried: " + "; ".join(tried)
                            + f". Built-in models: {', '.join(BUILTIN_MODELS)}")


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


# ---------------------------------------------------------------- device and dtype

def pick_device(requested: str = "auto") -> str:
    """"auto" -> "cuda" when available, else "cpu"; an explicit CUDA device must exist."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available; use device 'cpu' or 'auto'")
    if requested != "cpu" and not requested.startswith(("cuda", "mps")):
        raise ValueError(f"unknown device {requested!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return requested


def compute_context(requested: str, device: str):
    """The context a run computes in: autocast to bf16 for "bf16-mixed" (fp32 weights, bf16 matmuls; softmax,
    log-softmax and the losses stay fp32), nothing otherwise."""
    if requested in MIXED:
        return torch.autocast(device_type=torch.device(device).type, dtype=MIXED[requested])
    return contextlib.nullcontext()


def choose_dtype(requested: str | torch.dtype = "auto", device: str = "cpu") -> torch.dtype:
    """"auto": float32 on CPU (bf16 matmuls are slow there), bfloat16 on CUDA when supported, else float32."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested in MIXED:  # the weights (the master copy the optimizer steps) stay fp32
        return torch.float32
    if requested == "auto":
        if str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if requested not in DTYPES:
        raise ValueError(f"unknown dtype {requested!r}; use 'auto', 'float32', 'bfloat16' or 'float16'")
    return DTYPES[requested]


# ---------------------------------------------------------------- tokenizer

def _end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]


def load_tokenizer(name_or_path: Any, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer (or take a loaded one) and make sure it has eos and pad tokens. `chat_template` (Jinja
    text, or the path of a file holding it) replaces the tokenizer's own.

    No pad -> pad = eos (logged). No eos -> the first known end-of-turn token (logged). Neither -> error,
    because nothing could mark where a sequence ends.
    """
    if isinstance(name_or_path, PreTrainedTokenizerBase):
        tokenizer = name_or_path
        origin = getattr(tokenizer, "name_or_path", "") or "tokenizer object"
    else:
        origin = resolve_model(name_or_path, required_file="tokenizer_config.json")
        tokenizer = AutoTokenizer.from_pretrained(origin)
    if chat_template:
        template = Path(chat_template).expanduser()
        tokenizer.chat_template = template.read_text() if "{" not in chat_template and template.is_file() \
            else chat_template
    if tokenizer.eos_token_id is None:
        eot = _end_of_turn_ids(tokenizer)
        if not eot:
            raise ValueError(f"tokenizer {origin} has no eos token and none of the end-of-turn tokens "
                             f"{', '.join(END_OF_TURN_TOKENS)}; set `eos_token` in its tokenizer_config.json")
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eot[0])
        log.info("tokenizer %s has no eos token; using end-of-turn token %s", origin, tokenizer.eos_token)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer %s has no pad token; using eos %s (id %d) as pad. Loss masks come from lengths, "
                 "so eos is still trained", origin, tokenizer.eos_token, tokenizer.eos_token_id)
    return tokenizer


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: Any = None) -> list[int]:
    """Sorted unique ids that end a generation: eos, the model's generation eos id(s), known end-of-turn tokens."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    gen_eos = getattr(gen, "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    ids.update(_end_of_turn_ids(tokenizer))
    if not ids:
        raise ValueError("no stop token: the tokenizer has no eos and no known end-of-turn token "
                         f"({', '.join(END_OF_TURN_TOKENS)}), and the model's generation_config names none")
    return sorted(ids)


# ---------------------------------------------------------------- model

def load_model(name_or_path: str, *, dtype: str | torch.dtype | None = None, device: str = "cpu") -> torch.nn.Module:
    """A causal LM from a built-in name, local dir or cached hub id, in `dtype` (None = "auto") on `device`."""
    path = resolve_model(name_or_path)
    torch_dtype = choose_dtype("auto" if dtype is None else dtype, device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    return model.to(device)


def model_context(name_or_path: str) -> int | None:
    """The model's context length (max_position_embeddings) from its config alone; None when it has none."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(resolve_model(name_or_path)), "max_position_embeddings", None)


def model_rows(name_or_path: str) -> int | None:
    """The number of rows of the model's input embedding (its config's vocab_size), from its config alone."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(resolve_model(name_or_path)), "vocab_size", None)


def ids_we_produce(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    """The token ids training and generation put into a model whatever the data says: eos, pad, the known
    end-of-turn tokens, and every token the chat template adds around a conversation."""
    ids = {i: "eos" for i in [tokenizer.eos_token_id] if i is not None}
    if tokenizer.pad_token_id is not None:
        ids.setdefault(tokenizer.pad_token_id, "pad")
    for i in _end_of_turn_ids(tokenizer):
        ids.setdefault(i, "end of turn")
    if getattr(tokenizer, "chat_template", None):
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                 {"role": "assistant", "content": "a"}]
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=False)
            text += tokenizer.apply_chat_template(probe[:2], tokenize=False, add_generation_prompt=True)
            for i in tokenizer(text, add_special_tokens=False)["input_ids"]:
                ids.setdefault(i, "the chat template")
        except Exception:  # noqa: BLE001 - a template that cannot render this probe is reported where it is used
            pass
    return ids


def check_compatible(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Every id training and generation will feed the model must index a row of its input embedding.

    A tokenizer may be longer than the embedding (transformers 5 loads a Qwen2 directory's tokenizer with
    `<|endoftext|>` one past the rows, say): that is an error only for ids we produce (eos, pad, end of turn,
    the chat template's tokens). A pad past the rows falls back to eos. Other ids past the rows are logged;
    a data row that contains one is a bad row (`data.encode` checks every row)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) <= rows:
        return
    produced = ids_we_produce(tokenizer)
    if produced.get(tokenizer.pad_token_id) == "pad" and tokenizer.pad_token_id >= rows and \
            tokenizer.eos_token_id is not None and tokenizer.eos_token_id < rows:
        log.info("pad token %s (id %d) is past the model's %d embedding rows: padding with eos %s instead",
                 tokenizer.pad_token, tokenizer.pad_token_id, rows, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
        produced = ids_we_produce(tokenizer)
    bad = sorted(i for i in produced if i >= rows)
    if bad:
        named = ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} (id {i}, {produced[i]})" for i in bad)
        raise ValueError(f"the model's input embedding has {rows} rows, but training would feed it {named}. Add "
                         "rows for them with `resize_embeddings: true` in the recipe (new rows start at the mean "
                         "embedding), or use a tokenizer whose special tokens fit the model")
    past = [tokenizer.convert_ids_to_tokens(i) for i in range(rows, len(tokenizer))]
    log.info("tokens %s (ids %d..%d) are past the model's %d embedding rows; nothing posttrain adds uses them, "
             "and a data row containing one is reported as a bad row", past[:5], rows, len(tokenizer) - 1, rows)


def load_policy(name_or_path: str, *, dtype: str | torch.dtype = "auto", device: str = "auto",
                resize_embeddings: bool = False, tokenizer: str | None = None, chat_template: str | None = None):
    """(model, tokenizer) from one place, checked for compatibility; logs the dtype and device chosen.
    `tokenizer` pairs the model with another tokenizer (a directory or hub id), `chat_template` with another
    template; `resize_embeddings` gives the model a row for every token of the tokenizer first."""
    device = pick_device(device)
    torch_dtype = choose_dtype(dtype, device)
    model = load_model(name_or_path, dtype=torch_dtype, device=device)
    tokenizer = load_tokenizer(resolve_model(tokenizer or name_or_path, required_file="tokenizer_config.json"),
                               chat_template)
    if resize_embeddings and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        log.info("resizing the embeddings of %s from %d to %d rows", name_or_path,
                 model.get_input_embeddings().num_embeddings, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    check_compatible(model, tokenizer)
    log.info("loaded %s: %s on %s, %.2fM parameters", name_or_path, str(torch_dtype).removeprefix("torch."),
             device, sum(p.numel() for p in model.parameters()) / 1e6)
    return model, tokenizer


def load_teacher(name_or_path: str, tokenizer, *, dtype, device) -> torch.nn.Module:
    """A frozen teacher for distillation. Its tokenizer must be `tokenizer` (the same ids), since distillation
    compares the two models' log-probs of the same tokens: another one is a RecipeError."""
    from .recipe import RecipeError

    teacher_tok = load_tokenizer(resolve_model(name_or_path, required_file="tokenizer_config.json"))
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise RecipeError(f"teacher {name_or_path!r} has another tokenizer than the model: distillation compares the "
                          "log-probs of the same token ids, so the two must share one")
    teacher = load_model(name_or_path, dtype=dtype, device=device).eval().requires_grad_(False)
    log.info("teacher %s loaded", name_or_path)
    return teacher


def set_activation_checkpointing(model: Any, on: bool) -> None:
    """Turn transformers' gradient checkpointing of the decoder layers on or off (non-reentrant: the inputs need not
    require gradients, so it works with frozen embeddings and LoRA)."""
    if on:
        model.activation_checkpointing_enable({"use_reentrant": False})
    elif getattr(model, "is_activation_checkpointing", False):
        model.activation_checkpointing_disable()


def check_finite_weights(model: Any, target: str | os.PathLike) -> None:
    """Raise NonFiniteError naming the first parameter or buffer holding NaN or inf: such weights are never
    written (a diverged run must not publish a model that looks finished). `model`: a module or a state dict."""
    import torch

    from .errors import NonFiniteError

    for name, t in (model if isinstance(model, dict) else model.state_dict()).items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"not saving {target}: weight {name} holds NaN or inf (the run diverged; lower "
                                 "the learning rate or check the rewards)")


def save_pretrained(model: Any, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike, *,
                    stop_ids: list[int]) -> None:
    """Write model (safetensors), tokenizer (with chat template) and generation config to `out_dir`.

    Everything goes to `out_dir.tmp`, is fsynced, then renamed into place, so `out_dir` is either
    absent, the previous complete save, or the new complete save.
    """
    if not stop_ids:
        raise ValueError("stop_ids is empty; pass stop_token_ids(tokenizer, model)")
    check_finite_weights(model, out_dir)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    # A copy: the caller's model keeps its own generation config.
    gen = copy.deepcopy(getattr(model, "generation_config", None) or GenerationConfig())
    gen.eos_token_id = sorted({int(i) for i in stop_ids})
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen.save_pretrained(str(tmp))
    _fsync_tree(tmp)
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    fsync(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fsync(p)
    fsync(root)
