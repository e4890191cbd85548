"""See what will be trained: read the data as train does, render examples with the trained tokens marked, count.

Runs moecraft's own pipeline (load_records -> render_example -> pack_sequences) with the tokenizer of
--model (only the tokenizer is loaded, not the weights). Prints N rendered examples with the trained
(loss) tokens highlighted (colour in a terminal, [[brackets]] otherwise), then the counts: records per
format, tokens, trained tokens, packed sequences, packing efficiency, and records that add no loss.
Every record is rendered for the counts (about as long as train's data preparation); --limit bounds it.
Example: moecraft data --data train.parquet --model Qwen/Qwen3-30B-A3B --examples 2
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from moecraft.config import checked
from moecraft.data.records import DataFormatName, data_option
from moecraft.errors import DataError


@dataclass
@checked(examples=">= 0", seq_len=">= 2", limit=">= 1")
class DataConfig:
    """Options of ``moecraft data``."""

    data: str = field(metadata={"help": "data to preview: file (JSONL, JSON, parquet, csv, arrow), folder, hub id "
                                        "or builtin:<task>"})
    model: str = field(default="tiny:deepseek_v2", metadata={
        "help": "model whose tokenizer and chat template render the data (only the tokenizer is loaded)"})
    examples: int = field(default=3, metadata={"help": "rendered examples to print (0 = counts only)"})
    seq_len: int = field(default=4096, metadata={"help": "packed sequence length, as in train"})
    limit: int | None = field(default=None, metadata={"help": "read at most this many records"})
    color: Literal["auto", "always", "never"] = field(default="auto", metadata={
        "help": "mark trained tokens with colour (auto: when printing to a terminal) or [[brackets]]"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the tokenizer's custom code"})
    # --- data format (moecraft.data.records.DataOptions; the same on score, train, eval, demo, data)
    data_format: DataFormatName = data_option("data_format")
    field_messages: str | None = data_option("field_messages")
    message_property_mappings: dict | None = data_option("message_property_mappings")
    data_columns: dict | None = data_option("data_columns")
    roles: dict | None = data_option("roles")
    roles_to_train: list[str] | None = data_option("roles_to_train")


CONFIG = DataConfig

_ON, _OFF = "\x1b[1;32m", "\x1b[0m"  # bold green for trained tokens


def _as_ints(values: Any) -> list[int]:
    """Token ids or mask values as a plain list (the renderer may return lists, tuples or numpy arrays)."""
    return [int(v) for v in values]


def _ids_mask(item: Any) -> tuple[list[int], list[int]]:
    """``(ids, mask)`` of a rendered example or packed sequence: a pair, or an object/dict with
    ``input_ids`` and ``loss_mask``."""
    if isinstance(item, dict):
        return _as_ints(item["input_ids"]), _as_ints(item["loss_mask"])
    if hasattr(item, "input_ids"):
        return _as_ints(item.input_ids), _as_ints(item.loss_mask)
    ids, mask = item[0], item[1]
    return _as_ints(ids), _as_ints(mask)


def highlight(tokenizer, ids: list[int], mask: list[int], color: bool) -> str:
    """The decoded example, each run of trained tokens wrapped in colour or ``[[ ]]``."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or bool(mask[i]) != bool(mask[start]):
            text = tokenizer.decode(ids[start:i], skip_special_tokens=False)
            if mask[start]:
                text = f"{_ON}{text}{_OFF}" if color else f"[[{text}]]"
            out.append(text)
            start = i
    return "".join(out)


def preview(cfg: DataConfig, tokenizer=None, file=None) -> dict:
    """Print ``cfg.examples`` rendered examples and the counts; return the counts as a dict."""
    from moecraft.data import DataOptions, pack_sequences, read_records, render_example

    file = file or sys.stdout
    if cfg.examples < 0:
        raise DataError(f"examples must be >= 0, got {cfg.examples}")
    if cfg.seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {cfg.seq_len}")
    loaded = read_records(cfg.data, cfg.limit, DataOptions.from_config(cfg))
    if tokenizer is None:
        from moecraft.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    color = cfg.color == "always" or (cfg.color == "auto" and getattr(file, "isatty", lambda: False)())
    examples, no_loss, empty, over_len = [], [], [], []
    for n, item in enumerate(loaded, 1):
        ids, mask = _ids_mask(render_example(item.record, tokenizer))
        examples.append((ids, mask))
        if not ids:
            empty.append(item.where)
        elif not any(mask):
            no_loss.append(item.where)
        if len(ids) > cfg.seq_len:
            over_len.append(item.where)
        if n <= cfg.examples:  # shown at once; the counts need every record rendered
            print(f"--- example {n}: {item.where} ({item.format}): {len(ids)} tokens, "
                  f"{sum(map(bool, mask))} trained", file=file)
            print(highlight(tokenizer, ids, mask, color), file=file, flush=True)
    packed = [_ids_mask(c) for c in pack_sequences(examples, cfg.seq_len)]
    tokens = sum(len(ids) for ids, _ in examples)
    trained = sum(sum(map(bool, mask)) for _, mask in examples)
    in_packs = sum(len(ids) for ids, _ in packed)
    stats = {
        "records": len(loaded),
        "formats": dict(Counter(item.format for item in loaded)),
        "tokens": tokens,
        "trained_tokens": trained,
        "sequences": len(packed),
        "packing_efficiency": in_packs / (len(packed) * cfg.seq_len) if packed else 0.0,
        "no_trained_tokens": len(no_loss),
        "empty": len(empty),
        "longer_than_seq_len": len(over_len),
    }
    if cfg.examples:
        mark = f"{_ON}green{_OFF}" if color else "[[ ]]"
        print(f"--- trained (loss) tokens are {mark}", file=file)
    formats = ", ".join(f"{k} {v}" for k, v in sorted(stats["formats"].items()))
    print(f"records: {len(loaded)} from {cfg.data}{' (--limit)' if cfg.limit else ''}; formats: {formats}", file=file)
    print(f"tokens: {tokens} ({tokenizer.__class__.__name__} of {cfg.model}); trained tokens: {trained} "
          f"({trained / max(tokens, 1):.1%})", file=file)
    print(f"packed: {len(packed)} sequences of {cfg.seq_len} tokens; packing efficiency "
          f"{stats['packing_efficiency']:.1%} (tokens / sequence slots)", file=file)
    for what, wheres in (("dropped (no tokens)", empty),
                         ("records without trained tokens (packed as context, add no loss)", no_loss),
                         (f"records longer than seq_len {cfg.seq_len} (split across sequences)", over_len)):
        if wheres:
            shown = ", ".join(wheres[:3]) + (", ..." if len(wheres) > 3 else "")
            print(f"{what}: {len(wheres)} ({shown})", file=file)
    if not empty:
        print("dropped: none (every record read is rendered and packed)", file=file)
    return stats


def run(cfg: DataConfig) -> int:
    preview(cfg)
    return 0
