"""Packed demonstrations (`batch.pack`) against the padded batch: the same per-document log-probs, the same
loss and the same gradient through the trainer's path (Experience -> ObjectiveSpec -> accumulate_gradients);
`batch.pack: rows`, the data packed a window at a time by best fit."""
import json
import random

import pytest
import torch

from posttrain.data.batch import best_fit_rows, demo_batch, packed_demo_batch
from posttrain.data.encode import Encoded, encode_sft
from posttrain.logprobs import token_logprobs
from posttrain.recipe import RecipeError, load_recipe

ROWS = [{"prompt": f"Say {c} {i} times.", "completion": c * (i + 1)} for i, c in enumerate("ABCDEFG")]


def _stage(method="sft", **batch):
    return load_recipe({"model": "m", "stages": [{"method": method, "data": {"path": "x", "max_len": 40},
                                                  "batch": {"size": len(ROWS), **batch}}]}).stages[0]


def test_packing_fills_rows_in_order_and_restarts_positions():
    docs = [Encoded([1, 2, 3], [0, 1, 1]), Encoded([4, 5], [1, 1]), Encoded([6, 7, 8, 9], [0, 0, 1, 1]),
            Encoded([10], [1])]
    b = packed_demo_batch(docs, pad_id=0, pack_len=6)
    # first fit: [3 + 2 + 1 tokens] then [4]; the fourth document fills the first row's last slot
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5, 10], [6, 7, 8, 9, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    # a document's first token is never a loss token: its predictor would be the previous document
    assert b.loss_mask.tolist() == [[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0]]
    assert b.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    assert torch.equal(b.advantages, b.loss_mask) and b.group.tolist() == [0, 1]
    alone = packed_demo_batch([Encoded(list(range(1, 9)), [1] * 8)], pad_id=0, pack_len=6)  # longer: alone
    assert alone.input_ids.shape == (1, 8)


def test_best_fit_decreasing_puts_each_document_where_it_leaves_least_room():
    # longest first: 9 > 8 alone (row 0); 6 -> row 1 (room 2); 5 -> row 2 (room 3); 4 -> row 3 (room 4); 3 -> row 2,
    # the least room that holds it (3 of 3 and 4); 2 -> row 1 (2)
    assert best_fit_rows([5, 3, 4, 2, 6, 9], 8) == [[5], [4, 3], [0, 1], [2]]
    assert best_fit_rows([], 8) == []
    g = random.Random(0)
    lengths = [g.randint(20, 70) for _ in range(400)]
    rows = best_fit_rows(lengths, 128)
    assert sorted(i for r in rows for i in r) == list(range(400))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    # fuller than the in-order first fit of the same documents (the step-wise batch.pack: true)
    first_fit = packed_demo_batch([Encoded([1] * n, [1] * n) for n in lengths], 0, 128).input_ids.shape[0]
    assert len(rows) < first_fit and sum(lengths) / (128 * len(rows)) > 0.9


@pytest.mark.parametrize("group", [1, 3])
def test_rows_packed_a_window_at_a_time_hold_every_document_once_an_epoch_and_resume(group):
    from posttrain.training.sources import PackedDemonstrations

    g = random.Random(1)
    docs = [Encoded([k + 1] * g.randint(1, 6), [1] * 6) for k in range(13)]  # (a document's id in its tokens)
    kw = dict(seed=4, shuffle=True, pack_len=8, window=5, group=group)
    src = PackedDemonstrations(docs, **kw)
    seen: dict[int, list[int]] = {}
    for _ in range(40):
        (row,) = src.take_rows(1)
        assert 1 <= len(row) and sum(len(d.input_ids) for d in row) <= 8
        seen.setdefault(src.cursor.epoch, []).extend(d.input_ids[0] for d in row)
    assert len(seen) >= 3
    for epoch in sorted(seen)[:-1]:  # every finished epoch: each document exactly once
        assert sorted(seen[epoch]) == list(range(1, 14)), epoch
    assert seen[0] != seen[1]  # a fresh order each epoch
    a = PackedDemonstrations(docs, **kw)
    a.take_rows(4)  # (with runs of 3: a step begun in one window ends in the next)
    b = PackedDemonstrations(docs, **kw)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [[d.input_ids for d in r] for r in b.take_rows(20)] == [[d.input_ids for d in r] for r in a.take_rows(20)]


def test_a_steps_packed_rows_are_of_similar_length():
    """Runs of `group` rows of similar length, so a step padded to its longest row wastes few positions; a step
    that straddles two windows keeps its size."""
    from posttrain.training.sources import PackedDemonstrations

    g = random.Random(2)
    docs = [Encoded([1] * max(10, int(g.gauss(46, 8))), [1] * 70) for _ in range(3000)]  # the benchmark's ~46

    def waste(group):
        src = PackedDemonstrations(docs, seed=0, shuffle=True, pack_len=128, window=500, group=group)
        pad = real = 0
        for _ in range(200):
            lengths = [sum(len(d.input_ids) for d in row) for row in src.take_rows(8)]
            pad, real = pad + 8 * max(lengths), real + sum(lengths)
        return 1 - real / pad

    assert waste(8) < 0.02 < 0.05 < waste(1)  # measured 0.010 and 0.075


def test_packed_logprobs_equal_each_document_alone(make_model, arch, tokenizer):
    model = make_model(arch).eval()
    docs = [encode_sft(r, "prompt_completion", tokenizer) for r in ROWS]
    packed = packed_demo_batch(docs, tokenizer.eos_token_id, pack_len=40)
    assert packed.size < len(docs)
    with torch.no_grad():
        logp, ent = token_logprobs(model, packed.input_ids, packed.attention_mask, with_entropy=True,
                                   position_ids=packed.position_ids)
        padded = demo_batch(docs, tokenizer.eos_token_id)
        ref, ref_ent = token_logprobs(model, padded.input_ids, padded.attention_mask, with_entropy=True)
    got = [(logp * packed.loss_mask)[packed.loss_mask > 0], (ent * packed.loss_mask)[packed.loss_mask > 0]]
    want = [(ref * padded.loss_mask)[padded.loss_mask > 0], (ref_ent * padded.loss_mask)[padded.loss_mask > 0]]
    # the same supervised tokens, packed rows in document order: compare as sorted multisets per row order
    assert got[0].numel() == want[0].numel() > 0
    torch.testing.assert_close(got[0].sort().values, want[0].sort().values, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1].sort().values, want[1].sort().values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["sft", "dft"])
