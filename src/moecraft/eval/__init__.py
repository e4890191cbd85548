"""Evaluation: task metrics, guarded code execution, batched generation, perplexity, lm-eval bridge, judge hook."""

from moecraft.eval.runner import EvalConfig, evaluate_model, format_table, run_eval, score_items

__all__ = ["EvalConfig", "evaluate_model", "format_table", "run_eval", "score_items"]
