"""Evaluation: greedy accuracy, pass@k, response length."""
from posttrain.eval.metrics import EvalResult, evaluate, pass_at_k

__all__ = ["EvalResult", "evaluate", "pass_at_k"]
