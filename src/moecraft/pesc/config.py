"""Options of PESC crafting (dense -> MoE with parameter-efficient experts): Python API, CLI and YAML."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moecraft.config import SEED, ConfigError, checked, dtype_name, non_empty

BASE_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FFN_PROJ = ("gate_proj", "up_proj", "down_proj")
CONFIG_FILE = "pesc_config.yaml"  # the CraftConfig in a crafted artifact folder


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
    """How to craft a dense model into a PESC MoE, and (for ``moecraft craft``) which model and where to.

    Defaults are PESC's training (Wu et al. 2024, arXiv 2401.02731, and its official QLoRA script): adapters +
    routers + LoRA r=64 on every linear layer of the 4-bit base; each field's help names its source."""

    model: str = field(default="tiny:llama", metadata={"help": "dense base: tiny:<kind>, local folder or hub id"})
    output: str | None = field(default=None, metadata={"help": "artifact folder (routers/adapters + config)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --output (once the new one is complete)"})
    expert: Literal["adapter", "lora"] = field(
        default="adapter",
        metadata={"help": "expert kind: 'adapter' (PESC bottleneck adapters on the shared FFN output; exports "
                  "as trust_remote_code checkpoint) or 'lora' (MixLoRA: FFN + per-expert LoRA on gate/up/down; "
                  "exports as a plain Mixtral checkpoint)"},
    )
    num_experts: int = field(default=8, metadata={"help": "experts per crafted layer (paper and official script: 8; "
                                                          "16 in the released Qwen2idae)"})
    top_k: int = field(default=2, metadata={"help": "experts per token (paper and official script: 2; 4 in Qwen2idae)"})
    adapter_dim: int = field(default=512, metadata={"help": "adapter bottleneck / expert LoRA rank r (paper: 512; "
                                                            "the official script's example sets 64)"})
    scaling: float = field(default=0.25, metadata={"help": "expert output scaling s (paper: 0.25, also the official "
                                                           "config class's default; the official script sets 1)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the expert input"})
    layers: list[int] | None = field(default=None, metadata={"help": "decoder layers to craft (default: all)"})
    aux_loss_coef: float = field(default=0.01, metadata={"help": "Switch load-balancing loss coefficient (paper: 0.01)"})
    # Base LoRA: the official PESC training script (github.com/wuhy68/Parameter-Efficient-MoE, train_moe.py) puts
    # LoRA r=64, alpha 16, dropout 0.1 on q,k,v,o,gate,up,down of the 4-bit base and trains it with the experts.
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank on the base's linear layers (0 = off; 64: the "
                                                         "official PESC script, train_moe.py)"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha of the base LoRA (16: official script)"})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout of the base LoRA (0.1: official script)"})
    lora_targets: list[str] | None = field(
        default=None,
        metadata={"help": "base modules given LoRA; default q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj "
                  "(official script; the shared FFN's projections included), without the FFN ones for the 'lora' "
                  "expert kind, whose experts already adapt the FFN"},
    )
    quantize: Literal["auto", "none", "nf4"] = field(
        default="auto", metadata={"help": "base weights: nf4 = QLoRA 4-bit NF4, double quantisation, bf16 compute "
                                  "(official script; needs CUDA + bitsandbytes); auto = nf4 if available, else none"}
    )
    dtype: str = field(default="auto", metadata={"help": "dtype of the base when not quantised (auto/bf16/fp32)"})
    seed: int = field(default=0, metadata={"help": "seed for router/adapter initialisation"})


def base_lora_targets(cfg: CraftConfig) -> list[str]:
    """Modules given the base LoRA: ``cfg.lora_targets``, or the default (see the field's help)."""
    if cfg.lora_targets is not None:
        return list(cfg.lora_targets)
    return [t for t in BASE_LORA_TARGETS if not (cfg.expert == "lora" and t in FFN_PROJ)]
