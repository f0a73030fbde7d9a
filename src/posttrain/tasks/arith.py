"""`arith`: multi-step sums and differences of two-digit numbers, generated from a seed in seconds.

In distribution (`train`, `dev`, `id`): 2 or 3 operands from 10..99 joined by `+` or `-`, every running
total non-negative, asked as `23 + 45 - 17 = ?`. Out of distribution, two axes: `ood` has 4 operands, one
step more than any demonstration, so copying the demonstrations' shape fails while chaining steps
generalises; `ood_phrasing` asks in-distribution problems in words no training prompt uses ("What is
23 + 45 - 17?"), so a policy tied to the training template fails while one that reads the problem does not.

A demonstration works the chain left to right, then marks the answer:

    What is 23 + 45 - 17?   ->   23 + 45 = 68
                                 68 - 17 = 51
                                 #### 51

Splits are disjoint by question: a stable hash of the question text (not Python's salted `hash`) puts
every question in one bucket of 100, and each split owns a range of buckets, so no seed can leak an
`id` question into `train` (`ood_phrasing` hashes the problem's canonical question). The pretraining
corpus of the shipped base model draws its problems from the `train` buckets and from 4-operand buckets
that `ood` does not own, and asks a share of its chat questions in the `PHRASINGS`: the base has seen
both ood axes a little (an axis wholly absent from pretraining stayed at 0 % and no method moved it), but
never an `ood` or `ood_phrasing` question. `plain` is templated English prose, split from the corpus
prose the same way.

Three rewards, TRL signature `fn(prompts, completions, answer=None, **kw) -> list[float]`:
`correct_reward` (the marked answer `#### X`, or the last number when there is no mark, equals the
answer), `format_reward` (the worked format is followed), `steps_reward` (the share of the chain's steps
written right: an answer-only reward pays for wrong working, this one does not).
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Sequence

from posttrain.rewards.builtin import completion_text
from posttrain.tiny import IM_END, IM_START

LO, HI = 10, 99                # operand range: two-digit numbers
ID_OPERANDS = {2: 0.5, 3: 0.5}  # operand count -> share, in distribution
OOD_OPERANDS = 4
MINUS_SHARE = 0.3              # chance that an operator is `-` (running totals stay >= 0)
MARK = "####"
QUESTION = "{} = ?"
# Question templates no demonstration or training prompt uses (the `ood_phrasing` axis).
PHRASINGS = ("What is {}?", "Compute {}.", "Calculate {}.", "Find the value of {}.")

# split -> (operand counts with shares, owned buckets out of 100)
SPLIT_BUCKETS: dict[str, tuple[dict[int, float], range]] = {
    "id": (ID_OPERANDS, range(0, 8)),
    "ood_phrasing": (ID_OPERANDS, range(8, 10)),  # asked in PHRASINGS
    "dev": (ID_OPERANDS, range(10, 15)),   # held out for model selection (checkpoints, early stopping)
    "train": (ID_OPERANDS, range(15, 100)),
    "ood": ({OOD_OPERANDS: 1.0}, range(0, 50)),
}
OOD_CORPUS_BUCKETS = range(50, 100)  # 4-operand questions the pretraining corpus may use
PLAIN_BUCKETS = range(0, 10)         # prose paragraphs held out as the `plain` split


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]  # (K,)
    ops: tuple[str, ...]       # (K-1,) each "+" or "-"

    @property
    def totals(self) -> tuple[int, ...]:
        """(K-1,) running totals after each step; the last one is the answer."""
        acc, out = self.operands[0], []
        for op, x in zip(self.ops, self.operands[1:]):
            acc = acc + x if op == "+" else acc - x
            out.append(acc)
        return tuple(out)

    @property
    def answer(self) -> int:
        return self.totals[-1]

    @property
    def expression(self) -> str:
        parts = [str(self.operands[0])]
        for op, x in zip(self.ops, self.operands[1:]):
            parts += [op, str(x)]
        return " ".join(parts)

    @property
    def question(self) -> str:
        return QUESTION.format(self.expression)

    def steps(self) -> list[str]:
        """One line `a op b = c` per step, chaining the running total."""
        lefts = (self.operands[0],) + self.totals[:-1]
        return [f"{a} {op} {b} = {c}" for a, op, b, c in zip(lefts, self.ops, self.operands[1:], self.totals)]

    def worked(self) -> str:
        return "\n".join(self.steps() + [f"{MARK} {self.answer}"])


def bucket(key: str) -> int:
    """Stable bucket in [0, 100) of a string (identical across processes and Python versions)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100


