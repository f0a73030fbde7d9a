"""The GRPO benchmarks' reward, with TRL's signature (both libraries call the same function).

`digit_share`: the share of a completion's characters that are digits. A random model's completions score
differently from each other, so every group has a non-zero advantage and both trainers do a real update.
"""
from __future__ import annotations


def _text(completion) -> str:
    """A completion as text: a string, or a list of chat messages (conversational prompts)."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if isinstance(m, dict))


def digit_share(prompts, completions, **kwargs) -> list[float]:
    texts = [_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]
