"""pass@k against brute-force enumeration; evaluate() numbers agree with the sampler and the verifier."""
import itertools
import math

import pytest
import torch

from posttrain.eval.metrics import EvalResult, evaluate, pass_at_k, pass_k_values
from posttrain.rollout.sampler import sample

PROMPTS = [[5, 17, 33], [41, 9], [7, 7, 200, 64], [12], [90, 91, 92, 93, 94]]
STOPS = list(range(40, 90))
PAD = 0


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) that contain a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration_over_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    # C(1000, 500) overflows float64; the product form does not need it. pass@1 is c / n exactly.
    assert pass_at_k(1000, 3, 1) == pytest.approx(0.003, abs=1e-12)
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5, abs=1e-12)
    assert pass_at_k(1000, 0, 500) == 0.0 and pass_at_k(1000, 501, 500) == 1.0


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 1)


def test_reported_k_are_powers_of_two_and_k_itself():
    assert pass_k_values(8) == [1, 2, 4, 8]
    assert pass_k_values(6) == [1, 2, 4, 6]
    assert pass_k_values(1) == [1]
    assert pass_k_values(0) == []


def _first_token_even(indices: list[int], completions: list[list[int]]) -> list[float]:
    """A deterministic toy verifier: correct when the completion starts with an even token id."""
    return [float(c[0] % 2 == 0) for c in completions]


def test_evaluate_greedy_accuracy_and_pass_at_k_are_consistent(make_model):
    model = make_model("llama")
    calls = []

    def score(indices, completions):
        calls.append(list(indices))
        return [float(c[0] % 2 == 0) for c in completions]

    res = evaluate(model, PROMPTS, score, stop_ids=STOPS, pad_id=PAD, max_new_tokens=6, samples=8, temperature=1.0,
                   batch_size=16, seed=0)
    greedy = sample(model, PROMPTS, max_new_tokens=6, stop_ids=STOPS, pad_id=PAD, greedy=True)
    assert calls[0] == [0, 1, 2, 3, 4] and calls[1] == [i for i in range(5) for _ in range(8)]
    assert res.n == 5
    assert res.accuracy == pytest.approx(sum(c[0] % 2 == 0 for c in greedy.completion_ids) / 5)
    assert res.mean_response_len == pytest.approx(sum(map(len, greedy.completion_ids)) / 5)
    assert sorted(res.pass_at_k) == [1, 2, 4, 8]
    # With every sample scored, pass@1 is the mean per-prompt accuracy = the overall sample accuracy.
    assert res.pass_at_k[1] == pytest.approx(res.extra["sample_accuracy"])
    assert 0.0 < res.pass_at_k[1] < 1.0, "a random model should be right on some samples only"
    values = [res.pass_at_k[k] for k in (1, 2, 4, 8)]
    assert values == sorted(values) and all(0.0 <= v <= 1.0 for v in values)
    assert res.extra["unscored"] == 0.0 and res.extra["unscored_samples"] == 0.0
    d = res.to_dict()
    assert list(d)[:7] == ["n", "accuracy", "pass@1", "pass@2", "pass@4", "pass@8", "response_len"]
    assert d["pass@8"] == res.pass_at_k[8] and d["sample_accuracy"] == res.extra["sample_accuracy"]


def test_evaluate_is_deterministic_for_a_seed(make_model):
    model = make_model("qwen2")
    score = _first_token_even
    kw = dict(stop_ids=STOPS, pad_id=PAD, max_new_tokens=4, samples=4)
    a, b = evaluate(model, PROMPTS, score, seed=1, **kw), evaluate(model, PROMPTS, score, seed=1, **kw)
    assert a.to_dict() == b.to_dict()


def test_unscorable_completions_are_excluded_and_counted(make_model):
    model = make_model("gpt2")

    def score(indices, completions):
        # Prompt 0 cannot be judged; the rest are always right.
        return [math.nan if i == 0 else 1.0 for i in indices]

    res = evaluate(model, PROMPTS, score, stop_ids=STOPS, pad_id=PAD, max_new_tokens=3, samples=2)
    assert res.accuracy == 1.0 and res.extra["unscored"] == 1.0
    assert res.extra["unscored_samples"] == 2.0
    assert res.pass_at_k == {1: 1.0, 2: 1.0}
    assert res.n == 5


def test_evaluate_without_samples_reports_greedy_only(make_model):
    res = evaluate(make_model("mistral"), PROMPTS, lambda i, c: [0.0] * len(c), stop_ids=STOPS, pad_id=PAD,
                   max_new_tokens=3)
    assert isinstance(res, EvalResult)
    assert res.accuracy == 0.0 and res.pass_at_k == {}
    assert 0.0 <= res.extra["truncated"] <= 1.0 and "sample_accuracy" not in res.extra


def test_a_verifier_that_breaks_the_contract_is_named(make_model):
    model = make_model("llama")
    with pytest.raises(ValueError, match="one per completion"):
        evaluate(model, PROMPTS, lambda i, c: [1.0], stop_ids=STOPS, pad_id=PAD, max_new_tokens=2)
    with pytest.raises(ValueError, match="0 or 1"):
        evaluate(model, PROMPTS, lambda i, c: [0.5] * len(c), stop_ids=STOPS, pad_id=PAD, max_new_tokens=2)


def test_sampled_metrics_ignore_the_global_rng(make_model):
    """evaluate seeds its own generator: sampled numbers do not depend on the global RNG."""
    model = make_model("llama")
    score = _first_token_even
    kw = dict(stop_ids=STOPS, pad_id=PAD, max_new_tokens=4, samples=4, seed=3)
    torch.manual_seed(0)
    a = evaluate(model, PROMPTS, score, **kw)
    torch.manual_seed(1)
    b = evaluate(model, PROMPTS, score, **kw)
    assert a.pass_at_k == b.pass_at_k
