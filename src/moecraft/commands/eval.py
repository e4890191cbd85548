"""Evaluate a model (optionally with a trained artifact) on task files; scores as JSON and a table.

Metrics are chosen per task unless --metrics is given: intent JSON match for intent tasks, numeric final
answer for GSM8K-style tasks, pass@1 for code rows (tests run in a guarded subprocess), else exact match;
bleu, chrf and rouge_l need the `eval` extra. --perplexity-data and --lm-eval-tasks measure general
ability; --judge module:function adds an LLM-judge score.

Example: moecraft eval --model tiny:deepseek_v2 --tasks builtin:intent,builtin:arithmetic --limit 20
"""

from __future__ import annotations

from moecraft.eval.runner import EvalConfig, format_table, run_eval

CONFIG = EvalConfig


def run(cfg: EvalConfig) -> int:
    results = run_eval(cfg)
    print(format_table(results, title=f"model {cfg.model}" + (f" + {cfg.adapter}" if cfg.adapter else "")))
    print(f"results: {cfg.out / 'results.json'}")
    return 0
