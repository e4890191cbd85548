"""Options of ``moecraft score`` (and, from Python, of :func:`moecraft.esft.stats.score_experts`).

Kept apart from the code that uses them, which imports torch, so that building the CLI stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moecraft.config import MAY_BE_EMPTY, SEED, checked, device_name, dtype_name
from moecraft.data.records import DataFormatName, data_option

__all__ = ["ScoreConfig"]


@dataclass
@checked(out=MAY_BE_EMPTY, n_sequences=">= 1", seq_len=">= 2", batch_size=">= 1", seed=SEED, dtype=dtype_name,
         device=device_name, limit=">= 0", expert_parallel=">= 1")
class ScoreConfig:
    """Options of ``moecraft score``: sample task data and gather router statistics."""

    model: str = field(default="tiny:deepseek_v2", metadata={"help": "hub id, local folder, or tiny:<family>"})
    data: str = field(default="builtin:intent", metadata={"help": "JSONL file, datasets folder, hub id or builtin:<task>"})
    out: Path = field(default=Path("scores.json"), metadata={"help": "where to write the statistics (JSON)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out file (once the new one is complete)"})
    n_sequences: int = field(default=32, metadata={"help": "number of packed sequences to sample (paper: 32)"})
    seq_len: int = field(default=4096, metadata={"help": "tokens per packed sequence (paper: 4096)"})
    batch_size: int = field(default=1, metadata={"help": "sequences per forward pass"})
    seed: int = field(default=0, metadata={"help": "seed of the sample shuffle"})
    response_only: bool = field(default=False, metadata={"help": "count only response tokens"})
    chat_template_kwargs: str | None = field(default=None, metadata={
        "help": 'JSON object of chat template options, e.g. \'{"enable_thinking": false}\''})
    dtype: str = field(default="auto", metadata={"help": "model dtype: auto, bfloat16, float32, ..."})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda, cuda:1, ..."})
    limit: int | None = field(default=None, metadata={"help": "read at most this many records"})
    expert_parallel: int = field(default=1, metadata={
        "help": "split each MoE layer's experts over N processes (transformers' expert-parallel plan; launch "
                "N processes with torchrun); each scores its share of the sample"})
    # --- data format (moecraft.data.records.DataOptions; the same on score, train, eval, demo, data)
    data_format: DataFormatName = data_option("data_format")
    field_messages: str | None = data_option("field_messages")
    message_property_mappings: dict | None = data_option("message_property_mappings")
    data_columns: dict | None = data_option("data_columns")
    roles: dict | None = data_option("roles")
    roles_to_train: list[str] | None = data_option("roles_to_train")
