"""Options of PESC crafting (dense -> MoE with parameter-efficient experts): Python API, CLI and YAML."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moecraft.config import SEED, ConfigError, checked, dtype_name, non_empty


def _top_k_fits(cfg: CraftConfig) -> None:
    if cfg.top_k > cfg.num_experts:
        raise ConfigError(f"option 'top_k' ({cfg.top_k}) must be <= num_experts ({cfg.num_experts})", "top_k")


@dataclass
@checked(
    _top_k_fits, non_empty("layers"), num_experts=">= 1", top_k=">= 1", adapter_dim=">= 1", scaling="> 0", dropout="[0, 1)",
    layers=">= 0", aux_loss_coef=">= 0", lora_rank=">= 0", lora_alpha="> 0", lora_dropout="[0, 1)",
    dtype=dtype_name, seed=SEED,
)
class CraftConfig:
    """How to craft a dense model into a PESC MoE, and (for ``moecraft craft``) which model and where to."""

    model: str = field(default="tiny:llama", metadata={"help": "dense base: tiny:<kind>, local folder or hub id"})
    output: str | None = field(default=None, metadata={"help": "artifact folder (routers/adapters + config)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --output (once the new one is complete)"})
    expert: Literal["adapter", "lora"] = field(
        default="adapter",
        metadata={"help": "expert kind: 'adapter' (PESC bottleneck adapters on the shared FFN output; exports "
                  "as trust_remote_code checkpoint) or 'lora' (MixLoRA: FFN + per-expert LoRA on gate/up/down; "
                  "exports as a plain Mixtral checkpoint)"},
    )
    num_experts: int = field(default=8, metadata={"help": "experts per crafted layer (paper: 8; 16 for Qwen)"})
    top_k: int = field(default=2, metadata={"help": "experts per token (paper: 2; 4 for Qwen)"})
    adapter_dim: int = field(default=512, metadata={"help": "adapter bottleneck / expert LoRA rank r (paper: 512)"})
    scaling: float = field(default=0.25, metadata={"help": "expert output scaling s (paper: 0.25)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the expert input"})
    layers: list[int] | None = field(default=None, metadata={"help": "decoder layers to craft (default: all)"})
    aux_loss_coef: float = field(default=0.01, metadata={"help": "Switch load-balancing loss coefficient"})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank on the base's attention (0 = off; paper: 64)"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha for the base LoRA"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout for the base LoRA"})
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "base modules given LoRA (paper: also gate_proj,up_proj,down_proj; adapter kind only)"},
    )
    quantize: Literal["auto", "none", "nf4"] = field(
        default="auto", metadata={"help": "base weights: nf4 = QLoRA 4-bit (CUDA + bitsandbytes); auto = nf4 if available"}
    )
    dtype: str = field(default="auto", metadata={"help": "dtype of the base when not quantised (auto/bf16/fp32)"})
    seed: int = field(default=0, metadata={"help": "seed for router/adapter initialisation"})
