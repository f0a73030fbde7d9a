"""Checks of a stage's rows and settings that need the tokenizer or the model's config, run before step 0:
RL prompts that cannot fit, chat data without a template, and settings that are easy to misread."""
from __future__ import annotations

import logging

from .data import encode_prompt
from .data.encode import max_token_chars, past_rows, text_chars
from .data.loading import BadRow, RowSet, excerpt
from .recipe import RecipeError

log = logging.getLogger("posttrain")


def long_prompts(stage, rowset: RowSet, tok, context: int | None, vocab_rows: int | None = None) -> list[BadRow]:
    """RL prompts longer than data.max_len, or than the model's context less rollout.max_new_tokens, or holding a
    token past the model's embedding rows."""
    limit, room = stage.data.max_len, (context - stage.rollout.max_new_tokens if context else None)
    cap = min(limit, room) if room is not None else limit
    per_token = max_token_chars(tok)
    bad = []
    for i, row in enumerate(rowset.rows):
        chars = text_chars(row["prompt"])
        ids = None if chars > cap * per_token else encode_prompt(row["prompt"], tok)
        n = (chars + per_token - 1) // per_token if ids is None else len(ids)
        why = past_rows(ids, tok, vocab_rows) if ids is not None else None
        if why is None and n > limit:
            why = f"the prompt is {'at least ' if ids is None else ''}{n} tokens long, more than data.max_len={limit}"
        elif why is None and room is not None and n > room:
            why = (f"the prompt is {n} tokens long: with rollout.max_new_tokens={stage.rollout.max_new_tokens} it "
                   f"does not fit the model's context of {context} tokens")
        if why is not None:
            bad.append(BadRow(rowset.origin, rowset.number(i), "prompt", why, excerpt(row)))
    return bad


def check_template(stage, sd, tok, origin: str) -> None:
    """Chat-form data needs a chat template: say so before the model loads, for every method."""
    if getattr(tok, "chat_template", None):
        return
    for rowset in (sd.rows, sd.demos):
        for i, row in enumerate(rowset.rows if rowset is not None else []):
            if any(isinstance(row.get(k), list) for k in ("messages", "prompt", "completion")):
                raise RecipeError(f"stage {stage.name!r}: {rowset.origin} row {rowset.number(i)} is a chat (a list of "
                                  f"messages), but the tokenizer of {origin} has no chat template; set `chat_template:` "
                                  "in the recipe (Jinja text or a file), pair the model with a `tokenizer:` that has "
                                  "one, or give string prompts")


def explain_stage(stage, preset, sd, n_steps: int) -> None:
    """Say what the settings mean when they are easy to misread: optimizer steps vs. batches, repeated rows."""
    updates = stage.ppo_epochs * stage.minibatches
    if preset.needs_rewards and updates > 1:
        log.info("stage %s: %d optimizer steps are %d rollout batches (ppo_epochs %d x minibatches %d = %d updates "
                 "per batch); `steps` counts optimizer steps", stage.name, n_steps, -(-n_steps // updates),
                 stage.ppo_epochs, stage.minibatches, updates)
    pool = len(sd.encoded) if preset.data == "demonstrations" and sd.encoded is not None else \
        len(sd.rows.rows) if sd.rows is not None else None
    if pool is not None and pool < stage.batch.size:
        log.warning("stage %s: %d rows for a batch of %d: rows repeat within every step (data.limit or a small "
                    "dataset)", stage.name, pool, stage.batch.size)
