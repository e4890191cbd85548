"""Merge a training artifact into its base model: a plain checkpoint that stock transformers loads.

Example: moecraft merge --artifact run/ --out merged/   (--base defaults to the model the run trained)
The result loads with AutoModelForCausalLM.from_pretrained(merged/) (and so in vLLM etc.).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moecraft.config import checked, dtype_name


@dataclass
@checked(dtype=dtype_name)
class MergeConfig:
    artifact: str = field(metadata={"help": "training output folder (with artifact.json)"})
    out: str = field(metadata={"help": "folder for the merged checkpoint"})
    base: str | None = field(default=None, metadata={"help": "base model; default: the one recorded in the artifact"})
    dtype: str = field(default="auto", metadata={"help": "dtype to load the base in (auto, float32, bfloat16)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --out (once the new one is complete)"})


CONFIG = MergeConfig


def merge(cfg: MergeConfig):
    """Load base + artifact, merge, write ``cfg.out`` in the base's own layout and files
    (:func:`moecraft.hf_folder.save_model_folder`); returns the merged model.

    Written into a temporary sibling of ``cfg.out`` and renamed when complete (:func:`moecraft.files.output_folder`).
    """
    from moecraft.artifacts import merge_artifact, read_manifest
    from moecraft.files import output_folder
    from moecraft.hf_folder import save_model_folder
    from moecraft.models import load_model
    from moecraft.runinfo import write_run_info

    manifest = read_manifest(cfg.artifact)
    base = cfg.base or manifest["base"]
    with output_folder(cfg.out, inputs=[cfg.artifact, base], overwrite=cfg.overwrite) as tmp:
        model, tokenizer = load_model(base, dtype=cfg.dtype)
        merged = merge_artifact(model, cfg.artifact)
        save_model_folder(merged, tokenizer, tmp, base)
        write_run_info(tmp, cfg)
    return merged


def run(cfg: MergeConfig) -> int:
    from moecraft.artifacts import read_manifest

    merge(cfg)
    print(f"merged {cfg.artifact} into {cfg.base or read_manifest(cfg.artifact)['base']} -> {cfg.out}")
    return 0
