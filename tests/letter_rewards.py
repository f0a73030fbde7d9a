"""Reward functions for the end-to-end tests (TRL signature), importable by reference from a worker."""


def letter_a(prompts, completions, **kwargs):
    """Share of the completion's characters that are the letter A: a dense signal a random model can climb."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[-1]["content"]
        out.append(text.count("A") / max(len(text), 1))
    return out


def answer_is_a(prompts, completions, answer, **kwargs):
    """1 when the completion starts with the row's `answer` column (checks dataset columns arrive)."""
    return [float((c if isinstance(c, str) else c[-1]["content"]).strip().startswith(a)) for c, a in
            zip(completions, answer)]


def varied(prompts, completions, **kwargs):
    """Distinct characters / 10: varies within every group, so no group is filtered as degenerate."""
    return [len(set(c if isinstance(c, str) else c[-1]["content"])) / 10 for c in completions]


def fails_on_q1(prompts, completions, id, **kwargs):
    """Raises for any batch holding row q1: the worker retries sample by sample and masks only q1's samples."""
    if "q1" in id:
        raise RuntimeError("row q1 cannot be scored")
    return varied(prompts, completions)


def overflows_on_q2(prompts, completions, id, **kwargs):
    """1e308 (finite in float64, infinite in float32) for row q2's samples; varied() otherwise."""
    base = varied(prompts, completions)
    return [1e308 if i == "q2" else r for i, r in zip(id, base)]
