"""Evaluation of edits: ROME's CounterFact scores, generation quality, exact-output locality, KL, accuracy on
the embedded world and degeneration, with 95% intervals (see :mod:`mechedit.evaluation.evaluator`)."""

from mechedit.evaluation.counterfact import rewrite_scores
from mechedit.evaluation.evaluator import EvalConfig, EvalResult, Evaluator, evaluate

__all__ = ["EvalConfig", "EvalResult", "Evaluator", "evaluate", "rewrite_scores"]
