"""Held-out preference accuracy: how often a policy's implicit reward ranks the chosen response above the
rejected one (research/algorithms.md §4.3), with the margins of the same formulas training uses
(objective/preference.py), from one no-grad forward pass of the policy (and of the reference for DPO / IPO).

A tie (margin exactly 0, as for DPO at its reference) counts one half: chance is 0.5 for every method.
"""
from __future__ import annotations

import torch

from ..data.batch import pair_batch
from ..data.encode import encode_pair
from ..logprobs import token_logprobs
from ..objective.preference import NEEDS_REFERENCE, PreferenceSpec, preference_terms


@torch.no_grad()
def _logp(model, batch, device) -> torch.Tensor:
    b = batch.to(device)
    lp, _ = token_logprobs(model, b.input_ids, b.attention_mask)
    return lp.double().cpu()


@torch.no_grad()
def preference_accuracy(model, tok, rows: list[dict], spec: PreferenceSpec, *, ref_model=None,
                        batch_size: int = 16, device: str = "cpu") -> dict:
    """{"n", "pref_accuracy", "margin"} of `model` on preference rows (prompt, chosen, rejected), under the
    margin of `spec.kind` (DPO / IPO against `ref_model`; KTO, trained on unpaired rows, by DPO's margin)."""
    if spec.kind == "kto":  # unpaired training, paired judgement: the implicit rewards beta log(pi / pi_ref)
        spec = PreferenceSpec("dpo", spec.beta)
    if spec.kind in NEEDS_REFERENCE and ref_model is None:
        raise ValueError(f"{spec.kind}'s margin is measured against a reference model; pass ref_model")
    pairs = [encode_pair(r, tok) for r in rows]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    margins = []
    for i in range(0, len(pairs), batch_size):
        b = pair_batch(pairs[i: i + batch_size], pad, dtype=torch.float64)
        ref = _logp(ref_model, b, device) if spec.kind in NEEDS_REFERENCE else None
        n = len(b.group) // 2
        terms = preference_terms(spec, _logp(model, b, device), b.loss_mask, b.group, b.pair_sign, ref_logp=ref,
                                 num_pairs=n, chosen_tokens=float(b.loss_mask[0::2].sum()))
        margins.append(terms.margin)
    return _ranked(margins)


def _ranked(margins: list[torch.Tensor]) -> dict:
    """{"n", "pref_accuracy" (ties one half), "margin" (the mean)} of per-pair margins."""
    m = torch.cat(margins).double() if margins else torch.zeros(0, dtype=torch.float64)
    won = (m > 0).double() + 0.5 * (m == 0).double()
    return {"n": len(m), "pref_accuracy": float(won.mean()) if len(m) else float("nan"),
            "margin": float(m.mean()) if len(m) else float("nan")}


@torch.no_grad()
def reward_model_accuracy(model, pairs: list, pad_id: int, *, kinds: list | None = None, batch_size: int = 32,
                          device: str = "cpu") -> dict:
    """{"n", "pref_accuracy", "margin"} of a reward model on encoded pairs: how often its score ranks the chosen
    response above the rejected one (ties one half), and the mean score margin r_w - r_l. With `kinds` (one label
    per pair, e.g. the kind of error in the rejected response), also "by_kind": {kind: {"n", "pref_accuracy",
    "margin"}}, which says what the reward model has learned to see and what it has not."""
    from ..objective.preference import pair_index
    from ..reward_model import pair_scores

    margins = []
    for b, r in pair_scores(model, pairs, pad_id, batch_size=batch_size, device=device):
        w, lo = pair_index(b.group.cpu(), b.pair_sign.cpu())
        margins.append(r[w] - r[lo])
    out = _ranked(margins)
    if kinds is not None:
        m = torch.cat(margins) if margins else torch.zeros(0, dtype=torch.float64)
        out["by_kind"] = {str(k): _ranked([m[[i for i, x in enumerate(kinds) if x == k]]])
                          for k in sorted(set(kinds), key=str)}
    return out
