"""The study: budget matching, maj@k and KL-to-base, the findings generator, and a comparison end to end whose
report holds the numbers of its run directories."""
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from posttrain.eval.forgetting import kl_to_base
from posttrain.eval.metrics import maj_at_k
from posttrain.recipe import RecipeError, recipe_data
from posttrain.run import train
from posttrain.study.budget import Budget, match, rows_per_step
from posttrain.study.compare import _Job, run_study
from posttrain.study.evaluate import EvalSpec
from posttrain.study.findings import compare, findings, spearman

# ---- maj@k, KL to the base ---------------------------------------------------------------------------


@pytest.mark.parametrize("answers,scores,k,expected", [
    (["5", "5", "3"], [1.0, 1.0, 0.0], 3, 1.0),         # majority right
    (["3", "5", "3"], [0.0, 1.0, 0.0], 3, 0.0),         # majority wrong although one sample is right
    (["3", "5", "3", "5", "5"], [0, 1, 0, 1, 1], 3, 0.0),  # only the first k vote
    (["5", "3"], [1.0, 0.0], 2, 1.0),                   # a tie goes to the answer given first
    (["3", "5"], [0.0, 1.0], 2, 0.0),
    ([None, None, "5"], [math.nan, math.nan, 1.0], 3, 1.0),  # unreadable samples do not vote
    ([None, None], [math.nan, math.nan], 2, 0.0),       # nothing readable: wrong
])
def test_maj_at_k_hand_computed(answers, scores, k, expected):
    assert maj_at_k(answers, scores, k) == expected


def test_kl_to_base_is_zero_for_the_base_and_positive_for_another_model(make_model):
    base, other = make_model("llama", seed=0), make_model("llama", seed=1)
    prompts = [[5, 17, 33], [41, 2], [7, 7, 200, 64]]
    kw = dict(stop_ids=list(range(40, 90)), pad_id=0, max_new_tokens=8, seed=0)
    same = kl_to_base(base, base, prompts, **kw)
    assert same["kl_token"] == 0.0 and same["kl_seq"] == 0.0 and same["tokens"] > 0 and same["entropy"] > 0
    diff = kl_to_base(other, base, prompts, **kw)
    assert diff["kl_token"] > 0.01


