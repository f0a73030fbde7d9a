"""Built-in verifiers: answer extraction, exact / numeric / math / format matching, DAPO's overlong penalty."""
import pytest

from posttrain.rewards.builtin import (
    BUILTIN,
    exact_match,
    extract_answer,
    format_match,
    math_match,
    numeric_match,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("12 + 7 = 19\n#### 19", "19"),  # GSM8K mark
        ("so it is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # nested braces kept whole
        ("The answer is 42. Check: 6*7=42.", "42"),  # cut at the end of the sentence
        ("Question: what is 12 + 7? Answer: 19", "19"),
        ("Answer: 3\nThe answer is \\boxed{5}", "5"),  # the last mark wins
        ("#### 7\nbut then 8 and 9", "7"),  # a mark beats later bare numbers
        ("Final Answer: The final answer is $5$. I hope it is correct.", "5"),  # a mark inside a mark
        ("12 + 7 gives 19", "19"),  # bare number
        ("first 3, then 12, finally 190", "190"),  # the last number wins
        ("the loss is -4.25 dollars", "-4.25"),
        ("we sold 1,234 units", "1,234"),  # thousands separators stay one number
        ("10-3 = 7", "7"),  # a binary minus is not a sign
        ("a list 1,2,3", "3"),  # not a thousands separator
        ("value \u22123", "-3"),  # Unicode minus
        ("#### ", None),  # an empty mark is no mark, and there is no number
        ("I do not know.", None),
    ],
)
def test_extract_answer_takes_last_mark_else_last_number(text, expected):
    assert extract_answer(text) == expected


def test_exact_match_scores_marked_bare_and_malformed_answers():
    completions = ["work\n#### 19", "it is 19", "#### 190", "#### 1", "no idea", "#### 1,234", "The answer is 19.",
                   " 1 2 3 4\n", "1 2 3 4 5"]
    answers = ["19", "19", "19", "19", "19", "1234", "19", "1 2 3 4", "1 2 3 4"]
    # near misses ("190", "1" vs "19") are wrong; without a mark the whole answer must match ("it is 19" is not
    # "19": that is numeric's last-number rule), so a sorted list is right only whole; nothing readable is 0.0
    assert exact_match(None, completions, answer=answers) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    assert numeric_match(None, ["it is 19"], answer=["19"]) == [1.0]


def test_exact_match_reads_conversational_completions_and_gsm8k_gold():
    completions = [
        [{"role": "assistant", "content": "first 4\n#### 72"}],
        [{"role": "user", "content": "#### 72"}, {"role": "assistant", "content": "#### 71"}],
    ]
    gold = ["Natalia sold 48/2 = 24 clips in May.\n#### 72"] * 2  # a worked solution is reduced to its mark
    assert exact_match(None, completions, answer=gold) == [1.0, 0.0]
    assert exact_match(None, ["#### 5"], answer=[None]) == [None]


def test_numeric_match_compares_values_within_tol():
    completions = ["#### 19.0", "#### 190", "it is -2.5", "#### 1,234 apples", "nothing", "#### 0.3333", "#### 3/4"]
    answers = ["19", "19", "-2.5", "1234", "19", "1/3", "0.75"]
    assert numeric_match(None, completions, answer=answers) == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert numeric_match(None, ["#### 0.3333"], answer=["1/3"], tol=1e-3) == [1.0]


def test_numeric_match_returns_none_for_unreadable_gold():
    assert numeric_match(None, ["#### 4", "#### 4"], answer=["four", "4 apples"]) == [None, None]


def test_math_match_proves_equivalent_forms():
    completions = ["\\frac{1}{2}", "so \\boxed{\\frac{1}{2}}", "#### 0.6", "The answer is $x^2+1$.", "blah"]
    answers = ["0.5", "0.5", "0.5", "1+x^2", "0.5"]
    assert math_match(None, completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_math_match_returns_none_for_unparseable_gold():
    assert math_match(None, ["\\frac{1}{2}", "1"], answer=["\\frac{1", ""]) == [None, None]


def test_math_match_does_not_rely_on_signal_alarm_off_the_main_thread():
    """math_verify's own timeout uses signal.alarm, which raises off the main thread; ours is off."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(math_match, None, ["\\frac{1}{2}"], ["0.5"]).result() == [1.0]


def test_format_match_default_and_custom_pattern():
    chat = [{"role": "assistant", "content": "#### -1,000"}]
    completions = ["step 1\nstep 2\n#### 42\n", "#### 42 apples", "42", chat]
    assert format_match(None, completions) == [1.0, 0.0, 0.0, 1.0]
    assert format_match(None, ["<think>x</think> 4", "4"], pattern=r"^<think>.*</think>") == [1.0, 0.0]


def test_builtin_registry_names():
    from posttrain.rewards.builtin import code_execution

    assert BUILTIN == {"exact": exact_match, "numeric": numeric_match, "math": math_match, "format": format_match,
                       "code": code_execution}
