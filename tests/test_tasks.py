"""The built-in `arith` task: verifiers, the step metric, split disjointness, determinism, corpus recipe."""
import pytest

from posttrain.tasks import TASKS, Task, get_task, pretraining_corpus
from posttrain.tasks.arith import (CorpusMix, Problem, bucket, chatml, correct_reward, extract_answer,
                                   format_reward, parse_problem, steps_reward)

PROMPT = [{"role": "user", "content": "What is 23 + 45 - 17?"}]  # 23 + 45 = 68, 68 - 17 = 51
WORKED = "23 + 45 = 68\n68 - 17 = 51\n#### 51"
PINNED_BUCKETS = [22, 50, 46]


@pytest.fixture(scope="module")
def task() -> Task:
    return get_task("arith")


def _reward(fn, completions, answer="51"):
    return fn([PROMPT] * len(completions), completions, answer=[answer] * len(completions))


# ------------------------------------------------------------------ verifier

@pytest.mark.parametrize("completion, expected", [
    (WORKED, 1.0),
    ("#### 51", 1.0),
    ("51", 1.0),                              # bare number
    ("The answer is 51.", 1.0),               # last number, sentence punctuation
    ("####51", 1.0),
    ("#### 51.0", 1.0),                       # numerically equal
    ("23 + 45 = 68, then 68 - 17 = 51.", 1.0),
    ("#### 51\n#### 52", 0.0),                # the last mark counts
    ("#### 52\nThe answer is 51", 0.0),       # a mark beats a later unmarked number
    ("#### 50", 0.0),                         # near misses
    ("#### 511", 0.0),
    ("#### 5", 0.0),
    ("#### -51", 0.0),
    ("The answer is 510.", 0.0),
    ("####", 0.0),                            # malformed: a mark without a number
    ("#### fifty-one", 0.0),
    ("", 0.0),
    ("no idea", 0.0),
])
def test_correct_reward_reads_the_marked_answer_or_the_last_number(completion, expected):
    assert _reward(correct_reward, [completion]) == [expected]


def test_rewards_accept_chat_completions_and_read_the_last_message():
    chat = [{"role": "assistant", "content": "thinking"}, {"role": "assistant", "content": WORKED}]
    assert _reward(correct_reward, [chat]) == [1.0]
    assert _reward(format_reward, [chat]) == [1.0]
    assert _reward(steps_reward, [chat]) == [1.0]
    assert steps_reward(["What is 23 + 45 - 17?"], [WORKED]) == [1.0]  # string prompt


def test_correct_reward_without_answers_says_which_column_is_missing():
    with pytest.raises(ValueError, match="answer"):
        correct_reward([PROMPT], [WORKED])


def test_extract_answer_returns_none_without_any_number():
    assert extract_answer("I do not know") is None
    assert extract_answer("12, 13 and finally 14") == "14"


@pytest.mark.parametrize("completion, expected", [
    (WORKED, 1.0),
    ("  23 + 45 = 68\n68 - 17 = 51\n#### 51\n", 1.0),  # surrounding whitespace is fine
    ("23 + 45 = 99\n99 - 17 = 11\n#### 11", 1.0),     # format only: wrong working still has the shape
    ("#### 51", 0.0),                                 # no steps
    ("23 + 45 = 68\n68 - 17 = 51", 0.0),              # no mark
    ("23 + 45 = 68, then 68 - 17 = 51.\n#### 51", 0.0),
    ("23 + 45 = 68\n68 - 17 = 51\n#### 51\nThe answer is 51.", 0.0),  # trailing text
    ("The answer is 51.", 0.0),
])
def test_format_reward_requires_step_lines_then_a_marked_answer(completion, expected):
    assert _reward(format_reward, [completion]) == [expected]


# ------------------------------------------------------------------ step metric

