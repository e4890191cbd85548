"""Export a PESC artifact (on its dense base) as a self-contained checkpoint for AutoModelForCausalLM.

Formats: `mixtral` (LoRA expert kind on a Llama/Mistral base: a plain Mixtral checkpoint, no custom
code, loadable by stock transformers and vLLM) and `custom` (any kind: the crafted weights plus a
`modeling_pesc.py`, load with `trust_remote_code=True`). `auto` picks mixtral for the LoRA kind when
the base fits, else custom. Base-model LoRA is merged in both.
`esft`: an ESFT training output (DeepSeek-V2) as a folder the official ESFT scripts load with
`esft.add_adapter` (per-expert weights + expert_cfg.json); see moecraft.esft.official.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moecraft.config import checked, dtype_name
from moecraft.errors import MoecraftError


@dataclass
@checked(dtype=dtype_name)
class ExportConfig:
    artifact: str = field(metadata={"help": "PESC artifact folder (from craft / train --method pesc); "
                                            "with --format esft, an ESFT training output"})
    output: str = field(metadata={"help": "folder for the exported checkpoint"})
    model: str | None = field(default=None, metadata={"help": "base model (default: the one in the artifact)"})
    format: Literal["auto", "mixtral", "custom", "esft"] = field(
        default="auto", metadata={"help": "checkpoint format (esft: official ESFT adapter folder)"})
    dtype: str = field(default="auto", metadata={"help": "base dtype when loading"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --output (once the new one is complete)"})


CONFIG = ExportConfig


def run(cfg: ExportConfig) -> int:
    from moecraft.files import output_folder
    from moecraft.models import load_model
    from moecraft.pesc.craft import load_artifact, read_config
    from moecraft.pesc.export import export_model
    from moecraft.runinfo import write_run_info

    if cfg.format == "esft":
        from moecraft.esft.official import export_esft

        # the same output-folder rules as every command: temporary sibling, renamed when complete
        with output_folder(cfg.output, option="--output", inputs=[cfg.artifact, cfg.model],
                           overwrite=cfg.overwrite) as tmp:
            export_esft(cfg.artifact, tmp, base=cfg.model)
            write_run_info(tmp / "moecraft_run_info.json", cfg)
        out = cfg.output
        print(f"exported to {out} (official ESFT adapter: esft.add_adapter(model, '{out}'))")
        return 0
    ccfg = read_config(cfg.artifact)
    base = cfg.model or ccfg.model
    if not base:
        raise MoecraftError("export: no --model given and the artifact names no base model")
    # written into a temporary sibling and renamed when complete: a killed export leaves no folder to load
    with output_folder(cfg.output, option="--output", inputs=[cfg.artifact, base], overwrite=cfg.overwrite) as tmp:
        model, tok = load_model(base, dtype=cfg.dtype, seed=ccfg.seed)
        load_artifact(model, cfg.artifact)
        export_model(model, tmp, cfg.format, tokenizer=tok, base=base)
        write_run_info(tmp / "moecraft_run_info.json", cfg)
        remote = (tmp / "modeling_pesc.py").is_file()
    out = cfg.output
    print(f"exported to {out} ({'custom code: load with trust_remote_code=True' if remote else 'Mixtral'})")
    return 0
