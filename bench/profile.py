"""Where a GRPO step's time goes, in posttrain and in TRL: generation, rewards, optimizer, and the rest.

Runs bench/grpo.py's setting (one side per process) with timers wrapped around each library's own methods
(in this process only; neither library is changed on disk):

    generation  posttrain Experience._sample (its KV-cached sampler)  | TRL GRPOTrainer._generate
    rewards     posttrain Experience._score (the out-of-process worker) | TRL GRPOTrainer._calculate_rewards
    optimizer   torch.optim.AdamW.step (both)

"training pass and the rest" is the step time minus those: the forward + backward of the loss, and
everything else the trainer does between steps. torch.profiler records the same window (from the start of the
first step after `--warmup` to the end of the last optimizer step), whose top operators by self CPU time are
reported too. Prints one BENCH_RESULT line.
"""
from __future__ import annotations

import functools
import tempfile
import time

from bench.common import emit, setup_threads
from bench.grpo import grpo_parser, posttrain_grpo, trl_grpo


class Window:
    """Per-phase seconds inside the profiled window, which opens at the (warmup+1)-th generation call and closes
    after the last optimizer step."""

    def __init__(self, warmup: int, steps: int):
        import torch

        self.warmup, self.steps = warmup, steps
        self.generations = self.updates = 0
        self.phase = {"generation": 0.0, "rewards": 0.0, "optimizer": 0.0}
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.t_open = self.t_close = None

    @property
    def open(self) -> bool:
        return self.t_open is not None and self.t_close is None

    def wrap(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kw):
            if phase == "generation":
                self.generations += 1
                if self.generations == self.warmup + 1:
                    self.prof.start()
                    self.t_open = time.perf_counter()
            t0 = time.perf_counter()
            out = original(*args, **kw)
            if self.open:
                self.phase[phase] += time.perf_counter() - t0
            if phase == "optimizer":
                self.updates += 1
                if self.updates == self.steps and self.open:
                    self.t_close = time.perf_counter()
                    self.prof.stop()
            return out

        setattr(owner, name, timed)

    def report(self) -> dict:
        total = self.t_close - self.t_open
        steps = self.steps - self.warmup
        phases = dict(self.phase, **{"training pass and the rest": total - sum(self.phase.values())})
        ops = sorted(self.prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        cpu_total = sum(e.self_cpu_time_total for e in ops) or 1.0
        return {"steps_profiled": steps, "step_s": total / steps,
                "phases_s_per_step": {k: round(v / steps, 4) for k, v in phases.items()},
                "phases_share": {k: round(v / total, 3) for k, v in phases.items()},
                "top_ops": [{"op": e.key, "self_cpu_share": round(e.self_cpu_time_total / cpu_total, 3)}
                            for e in ops[:8]]}


def main() -> None:
    a = grpo_parser(__doc__.splitlines()[0], steps=3).parse_args()
    setup_threads()
    import torch

    window = Window(a.warmup, a.steps)
    window.wrap(torch.optim.AdamW, "step", "optimizer")
    if a.side == "posttrain":
        from posttrain.training.experience import Experience

        window.wrap(Experience, "_sample", "generation")
        window.wrap(Experience, "_score", "rewards")
        run = posttrain_grpo
    else:
        from trl import GRPOTrainer

        window.wrap(GRPOTrainer, "_generate", "generation")
        window.wrap(GRPOTrainer, "_calculate_rewards", "rewards")
        run = trl_grpo
    with tempfile.TemporaryDirectory() as out:
        run(a, out)
    emit({"side": a.side, **window.report()})


if __name__ == "__main__":
    main()
