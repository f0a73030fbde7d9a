"""The shipped multi-stage pipelines run end to end in their quick form (2 steps a stage, a small eval): Tulu-style
SFT -> DPO -> RLVR, distillation KD -> OPD, and a reward model trained then used by PPO."""
from __future__ import annotations

import json

import pytest

import posttrain

QUICK = {"eval.n": 8, "eval.splits": ["id"], "eval.max_new_tokens": 24}


@pytest.mark.slow
@pytest.mark.parametrize("name, stages", [("tulu", ["sft", "dpo", "rlvr"]), ("distill", ["kd", "opd"]),
                                          ("rm_then_ppo", ["rm", "ppo"])])
def test_a_shipped_pipeline_runs_every_stage_in_order(tmp_path, name, stages):
    summary = posttrain.train(f"builtin:{name}", out=tmp_path / name, max_steps=2, overrides=QUICK, progress=False)
    assert list(summary["stages"]) == stages
    assert all(summary["stages"][s]["steps"] == 2 for s in stages)
    recs = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in recs] == [s for s in stages for _ in range(2)]
    assert (tmp_path / name / "final" / "model.safetensors").exists()
    assert "after" in summary["eval"]
