"""Task data: reading records (:mod:`.records`), rendering them to ids and loss masks (:mod:`.render`),
packing them into training sequences (:mod:`.packing`)."""

from moecraft.data.packing import PackedSequences, mix_sequences, pack_sequences, sample_sequences
from moecraft.data.records import BUILTIN_PREFIX, check_record, load_records, read_jsonl_rows, record_kind
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
    "ArrayExample",
    "PackedSequences",
    "render_batch",
]
