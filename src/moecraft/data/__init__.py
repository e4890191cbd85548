"""Task data: reading records (:mod:`.records`), rendering them to ids and loss masks (:mod:`.render`),
packing them into training sequences (:mod:`.packing`)."""

from moecraft.data.packing import PackedSequences, mix_sequences, pack_sequences, sample_sequences
from moecraft.data.records import (
    BUILTIN_PREFIX,
    FORMATS,
    DataOptions,
    Loaded,
    check_record,
    detect_format,
    load_records,
    read_jsonl_rows,
    read_records,
    read_rows,
    record_kind,
    to_canonical,
)
from moecraft.data.render import ArrayExample, Example, render_batch, render_example, render_prompt

__all__ = [
    "BUILTIN_PREFIX",
    "Example",
    "check_record",
    "load_records",
    "mix_sequences",
    "pack_sequences",
    "read_jsonl_rows",
    "record_kind",
    "render_example",
    "render_prompt",
    "sample_sequences",
    "DataOptions",
    "FORMATS",
    "Loaded",
    "detect_format",
    "read_records",
    "read_rows",
    "to_canonical",
    "ArrayExample",
    "PackedSequences",
    "render_batch",
]
