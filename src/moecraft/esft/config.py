"""Options of ``moecraft score`` and ``moecraft select`` (and, from Python, of
:func:`moecraft.esft.stats.score_experts` and :func:`moecraft.esft.selection.select_experts`).

Kept apart from the code that uses them, which imports torch, so that building the CLI stays light.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from moecraft.config import MAY_BE_EMPTY, SEED, ConfigError, checked, device_name, dtype_name, non_empty
from moecraft.data.records import DataFormatName, data_option

__all__ = ["ScoreConfig", "SelectConfig"]


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


def _one_rule(cfg: SelectConfig) -> None:
    """``p`` and ``top_share`` are two selection rules: one at most (neither: the paper's p)."""
    if cfg.p is not None and cfg.top_share is not None:
        raise ConfigError("options 'p' (cumulative score threshold, eq. 8) and 'top_share' (share of the experts) "
                          "are two selection rules; give one of them", "top_share")
    if cfg.top_share is not None and cfg.normalize:
        raise ConfigError("option 'normalize' changes what p means and has no effect with 'top_share' (the "
                          "ranking is the same); drop one of them", "normalize")


def _scores_as_paths(cls: type) -> type:
    """Let Python callers pass one scores file as a path or string (a list of them otherwise); run before
    the ``@checked`` checks so the value is checked as the list it becomes."""
    checks = cls.__post_init__

    def post_init(self) -> None:
        if isinstance(self.scores, (str, os.PathLike)):
            self.scores = [self.scores]
        if isinstance(self.scores, (list, tuple)):
            self.scores = [Path(x) if isinstance(x, os.PathLike) or (isinstance(x, str) and x) else x
                           for x in self.scores]
        checks(self)

    cls.__post_init__ = post_init
    return cls


@dataclass
@_scores_as_paths
@checked(_one_rule, non_empty("scores"), p="(0, 1]", top_share="(0, 1]", max_experts=">= 1", out=MAY_BE_EMPTY)
class SelectConfig:
    """Options of ``moecraft select``: pick each layer's task experts from router statistics."""

    scores: list[Path] = field(default_factory=lambda: ["scores.json"], metadata={
        "help": "statistics written by `moecraft score`; several files (space-separated, a list in YAML): "
                "selected one by one with the same rule, then combined per layer (--combine)",
        "nargs": "+", "metavar": "SCORES"})
    score: Literal["gate", "token"] = field(
        default="token", metadata={"help": "gate = average gate score (eq. 5), token = token selection ratio (eq. 6)"})
    p: float | None = field(
        default=None, metadata={"help": "cumulative-score threshold in (0, 1] (eq. 8); default 0.1 gate, 0.2 token"})
    top_share: float | None = field(default=None, metadata={
        "help": "instead of --p: keep the ceil(S x experts) highest-scoring experts of each layer, S in (0, 1] "
                "(MoE-Sieve: 0.25)"})
    combine: Literal["union", "intersection"] = field(default="union", metadata={
        "help": "with several --scores: keep per layer the experts selected for any file (union) or for every "
                "file (intersection)"})
    normalize: bool = field(default=False, metadata={"help": "divide each layer's scores by their sum first"})
    max_experts: int | None = field(default=None, metadata={"help": "cap on selected experts per layer"})
    train_shared_experts: bool = field(default=False, metadata={"help": "also train shared experts (paper §6.3)"})
    train_non_expert_modules: bool = field(
        default=False, metadata={"help": "also train attention, norms, embeddings (paper §6.3)"})
    out: Path = field(default=Path("experts.json"), metadata={"help": "where to write the expert config"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out file (once the new one is complete)"})
