"""Build the built-in task's reward-model ensemble, `builtin:tiny-rm-<member>` for each member below: five
Bradley-Terry reward models trained by posttrain's own `reward_model` stage on different preference pairs, so
that `{fn: model, path: [...], ensemble: min}` pays only what all five agree on. Each member's score statistics
are then re-measured (`reward_model.calibrate`) on the shipped base's own samples of held-out questions, so the
members are standardised on what PPO will show them. Written to src/posttrain/assets/tiny-rm-<member>/, with
BUILD.json in src/posttrain/assets/tiny-rm-onpolicy/ (pairs, steps, held-out accuracy, statistics, times).

The pairs (chosen always a right answer to the question):
  operands  the right chain against the same chain with one or two operands miscopied (the first included),
            its arithmetic right: the error the base makes most (218 of its 225 wrong greedy `id` answers)
  onpolicy  the base's own samples of train questions: a verified-right one against a wrong one
  kinds     the task's `rm_train` pairs (a slip, a miscopied operand, a missing or extra step, a wrong mark)
  mixed     operands and onpolicy together
  onpolicy-teacher  the onpolicy pairs on the backbone of builtin:tiny-teacher

Deterministic on one machine; about 25 minutes on 2 cores (two members at a time, one thread each).

    python scripts/build_reward_models.py [--out-root DIR] [--steps N]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from posttrain import reward_model  # noqa: E402
from posttrain.data.encode import completion_text, encode_prompt  # noqa: E402
from posttrain.models import load_policy, stop_token_ids  # noqa: E402
from posttrain.rollout.sampler import sample  # noqa: E402
from posttrain.tasks import arith  # noqa: E402

MEMBERS = {  # name: (backbone, pairs)
    "operands": ("builtin:tiny", "operands"),
    "onpolicy": ("builtin:tiny", "onpolicy"),
    "kinds": ("builtin:tiny", "kinds"),
    "mixed": ("builtin:tiny", "mixed"),
    "onpolicy-teacher": ("builtin:tiny-teacher", "onpolicy"),
}
SAMPLES = 8           # the base's samples per question (temperature 1, 48 new tokens)
TRAIN_QUESTIONS = 4000
DEV_QUESTIONS = 600


def operand_pairs(split: str, n: int) -> list[dict]:
    """The right chain against the same chain with one or two operands miscopied (by 1-10 either way), worked or
    inline style."""
    counts, buckets = arith.SPLIT_BUCKETS[split]
    rng = random.Random(f"operands:{split}")
    rows = []
    for i, p in enumerate(arith.sample_problems(n, 11 if split == "train" else 12, counts, buckets, "operands" + split)):
        style = rng.choice(("worked", "inline"))
        while True:
            ops = list(p.operands)
            for j in rng.sample(range(len(ops)), rng.choice([1, 1, 2]) if len(ops) > 1 else 1):
                ops[j] += rng.choice([d for d in range(-10, 11) if d])
            wrong = arith.chain(dataclasses.replace(p, operands=tuple(ops)))
            if min(min(a, x, c) for a, _, x, c in wrong) >= 0 and all(arith.LO <= o <= arith.HI for o in ops):
                break
        rows.append({"id": f"operands-{split}-{i:05d}", "prompt": [{"role": "user", "content": p.question}],
                     "answer": str(p.answer), "kind": "operands",
                     "chosen": [{"role": "assistant", "content": arith.render(arith.chain(p), style, p.answer)}],
                     "rejected": [{"role": "assistant", "content": arith.render(wrong, style, wrong[-1][3])}]})
    return rows


def onpolicy_pairs(split: str, n: int) -> list[dict]:
    """Up to two pairs per question from the base's own samples: a verified-right sample against a wrong one."""
    model, tok = load_policy("builtin:tiny", device="cpu")
    model.eval()
    stops = stop_token_ids(tok, model)
    questions = arith.rows(split, n, 0)
    rng, pairs = random.Random(f"onpolicy:{split}"), []
    for a in range(0, len(questions), 250):
        chunk = questions[a: a + 250]
        out = sample(model, [encode_prompt(r["prompt"], tok) for r in chunk], num_samples=SAMPLES,
                     max_new_tokens=48, stop_ids=stops, pad_id=tok.pad_token_id,
                     generator=torch.Generator().manual_seed(a))
        for j, r in enumerate(chunk):
            texts = [completion_text(r["prompt"], out.completion_ids[i], tok)[0]["content"]
                     for i in range(j * SAMPLES, (j + 1) * SAMPLES)]
            good = sorted({t for t in texts if arith.is_correct(t, r["answer"])})
            bad = sorted({t for t in texts if t.strip() and not arith.is_correct(t, r["answer"])})
            for k in range(min(2, len(bad)) if good else 0):
                pairs.append({"id": f"{r['id']}-{k}", "prompt": r["prompt"], "answer": r["answer"], "kind": "onpolicy",
                              "chosen": [{"role": "assistant", "content": rng.choice(good)}],
                              "rejected": [{"role": "assistant", "content": bad[k]}]})
    return pairs


