"""Tiny tokenizers and models built locally: the test fixtures and the seed of `builtin:tiny`.

Nothing here downloads anything. `train_tokenizer` fits a byte-level BPE (digits split one per token,
as in Llama/Qwen, so arithmetic stays learnable) on a list of strings and wraps it as a
`PreTrainedTokenizerFast` with a ChatML-style chat template. `tiny_model` builds a randomly
initialised causal LM of a named architecture sized to that tokenizer.
"""
from __future__ import annotations

from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
PAD = "<|pad|>"

# ChatML layout. The `{% generation %}` tags let transformers return the assistant-token mask; the
# end-of-turn token sits inside them so that it is supervised (a model that never sees it never stops).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, *, with_pad: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE fitted on `texts`; digits are always single tokens. Deterministic for equal input."""
    specials = [EOS, IM_START, IM_END] + ([PAD] if with_pad else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD if with_pad else None,
        additional_special_tokens=[IM_START, IM_END],
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


_ARCH = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=None),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=256),
}
ARCHITECTURES = tuple(_ARCH)


def tiny_model(arch: str, tokenizer: PreTrainedTokenizerFast, *, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised causal LM of architecture `arch` whose vocabulary covers `tokenizer`."""
    if arch not in _ARCH:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(_ARCH)}")
    kw = dict(_ARCH[arch])
    model_type = kw.pop("model_type")
    kw.update(overrides)
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in (EOS, IM_END)]
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=eos_ids[0],
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, **kw,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
    return model
