"""Recipes are strict: typos, wrong types, out-of-range values and impossible combinations fail before any
model loads, naming the key path and the closest valid key."""
import json

import pytest

from posttrain.cli import main
from posttrain.objective.presets import PRESETS
from posttrain.recipe import RecipeError, apply_overrides, load_recipe


def base(**stage):
    st = {"method": "grpo", "data": {"path": "x.jsonl"}, "rewards": [{"fn": "math"}]}
    st.update(stage)
    return {"model": "m", "stages": [st]}


def error_of(data, overrides=None) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(data, overrides)
    return str(e.value)


def test_typo_names_key_path_and_closest_key():
    msg = error_of(base(clip={"eps_hihg": 0.3}))
    assert "stages.0.clip.eps_hihg" in msg and "did you mean 'stages.0.clip.eps_high'" in msg


def test_top_level_typo_suggests_key():
    msg = error_of({"modle": "m", "stages": [base()["stages"][0]]})
    assert "modle" in msg and "'model'" in msg


def test_unknown_method_suggests_preset():
    msg = error_of(base(method="grpoo"))
    assert "stages.0.method" in msg and "did you mean 'grpo'" in msg and "dr_grpo" in msg


def test_wrong_type_and_out_of_range():
    assert "stages.0.steps" in error_of(base(steps="many"))
    assert "stages.0.rollout.temperature" in error_of(base(rollout={"temperature": 0}))
    assert "stages.0.clip.eps_low" in error_of(base(clip={"eps_low": 1.5}))


@pytest.mark.parametrize("stage,needle", [
    ({"kl": {"beta": 0.1, "estimator": "k1", "placement": "loss"}}, "zero expected gradient"),
    ({"rollout": {"group_size": 1}}, "group_size must be >= 2"),
    ({"rewards": []}, "needs `rewards`"),
    ({"method": "sft", "rewards": [{"fn": "math"}]}, "uses no rewards"),
    ({"method": "reinforce", "ppo_epochs": 2}, "weight 'one'"),
    ({"method": "dr_grpo", "dynamic_sampling": {"enabled": True}, "advantage": {"kind": "raw"}}, "group advantage"),
])
def test_impossible_combinations_are_refused(stage, needle):
    assert needle in error_of(base(**stage))


def test_preset_defaults_are_resolved_and_overrides_win():
    r = load_recipe(base(method="dapo"), ["stages.0.clip.eps_high=0.3", "seed=5"])
    s = r.stages[0]
    assert (s.clip.eps_low, s.clip.eps_high, s.aggregation, s.weight) == (0.2, 0.3, "tok", "ratio")
    assert s.dynamic_sampling.enabled and s.overlong.mask_truncated and r.seed == 5
    g = load_recipe(base()).stages[0]
    assert (g.kl.beta, g.kl.estimator, g.kl.placement, g.aggregation) == (0.04, "k3", "loss", "seq")


def test_override_parsing():
    d = apply_overrides({"stages": [{"a": 1}]}, ["stages.0.b.c=2", "x=[1, 2]", "y=text"])
    assert d == {"stages": [{"a": 1, "b": {"c": 2}}], "x": [1, 2], "y": "text"}
    with pytest.raises(RecipeError, match="not an index"):
        apply_overrides({"stages": []}, ["stages.3.a=1"])
    with pytest.raises(RecipeError, match="key.path=value"):
        apply_overrides({}, ["nonsense"])


def test_missing_recipe_file(tmp_path):
    assert "does not exist" in error_of(str(tmp_path / "nope.yaml"))
    msg = error_of("builtin:grpoo")
    assert "no built-in recipe builtin:grpoo (did you mean builtin:grpo?)" in msg and "dapo, dft" in msg


