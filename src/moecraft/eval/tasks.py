"""Evaluation rows -> prompts, references and the metric that fits the task.

Row shapes read here (one JSON object a line, or ``builtin:<task>[:split]``, split ``eval`` by default):
- chat:   ``{"messages": [..., {"role": "assistant", ...}], "reference"?: ...}``: prompt from the chat
          template (generation prompt added); references from ``reference``/``answer``, else the final
          assistant turn (the built-in tasks);
- ESFT:   ``{"idx", "prompt", "raw_answers", "answers"}``: pre-formatted few-shot text used as is;
- pair:   ``{"prompt", "reference" | "answer" | "answers" | "response"}``: raw prompt text;
- code:   any of the above with ``test``/``tests``/``test_list`` (and ``entry_point`` for HumanEval).
Any file type, folder or hub id of :mod:`moecraft.data.records` is read; rows of other formats (alpaca,
sharegpt, ...) become canonical chat records first, so their last assistant turn is the reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from moecraft.errors import DataError
from moecraft.eval.metrics import parse_json_object


@dataclass
class EvalItem:
    prompt: str
    references: list[str]
    record: dict = field(repr=False)

    @property
    def is_code(self) -> bool:
        return any(k in self.record for k in ("test", "tests", "test_list"))


def read_rows(source: str, limit: int | None = None, options=None) -> list[dict]:
    """Raw rows of an evaluation source; bad JSON or non-object lines raise DataError naming file:line.

    Files of any type the record reader knows (JSONL, JSON array, parquet, csv, arrow, folders, hub ids) are
    read as they are; a row with neither ``messages`` nor ``prompt`` (alpaca, sharegpt, ...) is turned into
    the canonical chat record by :func:`moecraft.data.to_canonical` with ``options``.
    """
    if source.startswith("builtin:"):
        from moecraft.builtin_data import generate

        task, _, split = source[len("builtin:") :].partition(":")
        rows = generate(task, split or "eval")
    else:
        from moecraft.data import read_rows as read_data_rows
        from moecraft.data import to_canonical
        from moecraft.data.records import DATA_SUFFIXES

        if source.endswith(DATA_SUFFIXES) and not Path(source).exists():
            raise DataError(f"eval data file not found: {source}")
        rows = []
        for where, row in read_data_rows(source):
            if "messages" not in row and "prompt" not in row:
                row, _ = to_canonical(row, where, options)
            row.setdefault("_where", where)
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise DataError(f"{source}: no evaluation rows")
    return rows[:limit] if limit else rows


def _as_list(value) -> list[str]:
    if isinstance(value, list):
        return [v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in value]
    return [value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)]


def to_item(row: dict, tokenizer, where: str, chat_template: bool = False,
            template_kwargs: dict | None = None) -> EvalItem:
    """One row -> EvalItem. ``chat_template`` wraps raw ``prompt`` rows as a user turn; ``template_kwargs``
    (``--chat-template-kwargs``) go to the chat template, as in score and train."""
    from moecraft.data import render_prompt

    refs = None
    for key in ("reference", "answers", "answer", "response", "completion"):
        if key in row and row[key] is not None:
            refs = _as_list(row[key])
            break
    code = any(k in row for k in ("test", "tests", "test_list"))
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        if refs is None and msgs[-1].get("role") == "assistant":
            refs = [msgs[-1]["content"]]
        prompt = render_prompt({"messages": msgs}, tokenizer, where=where, **(template_kwargs or {}))
    elif isinstance(row.get("prompt"), str):
        prompt = row["prompt"]
        if chat_template:
            prompt = render_prompt({"messages": [{"role": "user", "content": prompt}]}, tokenizer, where=where,
                                   **(template_kwargs or {}))
    else:
        raise DataError(f"{where}: eval row needs 'messages' or 'prompt'; got fields {sorted(row)}")
    if refs is None and not code:
        raise DataError(f"{where}: eval row has no reference ('reference', 'answers', 'answer' or 'response')")
    return EvalItem(prompt, refs or [], row)


def load_items(source: str, tokenizer, limit: int | None = None, chat_template: bool = False,
               options=None, template_kwargs: dict | None = None) -> list[EvalItem]:
    rows = read_rows(source, limit, options)
    return [to_item(r, tokenizer, r.pop("_where", f"{source}:{i + 1}"), chat_template, template_kwargs)
            for i, r in enumerate(rows)]


def infer_metrics(source: str, items: list[EvalItem]) -> list[str]:
    """The metrics a task is judged by when none are given: code -> pass@1; intent JSON -> intent_json and
    intent_label (the label alone); GSM8K-style or bare-number answers -> numeric; otherwise exact match."""
    if source.startswith("builtin:intent"):
        return ["intent_json", "intent_label"]
    if source.startswith("builtin:arithmetic"):
        return ["numeric"]
    if items and all(it.is_code for it in items):
        return ["code_pass@1"]
    refs = [r for it in items for r in it.references]
    if refs and all((o := parse_json_object(r)) is not None and "intent" in o for r in refs):
        return ["intent_json", "intent_label"]
    if refs and all("####" in r or _is_number(r) for r in refs):
        return ["numeric"]
    return ["exact_match"]


def _is_number(text: str) -> bool:
    try:
        float(text.strip().replace(",", ""))
    except ValueError:
        return False
    return True
