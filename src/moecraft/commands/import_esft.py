"""Import an adapter folder of the official ESFT code (github.com/deepseek-ai/ESFT) as a moecraft ESFT run.

The folder holds per-expert weights (`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`, plus shared
experts / non-expert modules when trained) in *.safetensors and `expert_cfg.json`. The result is a training output
like `moecraft train --method esft` writes: `moecraft merge`, `generate --artifact`, `eval --adapter` use it.
Example: moecraft import-esft --adapter official_out/ --base deepseek-ai/DeepSeek-V2-Lite --out run/
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moecraft.config import checked, dtype_name


@dataclass
@checked(dtype=dtype_name)
class ImportEsftConfig:
    adapter: str = field(metadata={"help": "official ESFT adapter folder (*.safetensors + expert_cfg.json)"})
    base: str = field(metadata={"help": "the DeepSeek-V2 base model the adapter was trained on"})
    out: str = field(metadata={"help": "folder for the moecraft training output"})
    expert_config: str | None = field(
        default=None, metadata={"help": "official expert config (default: <adapter>/expert_cfg.json)"})
    dtype: str = field(default="auto", metadata={"help": "dtype to load the base in (auto, float32, bfloat16)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --out"})


CONFIG = ImportEsftConfig


def run(cfg: ImportEsftConfig) -> int:
    from moecraft.esft.official import import_esft
    from moecraft.files import output_folder
    from moecraft.runinfo import write_run_info

    # the same output-folder rules as every command: temporary sibling, renamed when complete
    with output_folder(cfg.out, inputs=[cfg.adapter, cfg.base, cfg.expert_config], overwrite=cfg.overwrite) as tmp:
        import_esft(cfg.adapter, cfg.base, tmp, cfg.expert_config, cfg.dtype)
        write_run_info(tmp, cfg)
    out = cfg.out
    print(f"imported {cfg.adapter} -> {out} (moecraft ESFT artifact on {cfg.base})")
    return 0