@pytest.mark.parametrize("completion, expected", [
    (WORKED, 1.0),
    ("23 + 45 = 68, then 68 - 17 = 51.", 1.0),       # inline working counts
    ("23 + 45 = 68\n#### 51", 0.5),                   # one of two steps
    ("23 + 45 = 69\n69 - 17 = 52\n#### 52", 0.5),     # first slip charged once: step 2 chains and is right
    ("23 + 45 = 69\n68 - 17 = 51\n#### 51", 0.0),     # step 2 does not chain from what was written
    ("45 + 23 = 68\n68 - 17 = 51\n#### 51", 0.5),     # operands out of order
    ("23 + 45 = 68\n68 + 17 = 85\n#### 85", 0.5),     # wrong operator
    ("23 + 45 = 68\n68 - 17 = 51\n51 + 0 = 51\n#### 51", 2 / 3),  # an extra step counts against
    ("23 + 45 - 17 = 51", 0.0),                       # no working
    ("#### 51", 0.0),
    ("51", 0.0),
])
def test_steps_reward_scores_the_share_of_chained_correct_steps(completion, expected):
    assert _reward(steps_reward, [completion]) == [pytest.approx(expected)]


def test_answer_only_reward_pays_for_wrong_working_but_steps_reward_does_not():
    lucky = "23 + 45 = 70\n70 - 17 = 51\n#### 51"  # two wrong steps, the right final answer
    assert _reward(correct_reward, [lucky]) == [1.0]
    assert _reward(steps_reward, [lucky]) == [0.0]


def test_steps_reward_rejects_a_prompt_without_arithmetic():
    with pytest.raises(ValueError, match="no arithmetic expression"):
        steps_reward(["Tell me a story."], ["Once"])


def test_problem_worked_solution_and_parse_round_trip():
    p = Problem((23, 45, 17), ("+", "-"))
    assert p.totals == (68, 51) and p.answer == 51
    assert p.worked() == WORKED
    assert parse_problem(p.question) == p


# ------------------------------------------------------------------ splits

def test_registry_and_unknown_names_list_the_choices(task):
    assert "arith" in TASKS and task.primary == "correct" and task.primary in task.rewards
    assert set(task.rewards) == {"correct", "format", "steps"}
    with pytest.raises(ValueError, match="available tasks: arith"):
        get_task("nope")
    with pytest.raises(ValueError, match="valid splits: train, dev, id, ood, ood_phrasing, plain, pref_train, "
                                         "pref_dev, rm_train, rm_dev"):
        task.rows("test")


def test_default_split_sizes(task):
    sizes = {s: len(task.rows(s)) for s in task.splits}
    assert sizes == {"train": 2000, "dev": 200, "id": 500, "ood": 300, "ood_phrasing": 300, "plain": 200,
                     "pref_train": 2000, "pref_dev": 200, "rm_train": 2000, "rm_dev": 200}
    assert len(task.rows("id", n=7, seed=3)) == 7


def test_splits_are_disjoint_by_question_across_seeds(task):
    questions = {s: {r["prompt"][0]["content"] for seed in (0, 1) for r in task.rows(s, seed=seed)}
                 for s in ("train", "dev", "id", "ood")}
    for a in questions:
        for b in questions:
            if a < b:
                assert not questions[a] & questions[b], (a, b)
    assert len(questions["id"]) > 500  # seeds draw different rows, still inside the split


def test_rows_are_deterministic_and_seed_dependent(task):
    for split in task.splits:
        assert task.rows(split, n=20, seed=5) == task.rows(split, n=20, seed=5)
        assert task.rows(split, n=20, seed=5) != task.rows(split, n=20, seed=6)


def test_rows_use_ecosystem_columns_and_demos_pass_every_reward(task):
    rows = task.rows("id", n=50) + task.rows("ood", n=50)
    for row in rows:
        assert set(row) == {"id", "prompt", "answer", "completion", "messages"}
        assert row["messages"] == row["prompt"] + row["completion"]
    prompts, completions = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    answers = [r["answer"] for r in rows]
    for name, fn in task.rewards.items():
        assert fn(prompts, completions, answer=answers) == [1.0] * len(rows), name
    assert {len(r["prompt"][0]["content"].split()) for r in task.rows("ood", n=20)} == {9}  # 4 operands


