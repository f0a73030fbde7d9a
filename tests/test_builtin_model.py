"""The shipped base model `builtin:tiny`: loadable by name, recorded recipe, and inside its accuracy band."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.cli import main
from posttrain.eval.task_eval import evaluate_task
from posttrain.models import load_policy, resolve_model, stop_token_ids

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base():
    model, tok = load_policy("builtin:tiny")
    return model, tok, stop_token_ids(tok, model)


def test_build_record_sits_beside_the_weights():
    path = Path(resolve_model("builtin:tiny"))
    record = json.loads((path / "BUILD.json").read_text())
    assert {"command", "seed", "corpus", "model", "training", "measured"} <= set(record)
    assert record["command"].startswith("python scripts/build_tiny.py")
    assert (path / "model.safetensors").stat().st_size < 8_000_000


def test_base_model_accuracy_band(base):
    """Greedy `id` accuracy in 20-40 %; each ood axis lower but alive (DESIGN.md §5); the worked format
    written only unreliably. MEASURED is what BUILD.json records for the shipped weights (48 new tokens)."""
    model, tok, stop = base
    kw = dict(n=300, max_new_tokens=48, stop_ids=stop, pad_id=tok.pad_token_id)
    ids = evaluate_task(model, tok, "arith", "id", **kw)
    assert 0.20 <= ids["accuracy"] <= 0.40, ids
    for split in ("ood", "ood_phrasing"):
        r = evaluate_task(model, tok, "arith", split, **kw)
        assert 0.0 < r["accuracy"] < ids["accuracy"], (split, r)
    assert ids["format"] < 0.5  # the worked format is written only unreliably: SFT has something to teach


def test_build_record_measures_every_split_with_pass_at_8():
    record = json.loads((Path(resolve_model("builtin:tiny")) / "BUILD.json").read_text())
    m = record["measured"]
    assert set(m) == {"id", "ood", "ood_phrasing"}
    assert 0.20 <= m["id"]["accuracy"] <= 0.40 and m["id"]["pass@8"] > m["id"]["accuracy"]
    # both out-of-distribution axes weak but movable (> 2 % greedy, > 10 % pass@8), as the issue asks
    for split in ("ood", "ood_phrasing"):
        assert m[split]["accuracy"] > 0.02 and m[split]["pass@8"] > 0.10, (split, m[split])
        assert m[split]["accuracy"] < m["id"]["accuracy"], (split, m[split])


def test_eval_command_on_builtin_task_json(capsys):
    assert main(["eval", "--model", "builtin:tiny", "--task", "arith", "--split", "ood", "--n", "40",
                 "--samples", "8", "--max-new-tokens", "48", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 40 and {"accuracy", "pass@8", "format", "steps", "demo_nll"} <= set(out)
    assert out["pass@8"] >= out["pass@1"]


def test_build_script_smoke_is_deterministic(tmp_path):
    """CI runs only a smoke of the build (a few steps; the shipped weights are committed), twice: the same
    seed must give the same tokenizer and the same weights, byte for byte."""
    outs = []
    for name in ("a", "b"):
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_tiny.py"), "--smoke", "--seed", "3",
                               "--out", str(tmp_path / name), "--threads", "1"], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(tmp_path / name)
    a, b = outs
    assert json.loads((a / "BUILD.json").read_text())["seed"] == 3 and (a / "config.json").is_file()
    for f in ("model.safetensors", "tokenizer.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_the_build_keeps_the_snapshot_closest_to_the_target_step_by_step():
    """The build's selector on a made-up accuracy curve that jumps from 10 % to 45 % between two snapshots 25
    steps apart: it evaluates the 25-step snapshots, then the 5-step ones between the two that straddle the
    target (not the others), and keeps the weights closest to it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_tiny", ROOT / "scripts" / "build_tiny.py")
    bt = importlib.util.module_from_spec(spec)
    sys.modules["build_tiny"] = bt  # its dataclasses look their module up
    spec.loader.exec_module(bt)
    curve = {s: 0.10 for s in range(0, 3101)} | {3105: 0.18, 3110: 0.27, 3115: 0.33, 3120: 0.40}
    curve |= {s: 0.45 for s in range(3125, 3251)}
    model = torch.nn.Linear(1, 1, bias=False)  # its weight holds the step it was saved at
    evaluated = []

    def dev_accuracy():
        step = round(model.weight.item())
        evaluated.append(step)
        return curve[step]

    selector = bt.Selector(model, dev_accuracy, coarse=25)
    for step in range(5, 3251, 5):
        with torch.no_grad():
            model.weight.fill_(step)
        if step % 250:
            selector.snapshot(step)
        else:
            selector.evaluate(step)
    assert selector.best["step"] == 3110 and selector.best["dev"] == 0.27
    assert selector.best["state"]["weight"].item() == 3110
    assert evaluated[-14:] == [3250, *range(3025, 3250, 25), 3105, 3110, 3115, 3120]
    assert round(model.weight.item()) == 3250  # the current weights are back


def test_the_shipped_reward_model_ensemble_loads_calibrated_and_ranks_held_out_pairs():
    """builtin:tiny-rm-* (scripts/build_reward_models.py): each member loads as a transformers sequence-classification
    model carrying the statistics BUILD.json says it was calibrated to, and the ensemble's worst case ranks the task's
    held-out rm_dev pairs (every kind of error) clearly above chance: its weights are fixed, so this is exact
    but for float rounding; 0.825 measured (miscopied operands 0.92, slips 0.62, wrong marks 0.40)."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.models import TINY_REWARD_MODELS
    from posttrain.reward_model import EnsembleReward
    from posttrain.tasks import get_task

    build = json.loads((Path(resolve_model("builtin:tiny-rm-onpolicy")) / "BUILD.json").read_text())
    assert set(build["members"]) == {n.removeprefix("builtin:tiny-rm-") for n in TINY_REWARD_MODELS}
    for name in TINY_REWARD_MODELS:
        cfg = AutoModelForSequenceClassification.from_pretrained(resolve_model(name)).config
        cal = build["members"][name.removeprefix("builtin:tiny-rm-")]["calibration"]
        assert cfg.num_labels == 1 and cfg.score_n == cal["score_n"]
        assert (cfg.score_mean, cfg.score_std) == pytest.approx((cal["score_mean"], cal["score_std"]), abs=1e-4)
    rows = get_task("arith").rows("rm_dev")
    prompts = [r["prompt"] for r in rows]
    ensemble = EnsembleReward(TINY_REWARD_MODELS)
    won = [c > r for c, r in zip(ensemble(prompts, [r["chosen"] for r in rows]),
                                 ensemble(prompts, [r["rejected"] for r in rows]))]
    assert sum(won) / len(won) >= 0.78, sum(won) / len(won)  # 0.825 (its members alone: 0.545 to 0.785)
