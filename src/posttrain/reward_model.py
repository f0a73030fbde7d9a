"""Reward models: a Bradley-Terry scalar head on a causal LM's backbone (algorithms.md §4.2).

    r(x, y) = w . h_L(x, y) (+ b),   h_L the backbone's last hidden state at the last real token of x + y

The model is a transformers `*ForSequenceClassification` with one label, built from the policy's backbone and
a fresh head (`from_policy`), trained on preference pairs with L = -log sigma(r_w - r_l) (method
`reward_model`), and saved as it is: `AutoModelForSequenceClassification.from_pretrained(DIR)` loads it and
gives the same scores (both read the last token that is not `pad_token_id`, set in the config). `ModelReward` scores completions with it inside an RL
stage, batched, as the reward `{fn: model, path: DIR}`.

Each saved reward model records the mean and standard deviation of its scores (`score_mean`, `score_std` in its
config.json; `calibrate` sets them on other responses), so that several reward models trained on different
pairs can be put on one scale: `EnsembleReward` (`{fn: model, path: [A, B, ...], ensemble: min}`) pays the
worst of the members' standardised scores, which a policy can only raise by pleasing all of them at once
(worst-case ensemble optimisation against reward over-optimisation, Coste et al. 2023).
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Sequence

import torch
from torch import Tensor

from .logprobs import last_hidden, position_ids_from_mask

log = logging.getLogger("posttrain")


def _head(model) -> torch.nn.Module:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise ValueError(f"{type(model).__name__} has no scalar head (`score` or `classifier`): a reward model is a "
                     "transformers *ForSequenceClassification model with num_labels=1")


def _hidden(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T, D) the backbone's last hidden states of right-padded rows."""
    return last_hidden(model, dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                   position_ids=position_ids_from_mask(attention_mask)))


def sequence_scores(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B,) the head's scalar at the last real, non-pad token of each right-padded row; differentiable."""
    hidden = _hidden(model, input_ids, attention_mask)
    # The last real token that is not the pad id: transformers' own pooling, so a model loaded with
    # AutoModelForSequenceClassification scores alike (where pad is eos, a final eos is skipped by both).
    real = attention_mask.bool()
    pad = getattr(model.config, "pad_token_id", None)
    if pad is not None:
        real = real & (input_ids != pad)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * real).argmax(-1)  # (B,)
    h = hidden[torch.arange(len(last), device=hidden.device), last]  # (B, D)
    r = _head(model)(h).squeeze(-1)
    return r.to(torch.promote_types(r.dtype, torch.float32))  # a bf16 model's scores in fp32


def token_values(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T) a value model's V(s_t) aligned with the tokens like `token_logprobs`: column t holds the head's
    scalar after tokens 0..t-1, the state token t is sampled from; column 0 and padding are 0. Differentiable."""
    return values_at_tokens(_head(model), _hidden(model, input_ids, attention_mask), attention_mask)


def values_at_tokens(head: torch.nn.Module, hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T) a scalar head's outputs on hidden states (B, T, D), aligned with the tokens: column t reads the
    state after tokens 0..t-1; column 0 and padding are 0; at >= fp32."""
    v = head(hidden[:, :-1]).squeeze(-1)  # (B, T-1)
    v = torch.nn.functional.pad(v.to(torch.promote_types(v.dtype, torch.float32)), (1, 0))
    return v * attention_mask.to(v.dtype)


def from_policy(policy, pad_id: int) -> torch.nn.Module:
    """A one-label sequence-classification model with `policy`'s backbone weights and a fresh head (drawn from
    the global torch RNG, like any new layer), on the policy's device and dtype."""
    from transformers import AutoModelForSequenceClassification

    cfg = copy.deepcopy(policy.config)
    cfg.num_labels, cfg.pad_token_id, cfg.architectures = 1, pad_id, None
    cfg.id2label, cfg.label2id = {0: "reward"}, {"reward": 0}
    param = next(policy.parameters())
    rm = AutoModelForSequenceClassification.from_config(cfg, dtype=param.dtype)
    missing, unexpected = rm.base_model.load_state_dict(policy.base_model.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"the policy's backbone does not fit {type(rm).__name__}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return rm.to(param.device)


SCORE_STATS_PAIRS = 4096  # pairs whose responses give a reward model's score statistics


def _stats(scores: list[float], what: str) -> dict:
    t = torch.tensor(scores, dtype=torch.float64)
    if len(t) < 2 or not float(t.std()) > 0:
        raise ValueError(f"{what} needs responses with different scores; got {len(t)} scores")
    return {"score_mean": float(t.mean()), "score_std": float(t.std()), "score_n": len(t)}


@torch.no_grad()
def pair_scores(model, pairs: Sequence, pad_id: int, *, batch_size: int = 32, device: str = "cpu"):
    """Yields (batch, scores (2k,) float64 on the CPU) for each `pair_batch` of encoded pairs, the model in eval
    mode meanwhile (its mode restored after)."""
    from .data.batch import pair_batch

    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(pairs), batch_size):
            b = pair_batch(pairs[i: i + batch_size], pad_id).to(device)
            yield b, sequence_scores(model, b.input_ids, b.attention_mask).double().cpu()
    finally:
        model.train(was_training)


