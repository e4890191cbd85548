"""Task data: reading records (:mod:`.records`), rendering them to ids and loss masks (:mod:`.render`),
packing them into training sequences (:mod:`.packing`).

The names below are imported on first use: :mod:`.records` (and the config options it defines) stays
light to import, while :mod:`.render` and :mod:`.packing` import transformers and numpy.
"""

from moecraft.lazy import lazy_exports

_EXPORTS = {
    "moecraft.data.packing": ["PackedSequences", "mix_sequences", "pack_sequences", "sample_sequences"],
    "moecraft.data.records": ["BUILTIN_PREFIX", "FORMATS", "DataOptions", "Loaded", "check_record", "detect_format",
                              "load_records", "read_jsonl_rows", "read_records", "read_rows", "record_kind",
                              "to_canonical"],
    "moecraft.data.render": ["ArrayExample", "Example", "render_batch", "render_example", "render_prompt"],
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [name for names in _EXPORTS.values() for name in names]
