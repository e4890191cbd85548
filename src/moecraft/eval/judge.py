"""Optional LLM-as-judge hook (off by default; the ESFT paper scores open tasks 0-10 with GPT-4).

moecraft calls no remote service itself: the user supplies ``judge(prompt: str) -> str`` (any client,
local or remote) as ``module:function`` and a rubric template with ``{question}``, ``{prediction}`` and
``{reference}`` fields. The first number after "score" (or else the first number) in the reply is
the score, divided by ``max_score`` to land in [0, 1].
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from pathlib import Path

from moecraft.errors import MoecraftError

DEFAULT_RUBRIC = (
    "You are grading a model's answer against a reference answer.\n"
    "Question:\n{question}\n\nReference answer:\n{reference}\n\nModel answer:\n{prediction}\n\n"
    "Rate how well the model answer matches the reference in content and correctness, from 0 to 10.\n"
    "Reply in the form: Score: <number>"
)


def load_judge(spec: str) -> Callable[[str], str]:
    """``package.module:function`` -> the callable."""
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise MoecraftError(f"judge must be given as 'module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise MoecraftError(f"cannot load judge {spec!r}: {exc}") from exc
    if not callable(fn):
        raise MoecraftError(f"judge {spec!r} is not callable")
    return fn


def load_rubric(path: str | None) -> str:
    if not path:
        return DEFAULT_RUBRIC
    p = Path(path)
    if not p.is_file():
        raise MoecraftError(f"judge rubric file not found: {p}")
    return p.read_text(encoding="utf-8")


def parse_score(reply: str, max_score: float) -> float | None:
    m = re.search(r"score\W*(-?\d+(?:\.\d+)?)", reply, flags=re.IGNORECASE) or re.search(r"-?\d+(?:\.\d+)?", reply)
    if not m:
        return None
    return min(max(float(m.group(1) if m.groups() else m.group(0)) / max_score, 0.0), 1.0)


def judge_scores(
    judge: Callable[[str], str], rubric: str, questions: list[str], predictions: list[str],
    references: list[str], max_score: float = 10.0,
) -> list[float | None]:
    """Per-example judge scores in [0, 1] (None when the reply holds no number)."""
    out = []
    for q, p, r in zip(questions, predictions, references):
        try:
            text = rubric.format(question=q, prediction=p, reference=r)
        except (KeyError, IndexError) as exc:
            raise MoecraftError(f"judge rubric has an unknown field {exc}; use {{question}}, {{prediction}}, {{reference}}") from exc
        out.append(parse_score(str(judge(text)), max_score))
    return out