def test_cli_train_reports_recipe_errors_before_loading(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: does/not/exist\nstages:\n  - method: sft\n    data: {path: x.jsonl}\n    stepz: 3\n")
    assert main(["train", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "stages.0.stepz" in err and "did you mean 'stages.0.steps'" in err


def test_methods_json_lists_every_preset_with_components(capsys):
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(PRESETS)
    for r in rows:
        assert {"name", "advantage", "weight", "mask", "aggregation", "regularizers", "sources"} <= set(r)
    grpo = next(r for r in rows if r["name"] == "grpo")
    assert grpo["advantage"] == "group_zscore" and grpo["aggregation"] == "seq" and "k3" in grpo["regularizers"]


def test_methods_table_prints(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)


def test_shipped_recipes_validate():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    names = {p.stem for p in recipes}
    assert {"sft", "dft", "grpo", "dr_grpo", "dapo", "sft_then_grpo"} <= names
    for path in recipes:
        r = load_recipe(path)
        assert r.model and r.stages, path
        assert load_recipe(f"builtin:{path.stem}") == r  # the repository's recipes/ is the package's


def test_streams_sources_and_mix_resolve_from_the_preset_and_overrides_win():
    r = load_recipe(base(method="luffy"), ["stages.0.streams.demo.weight=phi", "stages.0.shaping_gamma=0.2",
                                           "stages.0.sources.demos_per_group=2"])
    s = r.stages[0]
    assert (s.streams.rollout.weight, s.streams.rollout.clip_level, s.streams.demo.weight) == ("ratio", "token", "phi")
    assert (s.shaping_gamma, s.sources.demos_per_group, s.normaliser) == (0.2, 2, "joint")
    c = load_recipe(base(method="chord_mu")).stages[0]
    assert (c.mix.mu_peak, c.mix.mu_valley, c.mix.mu_decay, c.sources.demo_share) == (0.9, 0.05, 200, 0.2)
    assert c.streams.demo.advantage == "one" and c.streams.rollout.advantage == "group"


@pytest.mark.parametrize("stage,needle", [
    ({"method": "grpo", "streams": {"demo": {"weight": "one"}}}, "has no 'demo' stream"),
    ({"method": "luffy", "sources": {"demos_per_group": 8}}, "at least one free rollout"),
    ({"method": "hpt_soft", "mix": {"soft_table": [[0.5, 1, 0], [0.2, 0, 1]]}}, "sorted by max_accuracy"),
    ({"method": "hpt_soft", "mix": {"soft_table": [[0.5, 1, 0]]}}, "covering accuracy 1.0"),
    ({"method": "grpo", "demos": {"path": "d.jsonl"}}, "reads no separate demonstrations"),
    ({"method": "luffy", "streams": {"rollout": {"weight": "seq_ratio"}}}, "mixes token and sequence"),
])
def test_impossible_hybrid_combinations_are_refused(stage, needle):
    assert needle in error_of(base(**stage))


def test_from_stage_must_name_an_earlier_data_making_stage():
    first = {"name": "a", "method": "grpo", "data": {"path": "x.jsonl"}, "rewards": [{"fn": "math"}]}
    later = {"name": "b", "method": "sft", "data": {"from_stage": "a"}}
    assert "makes no data" in error_of({"model": "m", "stages": [first, later]})
    assert "not an earlier stage" in error_of({"model": "m", "stages": [later, {**first, "name": "c"}]})
    rft = {**first, "method": "rft"}
    assert load_recipe({"model": "m", "stages": [rft, later]}).stages[1].data.from_stage == "a"
    assert "give one of path, task or from_stage" in error_of(
        {"model": "m", "stages": [rft, {**later, "data": {"from_stage": "a", "path": "y"}}]})


def test_the_recipe_key_reference_is_in_sync_with_the_config_classes(capsys):
    """docs/recipe-keys.md is `posttrain recipe-keys`; a new or changed key must be regenerated there."""
    from pathlib import Path

    from posttrain.cli import main

    assert main(["recipe-keys"]) == 0
    table = capsys.readouterr().out
    doc = (Path(__file__).parents[1] / "docs" / "recipe-keys.md").read_text()
    assert doc.endswith(table), "docs/recipe-keys.md is stale: regenerate it from `posttrain recipe-keys`"
    for key in ("`stages.N.lora.r`", "`checkpoint.every`", "`stages.N.reward_policy.max_error_rate`",
                "`stages.N.data.max_bad_fraction`", "`resize_embeddings`", "`chat_template`"):
        assert key in table
