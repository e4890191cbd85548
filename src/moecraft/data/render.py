"""Rendering records to token ids and loss masks: chat templates for chat records, raw text otherwise."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from moecraft.data.records import record_kind
from moecraft.errors import DataError

Example = tuple[list[int], list[int]]  # (input_ids, loss_mask)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # the chat template already places BOS where the model wants it
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_prompt(record: dict, tokenizer: PreTrainedTokenizerBase) -> str:
    """The text a model should continue: chat template up to the last assistant turn, or the raw prompt."""
    kind = record_kind(record)
    if kind == "chat":
        msgs = record["messages"]
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if kind == "pair" or "prompt" in record:
        return record["prompt"]
    raise DataError(f"record with fields {sorted(record)} has no prompt to generate from")


def render_example(record: dict, tokenizer: PreTrainedTokenizerBase) -> Example:
    """``(input_ids, loss_mask)`` of one record; the mask is 1 on response tokens and on the closing EOS.

    For chat records every assistant turn is a response. Each turn boundary is found by rendering the
    conversation prefix with the chat template, so any template works, multi-turn included.
    """
    kind = record_kind(record)
    eos = tokenizer.eos_token_id
    if kind == "text":
        ids = _encode(tokenizer, record["text"])
        if eos is not None:
            ids.append(eos)
        return ids, [1] * len(ids)
    if kind == "pair":
        prompt_ids = _encode(tokenizer, record["prompt"])
        resp_ids = _encode(tokenizer, record.get("response", record.get("completion")))
        if eos is not None:
            resp_ids.append(eos)
        return prompt_ids + resp_ids, [0] * len(prompt_ids) + [1] * len(resp_ids)
    msgs = record["messages"]
    ids = _encode(tokenizer, tokenizer.apply_chat_template(msgs, tokenize=False))
    mask = [0] * len(ids)
    for j, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        # tokens of the turn = tokens up to its end minus tokens of the prompt before it
        before = tokenizer.apply_chat_template(msgs[:j], tokenize=False, add_generation_prompt=True) if j else ""
        upto = tokenizer.apply_chat_template(msgs[: j + 1], tokenize=False)
        start, end = len(_encode(tokenizer, before)), len(_encode(tokenizer, upto))
        mask[start:end] = [1] * (min(end, len(ids)) - start)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        mask.append(1 if any(mask) else 0)
    return ids, mask