def test_preference_pairs_prefer_the_worked_solution_to_one_slip_on_held_out_questions(task):
    """chosen passes every reward; rejected keeps the format but has exactly one wrong step (and so a wrong
    answer); pref_dev asks only `dev` questions, never a training one."""
    from posttrain.tasks.arith import parse_problem

    rows = task.rows("pref_train", n=100) + task.rows("pref_dev", n=100)
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    for name, fn in task.rewards.items():
        assert fn(prompts, [r["chosen"] for r in rows], answer=answers) == [1.0] * len(rows), name
    rejected = [r["rejected"] for r in rows]
    assert task.rewards["correct"](prompts, rejected, answer=answers) == [0.0] * len(rows)
    assert task.rewards["format"](prompts, rejected, answer=answers) == [1.0] * len(rows)
    for r, steps in zip(rows, task.rewards["steps"](prompts, rejected, answer=answers)):
        n = len(parse_problem(r["prompt"][0]["content"]).ops)
        assert steps < 1.0 and r["chosen"] != r["rejected"], r  # one slip: the step where it happens is wrong
        wrong = sum(a != b for a, b in zip(r["chosen"][0]["content"].split("\n")[:n],
                                           r["rejected"][0]["content"].split("\n")[:n]))
        assert wrong >= 1
    from posttrain.tasks.arith import SPLIT_BUCKETS, bucket

    train = {r["prompt"][0]["content"] for r in task.rows("train")}
    held_out = {r["prompt"][0]["content"] for r in task.rows("pref_dev")}
    assert all(bucket(q) in SPLIT_BUCKETS["dev"][1] for q in held_out) and not held_out & train
    assert not held_out & {r["prompt"][0]["content"] for r in task.rows("pref_train")}


def test_reward_model_pairs_are_right_against_wrong_in_one_style_with_every_kind_of_error(task):
    """rm_*: chosen is right (its answer, or the last total of inline prose), rejected wrong, both in one style;
    each kind of error appears, and rm_dev asks only held-out questions."""
    from posttrain.tasks.arith import RM_KINDS, SPLIT_BUCKETS, bucket, follows_format

    rows = task.rows("rm_train", n=400) + task.rows("rm_dev")
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    correct = task.rewards["correct"]
    assert correct(prompts, [r["chosen"] for r in rows], answer=answers) == [1.0] * len(rows)
    assert correct(prompts, [r["rejected"] for r in rows], answer=answers) == [0.0] * len(rows)
    for r in rows:
        c, x = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert follows_format(c) == follows_format(x) == ("####" in c), r  # one style per pair
    kinds = {(r["kind"], "####" in r["chosen"][0]["content"]) for r in rows}
    assert kinds == {(k, worked) for k in RM_KINDS for worked in (True, False)} - {("mark", False)}
    steps = lambda m: m[0]["content"].count("=")  # noqa: E731 -- one `=` per written step
    for r in rows:  # the length gives nothing away overall: one step fewer (short) or one more (extra)
        assert steps(r["rejected"]) - steps(r["chosen"]) == {"short": -1, "extra": 1}.get(r["kind"], 0), r
    assert all(bucket(r["prompt"][0]["content"]) in SPLIT_BUCKETS["dev"][1] for r in task.rows("rm_dev"))
    assert task.rows("pref_train", n=5) == [{k: v for k, v in r.items()} for r in task.rows("pref_train", n=5)]


def test_ids_are_unique_and_plain_rows_are_text(task):
    ids = [r["id"] for s in task.splits for r in task.rows(s)]
    assert len(ids) == len(set(ids))
    plain = task.rows("plain")
    assert all(set(r) == {"id", "text"} and r["text"].endswith(".") for r in plain)


# ------------------------------------------------------------------ pretraining corpus