def test_packed_step_gives_the_padded_steps_loss_and_gradient(make_model, tokenizer, method):
    """The trainer's step on the same demonstrations, packed or padded, micro-batched: equal loss and gradient."""
    from posttrain.training.experience import Experience
    from posttrain.training.sources import Demonstrations
    from posttrain.training.update import ObjectiveSpec, accumulate_gradients

    model = make_model("llama", dtype=torch.float64)
    docs = [encode_sft(r, "prompt_completion", tokenizer) for r in ROWS]
    out = {}
    for pack in (False, True):
        st = _stage(method, pack=pack, micro_size=2)
        exp = Experience(st, tokenizer, pad_id=tokenizer.eos_token_id, demos=Demonstrations(docs, 0, False))
        batch = exp.make(model, 0, None).batch
        assert (batch.position_ids is not None) == pack
        model.zero_grad()
        stats = accumulate_gradients(model, batch, ObjectiveSpec.from_stage(st), micro_size=2, device="cpu")
        out[pack] = (batch, float(stats[0]), [p.grad.clone() for p in model.parameters()])
    assert out[True][0].size < out[False][0].size  # fewer rows
    assert out[True][1] == pytest.approx(out[False][1], abs=1e-6)  # the estimator runs in fp32
    for g, h in zip(out[True][2], out[False][2]):
        torch.testing.assert_close(g, h, atol=1e-7, rtol=1e-5)


def test_pack_is_refused_where_per_sequence_statistics_matter():
    _stage("sft", pack=True), _stage("dft", pack="rows")
    for pack in (True, "rows"):
        for method, extra in [("grpo", {"rewards": [{"fn": "exact"}]}), ("dpo", {}), ("kd", {})]:
            st = {"method": method, "data": {"path": "x"}, "batch": {"pack": pack}, **extra}
            with pytest.raises(RecipeError, match="batch.pack"):
                load_recipe({"model": "m", "teacher": "t", "stages": [st]})
    with pytest.raises(RecipeError, match="batch.pack"):
        _stage("sft", pack="epoch")


@pytest.mark.parametrize("arch_name", ["llama", "qwen2"])
def test_activation_checkpointing_keeps_the_loss_and_gradient(make_model, tokenizer, arch_name):
    """`batch.activation_checkpointing` recomputes the layers in backward: the trainer's step gives the same loss and
    gradient, and the switch turns off again (the model as the next stage and evaluation see it)."""
    from posttrain.models import set_activation_checkpointing
    from posttrain.training.experience import Experience
    from posttrain.training.sources import Demonstrations
    from posttrain.training.update import ObjectiveSpec, accumulate_gradients

    model = make_model(arch_name, dtype=torch.float64)
    docs = [encode_sft(r, "prompt_completion", tokenizer) for r in ROWS]
    st = _stage("sft", micro_size=3, activation_checkpointing=True)
    batch = Experience(st, tokenizer, pad_id=tokenizer.eos_token_id, demos=Demonstrations(docs, 0, False)) \
        .make(model, 0, None).batch
    out = {}
    for on in (False, True):
        set_activation_checkpointing(model, on)
        assert model.is_activation_checkpointing == on
        model.zero_grad()
        stats = accumulate_gradients(model, batch, ObjectiveSpec.from_stage(st), micro_size=3, device="cpu")
        out[on] = (float(stats[0]), [p.grad.clone() for p in model.parameters()])
    set_activation_checkpointing(model, False)
    assert not model.is_activation_checkpointing
    assert out[True][0] == out[False][0]
    for g, h in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(g, h, atol=1e-12, rtol=1e-10)
