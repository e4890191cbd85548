"""Options of ``moecraft analyze`` (and, from Python, of :func:`moecraft.analysis.analyze.analyze`).

Kept apart from the analysis, which imports torch and matplotlib, so that building the CLI stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from moecraft.config import MAY_BE_EMPTY, checked, non_empty

__all__ = ["AnalyzeConfig"]


@dataclass
@checked(non_empty("ps"), p="(0, 1]", ps="(0, 1]", k=">= 1", title=MAY_BE_EMPTY)
class AnalyzeConfig:
    """Options of ``moecraft analyze``."""

    scores: list[str] = field(
        default_factory=list,
        metadata={"help": "score files from `moecraft score`, optionally labelled: intent=a.json,math=b.json "
                          "(two samples of one task: intent-1=a.json,intent-2=b.json)"})
    before: str | None = field(default=None, metadata={"help": "scores of the base model (for before/after)"})
    after: str | None = field(default=None, metadata={"help": "scores of the trained model on the same data"})
    score: Literal["gate", "token"] = field(
        default="token", metadata={"help": "gate = average gate score (eq. 5), token = token selection ratio (eq. 6)"})
    p: float | None = field(default=None, metadata={"help": "eq. 8 threshold for selections (default 0.1 gate, 0.2 token)"})
    ps: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.9],
                            metadata={"help": "mass shares for the concentration plot"})
    k: int | None = field(default=None, metadata={"help": "top-k for shared experts (default: the model's experts per token)"})
    out: Path = field(default=Path("runs/analysis"), metadata={"help": "output folder (PNGs, analysis.json, report.html)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --out (once the new one is complete)"})
    title: str = field(default="moecraft routing analysis", metadata={"help": "report title"})
