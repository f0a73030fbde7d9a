"""Built-in tasks: generators with disjoint splits, verifiers as TRL-signature rewards, a pretraining corpus.

A task is data, not a trainer: `get_task("arith").rows("train")` gives rows in the ecosystem's columns
(`prompt`, `answer`, `completion`, `messages`, `id`; `text` for `plain`), and `task.rewards` maps names to
reward functions `fn(prompts, completions, answer=None, **kw) -> list[float]`. `task.primary` names the
correctness reward every study reports as accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from posttrain.tasks import arith

RewardFn = Callable[..., list[float]]


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    splits: tuple[str, ...]
    rewards: Mapping[str, RewardFn]
    primary: str                                    # name of the correctness reward
    generate: Callable[[str, int, int], list[dict]] = field(repr=False)  # (split, n, seed) -> rows
    sizes: Mapping[str, int] = field(repr=False)    # default number of rows per split
    corpus: Callable[[int, int], list[dict]] = field(repr=False)  # (n, seed) -> {"text"} rows
    answer: Callable[[str], "str | None"] | None = field(default=None, repr=False)  # completion -> its answer (maj@k)

    def rows(self, split: str, n: int | None = None, seed: int = 0) -> list[dict]:
        """`n` rows of `split` (its default size when None); the same arguments always give the same rows."""
        if split not in self.splits:
            raise ValueError(f"task {self.name!r} has no split {split!r}; valid splits: {', '.join(self.splits)}")
        n = self.sizes[split] if n is None else n
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return self.generate(split, n, seed)


TASKS: dict[str, Task] = {
    "arith": Task(
        name="arith",
        description=("Sums and differences of 2-3 two-digit numbers (ood: 4 operands; ood_phrasing: the same "
                     "problems asked in words no training prompt uses). Demonstrations work "
                     "the chain step by step and end with '#### answer'. pref_train / pref_dev: the worked "
                     "solution preferred to the same working with one arithmetic slip. rm_train / rm_dev: pairs for "
                     "a reward model, the right chain against one with a slip, a miscopied operand, a missing "
                     "last step, a step too many or a wrong marked answer, in the worked or the inline style."),
        splits=("train", "dev", "id", "ood", "ood_phrasing", "plain", "pref_train", "pref_dev", "rm_train",
                "rm_dev"),
        rewards=dict(arith.REWARDS),
        primary="correct",
        generate=arith.rows,
        sizes={"train": 2000, "dev": 200, "id": 500, "ood": 300, "ood_phrasing": 300, "plain": 200,
               "pref_train": 2000, "pref_dev": 200, "rm_train": 2000, "rm_dev": 200},
        corpus=lambda n, seed: arith.pretraining_corpus(n, seed),
        answer=arith.extract_answer,
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(TASKS)}")
    return TASKS[name]


def pretraining_corpus(task: str, n: int, seed: int) -> list[dict]:
    """`n` plain-text rows `{"text": ...}` from which the task's shipped base model is pretrained."""
    return get_task(task).corpus(n, seed)