def test_kl_to_base_equals_a_plain_enumeration(make_model):
    """Per token: sum_v p (log p - log b) from two full-vocabulary forwards, written out here."""
    p_model, b_model = make_model("llama", seed=0), make_model("llama", seed=2)
    prompt = [5, 17, 33]
    r = kl_to_base(p_model, b_model, [prompt], stop_ids=[1], pad_id=0, max_new_tokens=6, seed=3)
    from posttrain.rollout.sampler import sample

    ro = sample(p_model, [prompt], max_new_tokens=6, stop_ids=[1], pad_id=0,
                generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([prompt + ro.completion_ids[0]])
    with torch.no_grad():
        lp = torch.log_softmax(p_model(ids).logits[0], -1)
        lb = torch.log_softmax(b_model(ids).logits[0], -1)
    pos = range(len(prompt) - 1, ids.shape[1] - 1)  # positions predicting the completion's tokens
    kls = [float((lp[t].exp() * (lp[t] - lb[t])).sum()) for t in pos]
    assert r["kl_token"] == pytest.approx(sum(kls) / len(kls), rel=1e-5)


# ---- budget matching -----------------------------------------------------------------------------------


def test_budget_parse_and_errors():
    assert Budget.parse("samples=6400") == Budget("samples", 6400) and str(Budget.parse("steps=1e3")) == "steps=1000"
    for bad in ("samples", "flops=3", "steps=-1", "tokens=x"):
        with pytest.raises(ValueError):
            Budget.parse(bad)


def test_match_splits_steps_and_samples_across_stages():
    raw, _ = recipe_data("builtin:sft_then_grpo")  # sft 200 steps x 16 rows, grpo 100 steps x 64 rows
    steps = match(raw, Budget("steps", 150))
    assert [s["steps"] for s in steps["stages"]] == [100, 50]
    samples = match(raw, Budget("samples", 4800))  # nominal 3200 + 6400 = 9600 samples: half of each
    assert [s["stop"]["samples"] for s in samples["stages"]] == [1600, 3200]
    assert samples["stages"][0]["steps"] == 100  # demonstrations: exactly 16 rows a step
    assert samples["stages"][1]["steps"] == math.ceil(1.25 * 3200 / 64)  # rollouts: room for filtered rows
    assert rows_per_step(raw["stages"][1]) == 64 and match(raw, None) == raw
    dpo, _ = recipe_data("builtin:sft_then_dpo")  # a DPO step of 16 pairs trains 32 rows: chosen and rejected
    assert rows_per_step(dpo["stages"][1]) == 32 and rows_per_step({"method": "kto", "batch": {"size": 8}}) == 8
    assert rows_per_step({"method": "online_dpo", "batch": {"size": 8}, "rollout": {"group_size": 4}}) == 16
    assert match(dpo, Budget("samples", 3200))["stages"][1]["steps"] == 50  # exact: offline pairs


@pytest.mark.slow
@pytest.mark.parametrize("name,kind,amount", [("sft", "samples", 100), ("grpo", "samples", 100),
                                              ("luffy", "samples", 100), ("chord_mu", "samples", 100),
                                              ("sft_then_dpo", "samples", 100), ("opd", "samples", 100),
                                              ("sft", "tokens", 500), ("grpo", "tokens", 500)])
def test_matched_runs_spend_the_budget_within_one_batch(tmp_path, name, kind, amount):
    raw, _ = recipe_data(f"builtin:{name}")
    raw.pop("eval")
    for s in raw["stages"]:
        s["batch"]["size"] = 4
        if "rollout" in s:
            s["rollout"].update(group_size=4, max_new_tokens=24)
    cfg = match(raw, Budget(kind, amount))
    train(cfg, out=tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    key = "samples" if kind == "samples" else "trained_tokens"
    used = sum(r.get(key, 0) for r in rows)
    last = rows[-1].get(key, 0)
    assert amount <= used < amount + last + 1, (used, last)  # stops at the first step reaching the budget


# ---- findings --------------------------------------------------------------------------------------------


def _agg(recipe, family, **means):
    out = {"recipe": recipe, "method": recipe, "family": family, "seeds": 3, "failed": 0}
    for k, (m, s) in means.items():
        out[k] = {"mean": m, "std": s, "n": 3}
    return out


def _summary(recipes: list[dict], runs=()) -> dict:
    return {"recipes": {r["recipe"]: r for r in recipes}, "splits": ["id", "ood"], "n_per_split": 300,
            "base": {"accuracy/id": 0.26, "accuracy/ood": 0.02}, "runs": list(runs),
            "study": {"budget": "samples=100", "eval": {}}}


def test_findings_name_a_clear_winner_and_ties_within_the_spread():
    a = _agg("grpo", "rl", **{"accuracy/id": (0.60, 0.01), "accuracy/ood": (0.05, 0.01)})
    b = _agg("sft", "sft", **{"accuracy/id": (0.40, 0.01), "accuracy/ood": (0.045, 0.01)})
    f = findings(_summary([a, b]))
    id_f = next(x for x in f if x["topic"] == "id")
    assert id_f["best"] == "grpo" and id_f["ties"] == [] and "clearly ahead" in id_f["text"]
    assert "+20.0 points over sft" in id_f["text"]
    ood_f = next(x for x in f if x["topic"] == "ood")
    assert ood_f["best"] == "grpo" and ood_f["ties"] == ["sft"] and "within the spread" in ood_f["text"]
    diff, se, clear = compare(a, b, "accuracy/ood", 300)
    assert clear is False and abs(diff - 0.005) < 1e-12


def test_a_claim_without_both_families_is_not_tested_and_says_what_is_missing():
    def family_claims(recipes):  # the two claims that compare the RL and SFT families
        return [x["text"] for x in findings(_summary(recipes))
                if x["topic"] == "claim" and x["claim"].startswith(("RL forgets", "RL generalises"))]

    texts = family_claims([_agg("grpo", "rl", **{"accuracy/id": (0.6, 0.01)})])
    assert len(texts) == 2 and all(t.endswith("not tested, the study has no SFT-only recipe.") for t in texts)
    texts = family_claims([_agg("luffy", "hybrid", **{"accuracy/id": (0.6, 0.01)})])
    assert len(texts) == 2 and all(t.endswith("has no RL-only and no SFT-only recipe.") for t in texts)


def test_findings_report_a_disagreement_with_a_paper_as_it_is():
    """SFT generalising better than RL out of distribution (beyond the spread) contradicts arXiv 2501.17161."""
    rl = _agg("grpo", "rl", **{"accuracy/id": (0.60, 0.01), "accuracy/ood": (0.05, 0.005), "id_accuracy": (0.6, 0.01),
                               "kl_to_base": (0.30, 0.01), "plain_nll_drift": (0.02, 0.001)})
    sft = _agg("sft", "sft", **{"accuracy/id": (0.60, 0.01), "accuracy/ood": (0.20, 0.005), "id_accuracy": (0.6, 0.01),
                                "kl_to_base": (0.10, 0.01), "plain_nll_drift": (0.005, 0.001)})
    f = findings(_summary([rl, sft]))
    ood_claim = next(x for x in f if x["topic"] == "claim" and x.get("split") == "ood")
    assert ood_claim["verdict"] == "disagrees" and "disagrees with" in ood_claim["text"]
    forget = next(x for x in f if x["topic"] == "claim" and "forgets" in x["claim"])
    assert forget["verdict"] == "disagrees" and "at gains within the spread" in forget["text"]


def test_forgetting_at_unmatched_gain_is_not_called_agreement():
    """RL forgetting less while also learning clearly less does not test "forgets less at matched gain"; RL
    forgetting less while learning more does."""
    def pair(rl_gain):
        rl = _agg("grpo", "rl", **{"id_accuracy": (rl_gain, 0.01), "kl_to_base": (0.05, 0.005),
                                   "plain_nll_drift": (0.002, 0.001)})
        sft = _agg("sft", "sft", **{"id_accuracy": (0.80, 0.01), "kl_to_base": (0.25, 0.005),
                                    "plain_nll_drift": (0.045, 0.001)})
        return next(x for x in findings(_summary([rl, sft])) if x["topic"] == "claim" and "forgets" in x["claim"])
    less = pair(0.40)
    assert less["verdict"] == "inconclusive" and "RL also learned less" in less["text"], less["text"]
    assert "neither confirms nor refutes" in less["text"]
    assert pair(0.95)["verdict"] == "agrees" and pair(0.80)["verdict"] == "agrees"


def test_one_seed_is_said_and_spearman_is_right():
    one = _agg("grpo", "rl", **{"accuracy/id": (0.5, None)})
    one["seeds"] = 1
    assert "One seed per recipe" in findings(_summary([one]))[0]["text"]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None


# ---- a comparison end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    spec = EvalSpec(n=12, samples=2, kl_n=6, curve_every=2)
    summary = run_study(["builtin:sft", "builtin:grpo"], out=out, budget=Budget("samples", 128), jobs=2, spec=spec)
    return out, summary, spec


@pytest.mark.slow
def test_compare_writes_every_report_file_with_the_fields(study):
    out, summary, _ = study
    for name in ("report.html", "report.md", "summary.json", "curves_samples.png", "curves_tokens.png",
                 "curves_wall.png", "train_reward.png", "id_vs_ood.png", "forgetting_vs_gain.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "summary.json").read_text())
    assert saved["study"]["budget"] == "samples=128"
    for r in saved["runs"]:
        assert r["status"] == "done", r
        for key in ("name", "method", "seed", "id_accuracy", "ood_accuracy", "plain_nll_drift", "kl_to_base",
                    "generated_tokens", "trained_tokens", "flops", "wall_s"):
            assert r[key] is not None, (r["name"], key)
        assert set(r["ood_accuracy"]) == {"ood", "ood_phrasing"}
        assert r["curve"] and r["curve"][0]["samples"] == 0  # the learning curve starts at the base
    assert saved["base"]["id_accuracy"] is not None and saved["base"]["kl_to_base"] == 0.0
    grpo = next(r for r in saved["runs"] if r["recipe"] == "grpo")
    sft = next(r for r in saved["runs"] if r["recipe"] == "sft")
    assert grpo["generated_tokens"] > 0 and sft["generated_tokens"] == 0
    assert 128 <= grpo["samples"] < 128 + 64 and 128 <= sft["samples"] < 128 + 16


@pytest.mark.slow
def test_report_numbers_equal_the_run_directories(study):
    out, summary, _ = study
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for r in summary["runs"]:
        d = out / "runs" / r["name"]
        ev = json.loads((d / "eval.json").read_text())
        assert r["id_accuracy"] == ev["id"]["accuracy"] and r["ood_accuracy"]["ood"] == ev["ood"]["accuracy"]
        assert r["kl_to_base"] == ev["kl"]["kl_token"]
        metrics = [json.loads(x) for x in (d / "train" / "metrics.jsonl").read_text().splitlines()]
        assert r["trained_tokens"] == sum(m.get("trained_tokens", 0) for m in metrics)
        base_nll = json.loads((out / "base" / "eval.json").read_text())["plain"]["nll"]
        assert r["plain_nll_drift"] == pytest.approx(ev["plain"]["nll"] - base_nll)
        cell = f"{100 * ev['id']['accuracy']:.1f}"
        row = next(line for line in md.splitlines() if line.startswith(f"| {r['recipe']} |"))
        assert f"| {cell} |" in row  # one seed: the recipe's mean is the run's number
        assert f"{r['trained_tokens']:,}" in row and f"{r['trained_tokens']:,}" in html


@pytest.mark.slow
def test_rerunning_the_same_compare_skips_finished_runs(study):
    out, _, spec = study
    stamps = {p: p.stat().st_mtime for p in out.glob("runs/*/eval.json")}
    run_study(["builtin:sft", "builtin:grpo"], out=out, budget=Budget("samples", 128), jobs=2, spec=spec)
    assert {p: p.stat().st_mtime for p in out.glob("runs/*/eval.json")} == stamps
    with pytest.raises(Exception, match="other recipes"):
        run_study(["builtin:sft"], out=out, budget=Budget("samples", 128), spec=spec)


@pytest.mark.slow
def test_a_failed_run_is_reported_and_the_study_goes_on(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: builtin:tiny\nstages:\n  - method: grpo\n    data: {task: arith}\n"
                   "    rewards: [{fn: 'no_such_module:fn'}]\n    steps: 2\n")
    summary = run_study([str(bad), "builtin:sft"], out=tmp_path / "s", budget=Budget("steps", 2),
                        spec=EvalSpec(n=4, samples=0, kl_n=2, curve_every=0))
    status = {r["recipe"]: r["status"] for r in summary["runs"]}
    assert status == {"broken": "failed", "sft": "done"}
    assert any(f["topic"] == "failed" and "broken-s0" in f["text"] for f in summary["findings"])


# ---- the report in a real browser --------------------------------------------------------------------------

CHROMIUM_INSTALL = "apt-get update && apt-get install -y --no-install-recommends chromium"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if shutil.which("apt-get") and Path("/etc/debian_version").exists():
        try:  # the test set-up installs it when it can (CI runs as root with Debian's registry)
            subprocess.run(["bash", "-c", CHROMIUM_INSTALL], check=True, capture_output=True, timeout=900)
        except (subprocess.SubprocessError, OSError):
            return None
        return shutil.which("chromium")
    return None


@pytest.mark.slow
def test_report_renders_in_a_headless_browser_with_every_image(study):
    out = study[0]
    browser = _chromium()
    if browser is None:
        pytest.skip(f"no Chromium here; install it with: {CHROMIUM_INSTALL}")
    page = (out / "report.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--virtual-time-budget=5000", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    n_images = (out / "report.html").read_text().count("<img ")
    assert f'data-images="{n_images}/{n_images}"' in dom.stdout, dom.stderr[-2000:]
    errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and ("Error" in line or "error" in line)]
    assert not errors, errors
    shot = out / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1400,2400", page], capture_output=True,
                   timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_a_run_directory_made_from_another_recipe_version_is_refused(tmp_path):
    """Rerunning a study after editing a recipe must not mix the old run's results with the new recipe."""
    raw, _ = recipe_data("builtin:sft")
    _Job("sft-s0", tmp_path / "sft-s0", raw, "builtin:tiny").prepare(EvalSpec())
    _Job("sft-s0", tmp_path / "sft-s0", raw, "builtin:tiny").prepare(EvalSpec())  # the same recipe: fine
    edited = {**raw, "seed": 7}
    with pytest.raises(RecipeError, match="another version of its recipe"):
        _Job("sft-s0", tmp_path / "sft-s0", edited, "builtin:tiny").prepare(EvalSpec())


def test_each_recipe_is_put_in_the_family_the_findings_compare():
    """The findings compare the RL family (rewarded rollouts only) with the SFT family: distillation, which has
    a teacher, and preference methods stay out of both."""
    from posttrain.study.summary import family

    cases = {("sft",): "sft", ("rft",): "sft", ("kd",): "distill", ("grpo",): "rl", ("ppo",): "rl", ("remax",): "rl",
             ("opd",): "distill", ("sdft",): "distill", ("dpo",): "preference", ("online_dpo",): "preference",
             ("kto",): "preference", ("luffy",): "hybrid", ("sft", "dpo"): "pipeline"}
    assert {m: family(list(m)) for m in cases} == cases
