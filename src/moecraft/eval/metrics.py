"""Task metrics: exact match, ESFT intent JSON match (and its intent label alone), GSM8K-style numeric answer,
BLEU/chrF, ROUGE.

Per-example metrics take ``(prediction, references)`` and return a float in [0, 1]; the score of an
example is its best over the references. Corpus metrics (BLEU, chrF, ROUGE-L) take the whole lists.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from moecraft.errors import MoecraftError


class MissingExtraError(MoecraftError):
    """An optional dependency (extra) needed by the chosen metric or tool is not installed."""


def require(module: str, extra: str) -> Any:
    """Import an optional dependency or say which extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"'{module}' is not installed; install it with: pip install 'moecraft[{extra}]'"
        ) from exc


def _norm_ws(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the texts are equal up to surrounding and repeated whitespace."""
    return float(_norm_ws(prediction) == _norm_ws(reference))


def parse_json_object(text: str) -> dict | None:
    """The first JSON object in ``text`` (models often add text around it), or None."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _slot_set(slots: Any) -> frozenset | None:
    # Slot values may be lists (e.g. two dates); a canonical JSON string makes them hashable.
    if not isinstance(slots, dict):
        return None
    return frozenset((str(k), json.dumps(v, sort_keys=True, ensure_ascii=False)) for k, v in slots.items())


def intent_match(prediction: str, reference: str) -> float:
    """ESFT intent rule: parse both as JSON; 1.0 iff same ``intent`` and same set of (slot, value) pairs.

    Slot order does not matter; a missing, extra or different slot does. Unparsable output scores 0.
    """
    ref = parse_json_object(reference)
    if ref is None:
        raise MoecraftError(f"reference is not a JSON object: {reference[:80]!r}")
    pred = parse_json_object(prediction)
    if pred is None:
        return 0.0
    return float(
        pred.get("intent") == ref.get("intent") and _slot_set(pred.get("slots", {})) == _slot_set(ref.get("slots", {}))
    )


# an "intent" string field anywhere in the text (JSON string escapes allowed inside the value)
_INTENT_FIELD = re.compile(r'"intent"\s*:\s*"((?:[^"\\]|\\.)*)"')


def intent_label(text: str) -> str | None:
    """The intent label of an answer: the ``intent`` string of the first JSON object that has one, else of
    the first ``"intent": "..."`` field in the text (a truncated or broken answer still names its label)."""
    obj = parse_json_object(text)
    if obj is not None and isinstance(obj.get("intent"), str):
        return obj["intent"]
    m = _INTENT_FIELD.search(text)
    if m is None:
        return None
    try:
        return json.loads(f'"{m.group(1)}"')
    except json.JSONDecodeError:  # a bad escape: compare the raw text
        return m.group(1)


def intent_label_match(prediction: str, reference: str) -> float:
    """1.0 iff the prediction names the reference's intent label, slots ignored (:func:`intent_label`).

    The ESFT intent rule (:func:`intent_match`) also needs every slot right; this half of it lets a model
    too small to get the slots right still show whether it learnt the classification.
    """
    ref = intent_label(reference)
    if ref is None:
        raise MoecraftError(f"reference names no intent: {reference[:80]!r}")
    return float(intent_label(prediction) == ref)


_NUM = r"-?\d[\d,]*(?:\.\d+)?"


def final_number(text: str) -> Decimal | None:
    """GSM8K-style final answer: the number after the last ``####``, else the last number in the text."""
    m = re.findall(r"####\s*\$?\s*(" + _NUM + ")", text)
    found = m[-1] if m else (re.findall(_NUM, text) or [None])[-1]
    if found is None:
        return None
    try:
        return Decimal(found.replace(",", ""))
    except InvalidOperation:
        return None


def numeric_match(prediction: str, reference: str) -> float:
    """1.0 when the final numbers of prediction and reference are equal as decimals (``12.0`` == ``12``)."""
    ref = final_number(reference)
    if ref is None:
        raise MoecraftError(f"reference has no number: {reference[:80]!r}")
    pred = final_number(prediction)
    return float(pred is not None and pred == ref)


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults, 0-100); ``references[i]`` are the references of example i."""
    sacrebleu = require("sacrebleu", "eval")
    return float(sacrebleu.corpus_bleu(list(predictions), _ref_streams(references)).score)


def chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus chrF (sacrebleu defaults, 0-100)."""
    sacrebleu = require("sacrebleu", "eval")
    return float(sacrebleu.corpus_chrf(list(predictions), _ref_streams(references)).score)


def _ref_streams(references: Sequence[Sequence[str]]) -> list[list[str]]:
    # sacrebleu wants one stream per reference position; pad ragged lists with the first reference.
    n = max(len(r) for r in references)
    return [[r[i] if i < len(r) else r[0] for r in references] for i in range(n)]


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L F1 (rouge-score, best over references, 0-100).

    Tokens are lower-cased ASCII words/numbers and single non-ASCII characters: rouge-score's own
    tokenizer drops everything outside [a-z0-9], which would erase Chinese text entirely.
    """
    rouge_scorer = require("rouge_score.rouge_scorer", "eval")
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_RougeTokenizer())
    vals = [
        max(scorer.score(r, p)["rougeL"].fmeasure for r in refs) for p, refs in zip(predictions, references)
    ]
    return 100.0 * sum(vals) / max(len(vals), 1)


class _RougeTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+|[^\x00-\x7f]", text.lower())


# Per-example metrics (best over references), and corpus metrics on the whole list.
EXAMPLE_METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "intent_json": intent_match,
    "intent_label": intent_label_match,
    "numeric": numeric_match,
}
CORPUS_METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    "bleu": bleu,
    "chrf": chrf,
    "rouge_l": rouge_l,
}
# pass@1 (code execution) and the LLM judge need more than text; eval.runner handles them.
SPECIAL_METRICS = ("code_pass@1", "judge")
ALL_METRICS = (*EXAMPLE_METRICS, *CORPUS_METRICS, *SPECIAL_METRICS)


def score_example(metric: str, prediction: str, references: Sequence[str]) -> float:
    """Best score of ``prediction`` over ``references`` under a per-example metric."""
    fn = EXAMPLE_METRICS[metric]
    return max(fn(prediction, r) for r in references)