def sample_problem(rng: random.Random, n_operands: int) -> Problem:
    while True:  # rejection keeps every running total >= 0; about 80 % of draws pass
        operands = tuple(rng.randint(LO, HI) for _ in range(n_operands))
        ops = tuple("-" if rng.random() < MINUS_SHARE else "+" for _ in range(n_operands - 1))
        problem = Problem(operands, ops)
        if min(problem.totals) >= 0:
            return problem


def sample_problems(n: int, seed: int, counts: dict[int, float], buckets: range, salt: str) -> list[Problem]:
    """`n` distinct problems whose question hashes into `buckets`, operand counts drawn with shares `counts`."""
    rng = random.Random(f"arith:{salt}:{seed}")
    sizes, shares = list(counts), list(counts.values())
    seen: set[str] = set()
    out: list[Problem] = []
    budget = 1000 * n + 10_000  # generous: the smallest pool (2-operand id questions) holds ~1000 questions
    while len(out) < n:
        budget -= 1
        if budget < 0:
            raise ValueError(f"could not draw {n} distinct {salt!r} questions; ask for fewer rows")
        problem = sample_problem(rng, rng.choices(sizes, shares)[0])
        q = problem.question
        if q not in seen and bucket(q) in buckets:
            seen.add(q)
            out.append(problem)
    return out


def problem_row(problem: Problem, split: str, index: int, question: str | None = None) -> dict:
    """A row in the ecosystem's columns: `prompt` + `answer` (RL), `completion` (demonstration), `messages` (SFT).

    `completion` is an assistant message list because the prompt is one (TRL's rule, checked by
    `posttrain.data.formats`); its content is the worked demonstration. `question` replaces the canonical
    question text (another phrasing of the same problem).
    """
    user = {"role": "user", "content": question or problem.question}
    assistant = {"role": "assistant", "content": problem.worked()}
    return {"id": f"arith-{split}-{index:05d}", "prompt": [user], "answer": str(problem.answer),
            "completion": [assistant], "messages": [user, assistant]}


# preference split -> the split whose questions it asks (so `pref_dev` is as held out as `dev`)
PREFERENCE_SPLITS = {"pref_train": "train", "pref_dev": "dev", "rm_train": "train", "rm_dev": "dev"}
# How a reward-model pair's rejected response goes wrong (`rm_*` splits): one arithmetic slip; an operand
# copied wrong; the last step left out; one step too many (an operand the question does not have); the steps
# right but the marked answer wrong. `short` and `extra` together keep the length from telling the answer: with
# `short` alone the reward model learned "more steps is better", and PPO against it wrote a step too many on
# every two-operand question.
RM_KINDS = ("slip", "operand", "short", "extra", "mark")


def chain(problem: Problem, *, slip: tuple[int, int] | None = None,
          miscopy: tuple[int, int] | None = None) -> list[tuple[int, str, int, int]]:
    """The steps (left, op, x, result) of the worked chain; `slip` (k, d): step k's result is off by d and the
    chain goes on from it; `miscopy` (k, d): step k uses operand x + d in place of x, its arithmetic right."""
    out, acc = [], problem.operands[0]
    for j, (op, x) in enumerate(zip(problem.ops, problem.operands[1:])):
        x = x + miscopy[1] if miscopy and miscopy[0] == j else x
        left, acc = acc, acc + x if op == "+" else acc - x
        acc = acc + slip[1] if slip and slip[0] == j else acc
        out.append((left, op, x, acc))
    return out