def score_statistics(model, pairs: Sequence, pad_id: int, *, batch_size: int = 32, device: str = "cpu",
                     limit: int = SCORE_STATS_PAIRS) -> dict:
    """{"score_mean", "score_std", "score_n"} of the scores of both responses of the first `limit` encoded
    pairs: the unit `ModelReward(normalize=True)` and `EnsembleReward` measure this model's scores in."""
    scores = [x for _, r in pair_scores(model, list(pairs)[:limit], pad_id, batch_size=batch_size, device=device)
              for x in r.tolist()]
    return _stats(scores, "a reward model's score statistics")


def calibrate(path: str, prompts: Sequence, completions: Sequence, *, out: str | None = None) -> dict:
    """Re-measure the score statistics of the reward model at `path` (a local directory) on these responses
    (e.g. the starting policy's own samples, so that an ensemble's members are standardised on what the RL
    stage will score) and write them into its config.json, or into a copy of the model at `out`."""
    import shutil

    from .models import resolve_model

    reward = ModelReward(path)
    stats = _stats(reward(prompts, completions), f"calibrating {path!r}")
    where = resolve_model(path)
    if out is not None:
        shutil.copytree(where, out, dirs_exist_ok=True)
        where = out
    reward.model.config.update(stats)
    reward.model.config.to_json_file(f"{where}/config.json")
    return stats


def load(path: str, *, dtype="auto", device: str = "cpu"):
    """(model, tokenizer) of a saved reward model (a local directory or hub id), frozen, in eval mode."""
    from transformers import AutoModelForSequenceClassification

    from .models import choose_dtype, load_tokenizer, resolve_model

    where = resolve_model(path)
    model = AutoModelForSequenceClassification.from_pretrained(where, dtype=choose_dtype(dtype, device))
    if model.config.num_labels != 1:
        raise ValueError(f"reward model {path!r} has {model.config.num_labels} labels; a reward model has one "
                         "(a scalar score)")
    tok = load_tokenizer(resolve_model(path, required_file="tokenizer_config.json"))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval().requires_grad_(False), tok


class ModelReward:
    """A reward function (TRL signature) that scores each prompt + completion with a reward model, batched.

    The text is encoded as the reward model was trained on pairs (`data.encode.encode_response`: the chat
    template for message lists), with the reward model's own tokenizer, so it need not share the policy's.
    `normalize`: scores standardised by the model's recorded statistics, (r - score_mean) / score_std.
    """

    def __init__(self, path: str, *, batch_size: int = 32, device: str = "cpu", max_len: int | None = None,
                 normalize: bool = False):
        self.path, self.batch_size, self.device = path, batch_size, device
        self.model, self.tok = load(path, device=device)
        self.max_len = max_len or getattr(self.model.config, "max_position_embeddings", None)
        self.shift, self.scale = 0.0, 1.0
        if normalize:
            mean, std = (getattr(self.model.config, k, None) for k in ("score_mean", "score_std"))
            if mean is None or not (std or 0) > 0:
                raise ValueError(f"reward model {path!r} has no score statistics (score_mean and a positive "
                                 "score_std in its config.json) to standardise its scores by: a reward_model stage "
                                 "records them; for another model run posttrain.reward_model.calibrate(path, "
                                 "prompts, completions) on responses like the ones it will score")
            self.shift, self.scale = float(mean), float(std)
        self.__name__ = "model"
        log.info("reward model %s loaded on %s", path, device)

    @torch.no_grad()
    def __call__(self, prompts: Sequence, completions: Sequence, **kw: Any) -> list[float]:
        from .data.batch import ROLLOUT, Row, collate
        from .data.encode import encode_response

        ids = [encode_response(p, c, self.tok).input_ids for p, c in zip(prompts, completions)]
        if self.max_len:
            ids = [x[-self.max_len:] for x in ids]  # keep the response's end, where the score is read
        out: list[float] = []
        for i in range(0, len(ids), self.batch_size):
            b = collate([Row(x, [1] * len(x), ROLLOUT, j) for j, x in enumerate(ids[i: i + self.batch_size])],
                        self.tok.pad_token_id).to(self.device)
            out += ((sequence_scores(self.model, b.input_ids, b.attention_mask).double() - self.shift)
                    / self.scale).tolist()
        return out


ENSEMBLES = ("min", "mean")


class EnsembleReward:
    """A reward function (TRL signature) from several reward models: each one's scores standardised by its
    recorded statistics, z_k = (r_k - score_mean_k) / score_std_k, then `min` (default: the worst case, which a
    policy raises only by pleasing every member) or `mean` over the members k."""

    def __init__(self, paths: Sequence[str], *, ensemble: str = "min", **options: Any):
        if ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {ENSEMBLES}; got {ensemble!r}")
        if len(paths) < 2:
            raise ValueError(f"an ensemble needs at least two reward models; got {list(paths)}")
        self.paths, self.ensemble = list(paths), ensemble
        self.members = [ModelReward(p, normalize=True, **options) for p in paths]
        self.__name__ = "model"

    def __call__(self, prompts: Sequence, completions: Sequence, **kw: Any) -> list[float]:
        z = torch.tensor([m(prompts, completions) for m in self.members], dtype=torch.float64)  # (K, N)
        return (z.min(0).values if self.ensemble == "min" else z.mean(0)).tolist()