def test_ood_phrasing_asks_held_out_problems_in_unseen_words(task):
    """Problems from buckets no other split owns (by their canonical question), asked in the PHRASINGS only."""
    from posttrain.tasks.arith import PHRASINGS, QUESTION, parse_problem

    rows = task.rows("ood_phrasing")
    train_like = {r["prompt"][0]["content"] for s in ("train", "dev", "id") for r in task.rows(s)}
    for r in rows:
        q = r["prompt"][0]["content"]
        template = next(p for p in PHRASINGS if q.startswith(p.split("{}")[0]) and q.endswith(p.split("{}")[1]))
        expression = q[len(template.split("{}")[0]): len(q) - len(template.split("{}")[1])]
        assert QUESTION.format(expression) not in train_like and q != QUESTION.format(expression)
        assert str(parse_problem(QUESTION.format(expression)).answer) == r["answer"]
    assert {len(r["prompt"][0]["content"].split("?")[0].split()) for r in rows} >= {4, 6}  # 2 and 3 operands


def test_corpus_asks_a_share_of_questions_in_the_phrasings():
    from posttrain.tasks.arith import PHRASINGS, CorpusMix, pretraining_corpus as corpus_of

    mix = CorpusMix()
    chat = [_question(r["text"]) for r in corpus_of(4000, 0, mix) if r["text"].startswith("<|im_start|>user")]
    share = sum(not q.endswith(" = ?") for q in chat) / len(chat)
    assert abs(share - mix.phrasings) < 0.03 and all(
        any(q.startswith(p.split("{}")[0]) for p in PHRASINGS) for q in chat if not q.endswith(" = ?"))


def _question(chat_text: str) -> str:
    return chat_text.split("user\n", 1)[1].split("<|im_end|>", 1)[0]


def test_corpus_holds_no_held_out_question_or_paragraph(task):
    corpus = {r["text"] for r in pretraining_corpus("arith", 3000, seed=0)}
    asked = {_question(t) for t in corpus if t.startswith("<|im_start|>user")}
    held_out = {r["prompt"][0]["content"] for s in ("dev", "id", "ood", "ood_phrasing") for r in task.rows(s)}
    assert len(asked) > 1000 and not asked & held_out
    assert not corpus & {r["text"] for r in task.rows("plain")}


def test_corpus_mix_follows_the_recipe():
    corpus = [r["text"] for r in pretraining_corpus("arith", 4000, seed=1)]
    chat = [t for t in corpus if t.startswith("<|im_start|>user\n")]
    mix = CorpusMix()
    assert abs(len(chat) / len(corpus) - mix.chat) < 0.03
    worked = sum("\n#### " in t for t in chat) / len(chat)
    assert abs(worked - dict(mix.styles)["worked"]) < 0.03  # the task's format is a small minority
    ood = sum(len(_question(t).split()) == 9 for t in chat) / len(chat)  # "a + b - c + d = ?"
    assert abs(ood - dict(mix.operands)[4]) < 0.02  # the ood axis is present, but rare
    assert pretraining_corpus("arith", 50, seed=1) == pretraining_corpus("arith", 50, seed=1)
    assert pretraining_corpus("arith", 50, seed=1) != pretraining_corpus("arith", 50, seed=2)


def test_chatml_matches_the_tokenizer_chat_template(tokenizer):
    messages = [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "3"}]
    assert chatml("What is 1 + 2?", "3") == tokenizer.apply_chat_template(messages, tokenize=False)


def test_bucket_is_stable_across_processes():
    # pinned values: a salted hash() would change them on every interpreter start
    assert [bucket(s) for s in ("What is 23 + 45 - 17?", "a", "b")] == PINNED_BUCKETS
    assert {bucket(str(i)) for i in range(2000)} == set(range(100))


def test_every_question_split_ships_a_demonstration_per_row():
    """Hybrid methods read a demonstration beside each prompt: every row of every question split has one."""
    task = get_task("arith")
    for split in ("train", "dev", "id", "ood"):
        rows = task.rows(split, n=50)
        assert all(r["completion"][0]["content"].strip() and r["answer"] for r in rows), split