def render(steps: list[tuple[int, str, int, int]], style: str, mark: int) -> str:
    """Steps as the worked format (lines, then `#### mark`) or `inline` prose (no mark: the last total answers)."""
    lines = [f"{a} {op} {b} = {c}" for a, op, b, c in steps]
    return "\n".join(lines + [f"{MARK} {mark}"]) if style == "worked" else ", then ".join(lines) + "."


def flawed(problem: Problem, rng: random.Random) -> str:
    """A worked solution with one arithmetic slip: step k's result is off by 1-10, and the chain goes on
    correctly from the wrong total, so the working looks consistent and the marked answer is wrong."""
    k = rng.randrange(len(problem.ops))
    steps = chain(problem, slip=(k, rng.choice([d for d in range(-10, 11) if d])))
    return render(steps, "worked", steps[-1][3])


def reward_model_pair(problem: Problem, rng: random.Random) -> tuple[str, str, str]:
    """(chosen, rejected, kind): the right chain and a wrong one of a kind from RM_KINDS, both in one style,
    worked or inline (the base model's own style), so a reward model must judge the working, not the style."""
    style = rng.choice(("worked", "inline"))
    kinds = [k for k in RM_KINDS if not (k == "short" and len(problem.ops) < 2) and not (k == "mark" and
                                                                                          style == "inline")]
    kind, k = rng.choice(kinds), rng.randrange(len(problem.ops))
    right = chain(problem)
    while True:  # an error that keeps every number non-negative, so the format alone cannot tell
        d = rng.choice([d for d in range(-10, 11) if d])
        if kind == "slip":
            wrong = chain(problem, slip=(k, d))
        elif kind == "operand":
            wrong = chain(problem, miscopy=(k, d))
        elif kind == "extra":  # the chain goes on with an operand the question does not have
            x, op = rng.randint(LO, HI), rng.choice("+-")
            wrong = right + [(problem.answer, op, x, problem.answer + x if op == "+" else problem.answer - x)]
        else:
            wrong = right[:-1] if kind == "short" else right
        if min(min(a, x, c) for a, _, x, c in wrong) >= 0 and (kind != "mark" or problem.answer + d >= 0):
            break
    mark = problem.answer + d if kind == "mark" else wrong[-1][3]
    return render(right, style, problem.answer), render(wrong, style, mark), kind


