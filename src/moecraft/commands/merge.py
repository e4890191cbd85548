"""Merge a training artifact into its base model: a plain checkpoint that stock transformers loads.

Example: moecraft merge --artifact run/ --out merged/   (--base defaults to the model the run trained)
The result loads with AutoModelForCausalLM.from_pretrained(merged/) (and so in vLLM etc.).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moecraft.artifacts import merge_artifact, read_manifest
from moecraft.config import checked, dtype_name
from moecraft.files import check_output_folder
from moecraft.models import load_model
from moecraft.runinfo import write_run_info


@dataclass
@checked(dtype=dtype_name)
class MergeConfig:
    artifact: str = field(metadata={"help": "training output folder (with artifact.json)"})
    out: str = field(metadata={"help": "folder for the merged checkpoint"})
    base: str | None = field(default=None, metadata={"help": "base model; default: the one recorded in the artifact"})
    dtype: str = field(default="auto", metadata={"help": "dtype to load the base in (auto, float32, bfloat16)"})


CONFIG = MergeConfig


def merge(cfg: MergeConfig):
    """Load base + artifact, merge, ``save_pretrained`` model and tokenizer to ``cfg.out``; returns the model."""
    manifest = read_manifest(cfg.artifact)
    check_output_folder(cfg.out, "--out")
    base = cfg.base or manifest["base"]
    model, tokenizer = load_model(base, dtype=cfg.dtype)
    merged = merge_artifact(model, cfg.artifact)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    write_run_info(out, cfg)
    return merged


def run(cfg: MergeConfig) -> int:
    merge(cfg)
    print(f"merged {cfg.artifact} into {cfg.base or read_manifest(cfg.artifact)['base']} -> {cfg.out}")
    return 0
