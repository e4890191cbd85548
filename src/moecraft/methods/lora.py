"""LoRA baseline of the ESFT paper (§4.1: rank 8, alpha 16, lr 1e-4) via ``peft``.

Targets every ``nn.Linear`` of attention and of the dense/shared MLPs; routers and the LM head are left
alone. ``lora_experts`` also puts LoRA on the fused 3-D routed-expert tensors through peft's
``target_parameters`` (peft >= 0.17).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from moecraft.errors import MoecraftError
from moecraft.methods import ExtraLoss, trainable_param_groups

ADAPTER = "adapter"


def lora_targets(model: nn.Module) -> list[str]:
    """Suffix names of the Linear layers LoRA adapts: all but routers and the output head."""
    skip = set()
    try:
        from moecraft.families import moe_layers

        skip = {id(layer.router) for layer in moe_layers(model)}
    except MoecraftError:
        pass  # dense model
    out_emb = model.get_output_embeddings()
    names = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and id(mod) not in skip and mod is not out_emb:
            names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise MoecraftError(f"{type(model).__name__}: no Linear layers for LoRA")
    return sorted(names)


def _expert_parameters(model: nn.Module) -> list[str]:
    from moecraft.esft.sparse import _expert_param_names
    from moecraft.families import moe_layers

    names = set()
    for layer in moe_layers(model):
        prefix = next(n for n, m in layer.block.named_children() if m is layer.experts)
        for p in _expert_param_names(layer.experts, layer.experts.num_experts):
            if not p.endswith("_bias"):
                names.add(f"{prefix}.{p}")
    return sorted(names)


class LoRA:
    name = "lora"
    default_lr = 1e-4

    def prepare(self, model: nn.Module, cfg: Any) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        kw = {}
        if getattr(cfg, "lora_experts", False):
            kw["target_parameters"] = _expert_parameters(model)
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=lora_targets(model), bias="none", **kw)
        return get_peft_model(model, lcfg)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        return trainable_param_groups(model, weight_decay)

    def extra_loss(self, model: nn.Module) -> ExtraLoss:
        return ExtraLoss(None, {})

    def save(self, model: nn.Module, out_dir: Path, cfg: Any) -> None:
        model.save_pretrained(str(Path(out_dir) / ADAPTER))

    def load(self, base_model: nn.Module, artifact_dir: Path) -> nn.Module:
        from peft import PeftModel

        path = Path(artifact_dir) / ADAPTER
        if not path.is_dir():
            raise MoecraftError(f"{artifact_dir}: no LoRA adapter folder '{ADAPTER}/'")
        return PeftModel.from_pretrained(base_model, str(path))

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()


METHOD = LoRA()
