"""Generate text from a model, optionally with a trained artifact loaded onto it (greedy by default).

`--model` is the base (tiny:<kind>, folder, hub id) or an exported/merged checkpoint; `--artifact` any
moecraft artifact folder (ESFT, FFT, LoRA or PESC: it says which) to load onto the base. The prompt goes through the chat template
as one user turn unless `--chat false`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moecraft.config import SEED, checked, device_name, dtype_name
from moecraft.errors import MoecraftError


@dataclass
@checked(max_new_tokens=">= 1", temperature=">= 0", top_p="(0, 1]", dtype=dtype_name, device=device_name, seed=SEED)
class GenerateConfig:
    prompt: str = field(metadata={"help": "prompt text"})
    model: str = field(default="tiny:llama", metadata={"help": "base model or exported checkpoint"})
    artifact: str | None = field(default=None, metadata={"help": "artifact folder to load onto the base"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens to generate"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; > 0 samples"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (when sampling)"})
    chat: bool = field(default=True, metadata={"help": "wrap the prompt in the chat template"})
    chat_template_kwargs: str | None = field(default=None, metadata={
        "help": 'JSON object of chat template options, e.g. \'{"enable_thinking": false}\''})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom code (PESC adapter exports)"})
    dtype: str = field(default="auto", metadata={"help": "model dtype"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})


CONFIG = GenerateConfig


def load_for_generation(cfg: GenerateConfig):

    from moecraft.esft.stats import resolve_device
    from moecraft.models import load_model, load_tokenizer, resolve_dtype

    device = str(resolve_device(cfg.device))
    if cfg.trust_remote_code and not cfg.model.startswith("tiny:"):
        from transformers import AutoModelForCausalLM

        from moecraft.files import check_complete

        if Path(cfg.model).is_dir():
            check_complete(cfg.model)  # e.g. the temporary folder of a killed export

        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=resolve_dtype(cfg.dtype), trust_remote_code=True)
        model, tok = model.to(device).eval(), load_tokenizer(cfg.model, trust_remote_code=True)
    else:
        try:
            model, tok = load_model(cfg.model, dtype=cfg.dtype, device=device, seed=cfg.seed)
        except ValueError as exc:
            if "trust_remote_code" in str(exc):
                raise MoecraftError(f"{cfg.model} needs custom code: add --trust-remote-code") from exc
            raise
    if cfg.artifact:
        from moecraft.artifacts import load_artifact

        model = load_artifact(model, cfg.artifact).to(device).eval()
    return model, tok


def run(cfg: GenerateConfig) -> int:
    from moecraft.data.render import template_options
    from moecraft.pesc.generation import generate

    options = template_options(cfg.chat_template_kwargs)  # a bad option fails before the model loads
    model, tok = load_for_generation(cfg)
    print(generate(model, tok, cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.chat, cfg.seed,
                   template_kwargs=options))
    return 0
