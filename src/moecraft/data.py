"""Task data: loading (JSONL, `datasets` folders, hub ids, built-in tasks), rendering, packing.

Record shapes accepted everywhere (extra metadata fields such as ``id`` or ``length`` are ignored):
  - chat:   ``{"messages": [{"role": "user"|"system"|"assistant", "content": str}, ...]}``,
            rendered with the tokenizer's chat template; assistant turns are the response.
  - pair:   ``{"prompt": str, "response": str}`` (``completion`` is accepted for ``response``).
  - text:   ``{"text": str}``: every token is a target.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from moecraft.errors import DataError

BUILTIN_PREFIX = "builtin:"
_ROLES = {"system", "user", "assistant"}

Example = tuple[list[int], list[int]]  # (input_ids, loss_mask)


# ----------------------------------------------------------------------------- loading
def load_records(source: str, limit: int | None = None) -> list[dict]:
    """Records from a JSONL file, a folder saved by ``datasets``, a hub id (``name[:split]``) or ``builtin:<task>[:split]``.

    Every record is checked (:func:`check_record`); the first bad one raises :class:`DataError` naming the
    file and line. An empty source is an error too.
    """
    source = str(source)
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0 (0 = no limit), got {limit}")
    if source.startswith(BUILTIN_PREFIX):
        from moecraft.builtin_data import generate

        task, _, split = source[len(BUILTIN_PREFIX) :].partition(":")
        records = generate(task, split or "train")
        where = source
    else:
        path = Path(source)
        if path.is_file():
            records = _read_jsonl(path)
            where = str(path)
        elif path.is_dir():
            records = _read_datasets_folder(path)
            where = str(path)
        elif path.suffix in (".jsonl", ".json") or source.startswith((".", "/")):
            raise DataError(f"data file not found: {source}")
        else:
            records = _read_hub(source)
            where = source
    if not records:
        raise DataError(f"{where}: no records (empty data)")
    for i, rec in enumerate(records):
        check_record(rec, f"{where}:{i + 1}")
    return records[:limit] if limit else records


def read_jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` of every non-blank line; bad JSON or a non-object names file and line."""
    rows = []
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is fine
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})") \
                    from exc
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            rows.append((lineno, rec))
    if not rows:
        raise DataError(f"{path}: empty file (no JSON lines)")
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = read_jsonl_rows(path)
    # check here, where the real line numbers are known
    for lineno, rec in rows:
        check_record(rec, f"{path}:{lineno}")
    return [rec for _, rec in rows]


def _read_datasets_folder(path: Path) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises several types here
        raise DataError(f"{path}: not a folder saved by datasets.save_to_disk ({exc})") from exc
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    return [dict(r) for r in ds]


def _read_hub(source: str) -> list[dict]:
    import datasets

    name, _, split = source.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"could not load data set '{source}' (not a file, folder or reachable hub id): {exc}") from exc
    return [dict(r) for r in ds]


def record_kind(rec: dict) -> str:
    if "messages" in rec:
        return "chat"
    if "prompt" in rec and ("response" in rec or "completion" in rec):
        return "pair"
    if "text" in rec:
        return "text"
    return "unknown"


def check_record(rec: dict, where: str) -> None:
    """Raise :class:`DataError` (naming ``where``) unless ``rec`` is one of the accepted shapes."""
    kind = record_kind(rec)
    if kind == "unknown":
        raise DataError(
            f"{where}: unrecognised record with fields {sorted(rec)}; expected 'messages', "
            "'prompt'+'response' (or 'completion'), or 'text'"
        )
    if kind == "chat":
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise DataError(
                    f"{where}: messages[{j}] must be {{'role': one of {sorted(_ROLES)}, 'content': str}}, got {m!r:.80}"
                )
    elif kind == "pair":
        resp = rec.get("response", rec.get("completion"))
        if not isinstance(rec["prompt"], str) or not isinstance(resp, str):
            raise DataError(f"{where}: 'prompt' and 'response' must be strings")
    elif not isinstance(rec["text"], str) or not rec["text"]:
        raise DataError(f"{where}: 'text' must be a non-empty string")


# ----------------------------------------------------------------------------- rendering
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