def write(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(backbone: str, train: Path, dev: Path, steps: int) -> dict:
    return {"model": backbone, "seed": 0, "stages": [{
        "name": "rm", "method": "reward_model", "data": {"path": str(train), "max_len": 128},
        "heldout": {"path": str(dev)}, "steps": steps, "optim": {"lr": 1.0e-3, "max_grad_norm": 1.0, "fused": False},
        "schedule": {"kind": "cosine", "warmup_steps": 100}, "batch": {"size": 16}}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-root", default=str(ROOT / "src" / "posttrain" / "assets"))
    ap.add_argument("--steps", type=int, default=6000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = {"operands": (operand_pairs("train", 9600), operand_pairs("dev", 600)),
                "onpolicy": (onpolicy_pairs("train", TRAIN_QUESTIONS), onpolicy_pairs("dev", DEV_QUESTIONS)),
                "kinds": (arith.rows("rm_train", 40000, 0), arith.rows("rm_dev", 1000, 0))}
        sets["mixed"] = (sets["operands"][0] + sets["onpolicy"][0], sets["operands"][1] + sets["onpolicy"][1])
        files = {k: (write(tr, tmp / f"{k}_train.jsonl"), write(dv, tmp / f"{k}_dev.jsonl")) for k, (tr, dv) in sets.items()}
        t_data = time.time() - t0
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
        queue, running, record = list(MEMBERS.items()), [], {}
        while queue or running:
            while queue and len(running) < 2:  # two single-threaded trainings at a time
                name, (backbone, pairs) = queue.pop(0)
                (tmp / f"{name}.yaml").write_text(yaml.safe_dump(recipe(backbone, *files[pairs], args.steps)))
                cmd = [sys.executable, "-m", "posttrain", "train", str(tmp / f"{name}.yaml"), "--out", str(tmp / name)]
                running.append((name, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                                       stderr=open(tmp / f"{name}.log", "w"))))
            time.sleep(5)
            for name, proc in [x for x in running if x[1].poll() is not None]:
                running.remove((name, proc))
                if proc.returncode:
                    sys.exit(f"member {name} failed:\n{(tmp / f'{name}.log').read_text()[-3000:]}")
                stage = json.loads((tmp / name / "summary.json").read_text())["stages"]["rm"]
                record[name] = {"backbone": MEMBERS[name][0], "pairs": MEMBERS[name][1],
                                "train_pairs": len(sets[MEMBERS[name][1]][0]), "steps": stage["steps"],
                                "heldout_pref_accuracy": round(stage["eval"]["pref_accuracy"], 4),
                                "heldout_pairs": stage["eval"]["n"], "wall_s": stage["wall_s"]}
                print(name, record[name], flush=True)
        # calibration: every member on the base's own samples of dev questions (both sides of the onpolicy dev pairs)
        dev = sets["onpolicy"][1]
        prompts, responses = [r["prompt"] for r in dev] * 2, [r["chosen"] for r in dev] + [r["rejected"] for r in dev]
        for name in MEMBERS:
            out = Path(args.out_root) / f"tiny-rm-{name}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(tmp / name / "stages" / "rm" / "model", out)
            record[name]["calibration"] = {k: round(v, 4) if isinstance(v, float) else v
                                           for k, v in reward_model.calibrate(str(out), prompts, responses).items()}
    build = {"command": "python scripts/build_reward_models.py", "seed": 0, "members": record,
             "calibrated_on": f"both responses of the onpolicy dev pairs ({len(dev)} pairs of the base's own samples)",
             "data_seconds": round(t_data, 1), "wall_seconds": round(time.time() - t0, 1), "torch": torch.__version__}
    (Path(args.out_root) / "tiny-rm-onpolicy" / "BUILD.json").write_text(json.dumps(build, indent=1) + "\n")
    print(json.dumps(build))


if __name__ == "__main__":
    main()
