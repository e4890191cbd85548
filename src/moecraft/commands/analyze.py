"""Routing analysis from `moecraft score` files: heatmaps, concentration, task overlap, before/after; HTML report.

Example: moecraft analyze --scores intent=runs/s/intent.json,math=runs/s/math.json --out runs/analysis
"""

from __future__ import annotations

from moecraft.analysis.config import AnalyzeConfig

CONFIG = AnalyzeConfig


def run(cfg: AnalyzeConfig) -> int:
    from moecraft.analysis.analyze import run_analyze

    report = run_analyze(cfg)
    print(f"analysis: {cfg.out / 'analysis.json'}\nplots: {cfg.out}/*.png\nreport: {report}")
    return 0