# ----------------------------------------------------------------------------- packing
def pack_sequences(examples: Iterable[Example], seq_len: int) -> list[Example]:
    """Concatenate examples into chunks of exactly ``seq_len`` tokens (the last may be shorter).

    This is the ESFT paper's sampling/packing: samples are concatenated into fixed-length sequences, so an
    example may be split across two chunks.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    chunks: list[Example] = []
    buf_ids: list[int] = []
    buf_mask: list[int] = []
    for ids, mask in examples:
        buf_ids += ids
        buf_mask += mask
        while len(buf_ids) >= seq_len:
            chunks.append((buf_ids[:seq_len], buf_mask[:seq_len]))
            buf_ids, buf_mask = buf_ids[seq_len:], buf_mask[seq_len:]
    if buf_ids:
        chunks.append((buf_ids, buf_mask))
    return chunks


def sample_sequences(
    records: Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    n_sequences: int,
    seq_len: int,
    seed: int,
    response_only: bool = False,
    repeat: bool = False,
) -> list[Example]:
    """Seeded shuffle, render, pack; the first ``n_sequences`` chunks (ESFT §3.3 data sampling).

    Stops rendering as soon as enough tokens are packed, so a large data set costs only what is used.
    With ``response_only`` the returned masks mark response tokens; otherwise every token counts.
    Without ``repeat`` each record is used at most once, so short data gives fewer chunks. With ``repeat``
    the records are cycled, each pass in a fresh order drawn from the same seeded generator (the first pass
    is the order without ``repeat``), until exactly ``n_sequences`` chunks are packed.
    """
    return _sample(records, tokenizer, n_sequences, seq_len, seed, response_only, repeat)[0]


def _sample(
    records: Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    n_sequences: int,
    seq_len: int,
    seed: int,
    response_only: bool,
    repeat: bool,
) -> tuple[list[Example], float]:
    """:func:`sample_sequences` and the number of passes over ``records`` it rendered (1.5 = one and a half)."""
    if n_sequences < 1:
        raise DataError(f"n_sequences must be at least 1, got {n_sequences}")
    rng = random.Random(seed)
    order = list(range(len(records)))
    needed = n_sequences * seq_len
    used = 0  # records rendered, over all passes

    def rendered():
        nonlocal used
        total, cache = 0, {}
        while True:
            rng.shuffle(order)
            before = total
            for i in order:
                if i not in cache:  # a repeated pass renders nothing again
                    ids, mask = render_example(records[i], tokenizer)
                    cache[i] = ids, (mask if response_only else [1] * len(ids))
                yield cache[i]
                used += 1
                total += len(cache[i][0])
                if total >= needed:
                    return
            if not repeat or total == before:  # one pass only, or records without tokens: no progress
                return

    chunks = pack_sequences(rendered(), seq_len)[:n_sequences]
    if response_only and not any(any(m) for _, m in chunks):
        raise DataError(
            f"the {len(chunks)} sampled sequence(s) of {seq_len} tokens hold no response tokens (the loss would "
            "be empty): use a longer --seq-len, or data with responses (chat assistant turns, 'response', 'text')"
        )
    return chunks, used / max(len(records), 1)


def mix_sequences(
    records: Sequence[dict],
    mix_records: Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    n_sequences: int,
    mix_ratio: float,
    seq_len: int,
    seed: int,
    response_only: bool = True,
    log: Callable[[str], None] | None = print,
) -> list[Example]:
    """``n_sequences`` training sequences, ``round(n_sequences * mix_ratio)`` of them from ``mix_records`` (the
    ESFT paper mixes alignment data into the task data, 1:1 = 0.5), seeded and shuffled together.

    ``mix_ratio`` is a share of sequences, and it is the share realised whatever the sizes of the two data
    sets: each side is packed to its own quota, and a side that one pass does not fill (usually the task
    data) is cycled (:func:`sample_sequences` with ``repeat``). At least one sequence is task data. ``log``
    gets one line saying how many sequences each side gave and how many passes over its records that took.
    """
    if not 0 <= mix_ratio < 1:
        raise DataError(f"mix_ratio must be in [0, 1), got {mix_ratio}")
    n_mix = min(round(n_sequences * mix_ratio), n_sequences - 1) if mix_records else 0
    if n_mix == 0:
        return sample_sequences(records, tokenizer, n_sequences, seq_len, seed, response_only)
    task, task_passes = _sample(records, tokenizer, n_sequences - n_mix, seq_len, seed, response_only, True)
    mix, mix_passes = _sample(mix_records, tokenizer, n_mix, seq_len, seed, response_only, True)
    if log is not None:
        log(f"training data: {len(task)} task sequences ({task_passes:.2f} passes over {len(records)} records) "
            f"+ {len(mix)} mixed-in sequences ({mix_passes:.2f} passes over {len(mix_records)} records) = "
            f"{len(mix) / (len(task) + len(mix)):.1%} mixed in (asked: {mix_ratio:.1%})")
    out = task + mix
    random.Random(seed + 2).shuffle(out)
    return out