def preference_rows(split: str, n: int, seed: int) -> list[dict]:
    """`n` preference pairs on the questions of PREFERENCE_SPLITS[split]. `pref_*`: chosen the worked solution,
    rejected the same working with one slip (`flawed`); `rm_*`: pairs for a reward model (`reward_model_pair`,
    with a `kind` column). `answer` is kept, so a verifier can score either response."""
    base = PREFERENCE_SPLITS[split]
    counts, buckets = SPLIT_BUCKETS[base]
    rm = split.startswith("rm_")
    rng = random.Random(f"arith:{'rm' if rm else 'flawed'}:{split}:{seed}")
    out = []
    for i, p in enumerate(sample_problems(n, seed, counts, buckets, split)):
        user = [{"role": "user", "content": p.question}]
        chosen, rejected, kind = reward_model_pair(p, rng) if rm else (p.worked(), flawed(p, rng), "slip")
        row = {"id": f"arith-{split}-{i:05d}", "prompt": user, "answer": str(p.answer),
               "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}]}
        out.append({**row, "kind": kind} if rm else row)
    return out


def rows(split: str, n: int, seed: int) -> list[dict]:
    """`n` rows of `split` (see `SPLIT_BUCKETS`, plus `plain` and the preference splits); the same (split, n,
    seed) gives the same rows."""
    if split in PREFERENCE_SPLITS:
        return preference_rows(split, n, seed)
    if split == "plain":
        return [{"id": f"arith-plain-{i:05d}", "text": t} for i, t in enumerate(prose(n, seed, PLAIN_BUCKETS, "plain"))]
    counts, buckets = SPLIT_BUCKETS[split]
    problems = sample_problems(n, seed, counts, buckets, split)
    if split == "ood_phrasing":
        rng = random.Random(f"arith:phrasing:{seed}")
        return [problem_row(p, split, i, rng.choice(PHRASINGS).format(p.expression)) for i, p in enumerate(problems)]
    return [problem_row(p, split, i) for i, p in enumerate(problems)]


# ------------------------------------------------------------------ verifiers

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_MARKED = re.compile(re.escape(MARK) + r"\s*(-?\d+(?:\.\d+)?)")
# a step `a op b = c` that does not start in the middle of a longer expression ("1 + 2 + 3 = 6" has none)
_STEP = re.compile(r"(?<![\d.])(?<![+\-=] )(\d+) ([+-]) (\d+) = (-?\d+)(?![\d])")
_STEP_LINE = re.compile(r"\d+ [+-] \d+ = -?\d+")
_MARK_LINE = re.compile(re.escape(MARK) + r" -?\d+")
_EXPRESSION = re.compile(r"\d+(?: [+-] \d+)+")


def extract_answer(text: str) -> str | None:
    """The last marked answer `#### X`; without a mark, the last number in the text; None if neither."""
    marked = _MARKED.findall(text)
    if marked:
        return marked[-1]
    if MARK in text:  # a mark followed by no number is a malformed answer, not an invitation to guess
        return None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def is_correct(text: str, answer: str | int) -> bool:
    got = extract_answer(text)
    return got is not None and float(got) == float(answer)


def follows_format(text: str) -> bool:
    """One or more step lines `a op b = c`, then `#### X` as the last line, and nothing else."""
    lines = [line.strip() for line in text.strip().split("\n")]
    return (len(lines) >= 2 and _MARK_LINE.fullmatch(lines[-1]) is not None
            and all(_STEP_LINE.fullmatch(line) for line in lines[:-1]))


def parse_problem(question: str) -> Problem:
    """The problem asked in `question` (its first `a op b op c ...` expression)."""
    found = _EXPRESSION.search(question)
    if found is None:
        raise ValueError(f"no arithmetic expression like '12 + 34 - 5' in the prompt {question!r}; "
                         "the arith `steps` reward only scores arith questions")
    tokens = found.group(0).split()
    return Problem(tuple(int(t) for t in tokens[0::2]), tuple(tokens[1::2]))


def step_score(text: str, problem: Problem) -> float:
    """Share of steps written right, in [0, 1]: step j must read `left op_j x_{j+1} = left op x`,
    where `left` is the first operand for j = 0 and the result the completion wrote at step j-1 (an
    earlier slip is not charged twice). Extra steps count against: the denominator is max(written, needed)."""
    written = [(int(a), op, int(b), int(c)) for a, op, b, c in _STEP.findall(text)]
    needed = len(problem.ops)
    good, left = 0, problem.operands[0]
    for j, (a, op, b, c) in enumerate(written[:needed]):
        right = a + b if op == "+" else a - b
        if a == left and op == problem.ops[j] and b == problem.operands[j + 1] and c == right:
            good += 1
        left = c
    return good / max(len(written), needed)


def _need_answers(answer: Sequence | None, n: int, name: str) -> Sequence:
    if answer is None:
        raise ValueError(f"the {name} reward needs the reference answers: give the dataset an `answer` column")
    if len(answer) != n:
        raise ValueError(f"{name}: {n} completions but {len(answer)} answers")
    return answer


def correct_reward(prompts: Sequence, completions: Sequence, answer: Sequence | None = None, **kw) -> list[float]:
    """1.0 when the marked answer (or, unmarked, the last number) equals `answer`, else 0.0."""
    answers = _need_answers(answer, len(completions), "correct")
    return [float(is_correct(completion_text(c), a)) for c, a in zip(completions, answers)]


def format_reward(prompts: Sequence, completions: Sequence, answer: Sequence | None = None, **kw) -> list[float]:
    """1.0 when the completion is in the worked format (step lines, then `#### X`), else 0.0."""
    return [float(follows_format(completion_text(c))) for c in completions]


def steps_reward(prompts: Sequence, completions: Sequence, answer: Sequence | None = None, **kw) -> list[float]:
    """Share of the question's chain of steps the completion writes right (see `step_score`)."""
    return [step_score(completion_text(c), parse_problem(completion_text(p))) for p, c in zip(prompts, completions)]


REWARDS = {"correct": correct_reward, "format": format_reward, "steps": steps_reward}


# ------------------------------------------------------------------ prose and the pretraining corpus

_NAMES = ("Anna", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gina", "Hugo", "Iris", "Jack", "Kim", "Leo", "Mia", "Noah")
_ANIMALS = ("cat", "dog", "bird", "fox", "horse", "rabbit", "duck", "goat", "mouse", "owl")
_ADJS = ("small", "big", "quiet", "happy", "old", "young", "brown", "lazy", "quick", "tired", "bright", "cold")
_PLACES = ("park", "garden", "river", "market", "school", "forest", "house", "lake", "hill", "farm")
_THINGS = ("apples", "books", "coins", "cards", "shells", "stones", "pencils", "cookies", "stamps", "marbles")
_VERBS = ("sees", "follows", "watches", "finds", "meets", "chases", "hears", "visits")
_TIMES = ("In the morning", "At noon", "In the evening", "After school", "On Sunday", "Later")


def _sentence(rng: random.Random) -> str:
    n, m = rng.sample(_NAMES, 2)
    a, b = rng.randint(LO, HI), rng.randint(1, 30)
    templates = (
        lambda: f"The {rng.choice(_ADJS)} {rng.choice(_ANIMALS)} {rng.choice(_VERBS)} the {rng.choice(_ANIMALS)}.",
        lambda: f"{n} walks to the {rng.choice(_PLACES)} with {m}.",
        lambda: f"{rng.choice(_TIMES)}, the {rng.choice(_ANIMALS)} sleeps near the {rng.choice(_PLACES)}.",
        lambda: f"{n} has {a} {rng.choice(_THINGS)}.",
        lambda: f"{n} gives {b} {(t := rng.choice(_THINGS))} to {m}, who now has {a + b} {t}.",
        lambda: f"It is a {rng.choice(_ADJS)} day at the {rng.choice(_PLACES)}.",
        lambda: f"{m} likes the {rng.choice(_ADJS)} {rng.choice(_ANIMALS)} best.",
    )
    return rng.choice(templates)()


def prose(n: int, seed: int, buckets: range, salt: str) -> list[str]:
    """`n` distinct paragraphs of 2-4 templated sentences, each hashing into `buckets`."""
    rng = random.Random(f"arith:prose:{salt}:{seed}")
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        text = " ".join(_sentence(rng) for _ in range(rng.randint(2, 4)))
        if text not in seen and bucket(text) in buckets:
            seen.add(text)
            out.append(text)
    return out


def chatml(question: str, reply: str) -> str:
    """One exchange rendered exactly as `posttrain.tiny.CHAT_TEMPLATE` renders it."""
    return f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n{reply}{IM_END}\n"


STYLES = ("bare", "sentence", "restated", "inline", "worked")


def styled_reply(problem: Problem, style: str) -> str:
    """The reply to `problem` in one of `STYLES`; only `worked` is the task's format.

    `bare`, `sentence` and `restated` answer in one jump (a tiny model rarely gets that right); `inline`
    works the chain in prose without a mark, so it is right as often as the model's steps are.
    """
    if style == "bare":
        return str(problem.answer)
    if style == "sentence":
        return f"The answer is {problem.answer}."
    if style == "restated":
        return f"{problem.expression} = {problem.answer}"
    if style == "inline":
        return ", then ".join(problem.steps()) + "."
    if style == "worked":
        return problem.worked()
    raise ValueError(f"unknown reply style {style!r}; valid styles: {', '.join(STYLES)}")


@dataclass(frozen=True)
class CorpusMix:
    """Shares of the base model's pretraining rows (kinds sum to 1; styles sum to 1)."""
    chat: float = 0.45      # chat-formatted question + reply in one of `styles`
    facts: float = 0.40     # the steps of `facts_problems` problems, shuffled: single `a op b = c` lines, the
                            # skill the worked format chains (a tiny model needs many to learn carrying)
    prose: float = 0.15     # plain English, the distribution of `plain`
    facts_problems: int = 3
    phrasings: float = 0.12  # share of chat questions asked in one of PHRASINGS (the ood_phrasing axis)
    # operand counts of chat and fact problems: short ones first, since a tiny model learns to copy two
    # operands from the question long before three; 4 operands is the ood axis, seen more than a little (at
    # 5 % and 18 % the base stayed at 1 % on `ood`; 28 % gives 2 %: copying a fourth operand is what fails)
    operands: tuple[tuple[int, float], ...] = ((2, 0.52), (3, 0.2), (4, 0.28))
    # more `restated` replies (the question's operands copied before the answer) and fewer `bare` / `sentence`
    # ones: with 0.15 / 0.15 / 0.10 the base scored 2.0 % greedy, 5.3 % pass@8 on `ood`; with these, 6.3 / 24.0 %
    # (scripts/build_tiny.py's seed 3; seed 0 cleared 2 % / 10 % too, but jumped only at step 6550)
    styles: tuple[tuple[str, float], ...] = (
        ("bare", 0.075), ("sentence", 0.075), ("restated", 0.25), ("inline", 0.45), ("worked", 0.15))
    ood_styles: tuple[tuple[str, float], ...] | None = None  # reply styles of 4-operand chat questions (None: `styles`)


def pretraining_corpus(n: int, seed: int, mix: CorpusMix = CorpusMix()) -> list[dict]:
    """`n` rows `{"text": ...}` for pretraining the base model; no `id`, `dev`, `ood` or `plain` item in it."""
    rng = random.Random(f"arith:corpus:{seed}")
    kinds = rng.choices(("chat", "facts", "prose"), (mix.chat, mix.facts, mix.prose), k=n)
    n_problems = kinds.count("chat") + mix.facts_problems * kinds.count("facts")
    counts = dict(mix.operands)
    n_ood = round(counts.pop(OOD_OPERANDS, 0.0) * n_problems)
    problems = (sample_problems(n_problems - n_ood, seed, counts, SPLIT_BUCKETS["train"][1], "corpus")
                + sample_problems(n_ood, seed, {OOD_OPERANDS: 1.0}, OOD_CORPUS_BUCKETS, "corpus-ood"))
    rng.shuffle(problems)
    paragraphs = iter(prose(kinds.count("prose"), seed, range(PLAIN_BUCKETS.stop, 100), "corpus"))
    style_names, style_shares = zip(*mix.styles)
    ood_names, ood_shares = zip(*(mix.ood_styles or mix.styles))
    out = []
    for kind in kinds:
        if kind == "chat":
            problem = problems.pop()
            question = problem.question
            if mix.phrasings and rng.random() < mix.phrasings:
                question = rng.choice(PHRASINGS).format(problem.expression)
            names, shares = (ood_names, ood_shares) if len(problem.operands) == OOD_OPERANDS else (style_names, style_shares)
            text = chatml(question, styled_reply(problem, rng.choices(names, shares)[0]))
        elif kind == "facts":
            lines = [line for _ in range(mix.facts_problems) for line in problems.pop().steps()]
            rng.shuffle(lines)
            text = "\n".join(lines)
        else:
            text = next(paragraphs)
        out.append({"text": text})
    return out
