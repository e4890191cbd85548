"""PESC as a training method (``moecraft train --method pesc``): craft the dense base into an MoE with
parameter-efficient experts, train only routers, experts and (optional) base LoRA, add the Switch
load-balancing loss (Switch Transformer eq. 4, over the batch's real tokens: the crafted model hands its
``attention_mask`` to the layers; coefficient ``aux_loss_coef``, default 0.01) and log per-layer expert usage.

Options are read from the train config: a ``pesc`` field (a :class:`CraftConfig` or a mapping), else
fields named ``pesc_<option>`` (e.g. ``pesc_num_experts``), else the :class:`CraftConfig` defaults.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from moecraft.config import from_dict
from moecraft.methods import ExtraLoss
from moecraft.pesc.config import CraftConfig
from moecraft.pesc.craft import (
    aux_loss,
    craft_model,
    expert_usage,
    load_artifact,
    mark_trainable,
    pesc_layers,
    save_artifact,
)


def craft_config_from(cfg: Any) -> CraftConfig:
    """The :class:`CraftConfig` carried by a train config (see module docstring)."""
    if isinstance(cfg, CraftConfig):
        return cfg
    nested = getattr(cfg, "pesc", None)
    if isinstance(nested, CraftConfig):
        return nested
    if isinstance(nested, dict):
        return from_dict(CraftConfig, nested, source="pesc options")
    values = {}
    for f in dataclasses.fields(CraftConfig):
        if getattr(cfg, f"pesc_{f.name}", None) is not None:
            values[f.name] = getattr(cfg, f"pesc_{f.name}")
    for name in ("model", "seed"):
        if name not in values and isinstance(getattr(cfg, name, None), (str, int)):
            values[name] = getattr(cfg, name)
    return from_dict(CraftConfig, values, source="pesc options")


class PescMethod:
    name = "pesc"
    default_lr = 2e-4  # QLoRA/PESC-style adapter training rate

    def load_base(self, cfg: Any, device) -> tuple[nn.Module, Any]:
        """The dense base: 4-bit NF4 (QLoRA) when asked for and possible, else the train dtype."""
        from moecraft.pesc.craft import load_base

        ccfg = craft_config_from(cfg)
        if getattr(cfg, "dtype", "auto") != "auto":
            ccfg.dtype = cfg.dtype
        return load_base(ccfg, device=str(device))

    def prepare(self, model: nn.Module, cfg: Any) -> nn.Module:
        ccfg = craft_config_from(cfg)
        if getattr(model, "is_loaded_in_4bit", False) and not pesc_layers(model):
            # QLoRA: peft's k-bit preparation (fp32 norms, input grads) BEFORE crafting, so that the
            # experts and routers stay in bf16 rather than being upcast with the rest.
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if not pesc_layers(model):
            craft_model(model, ccfg)
        model.pesc_config = getattr(model, "pesc_config", ccfg)
        mark_trainable(model)
        return model

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if ".router." in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def extra_loss(self, model: nn.Module) -> ExtraLoss:
        loss = aux_loss(model)
        if loss is None:
            return ExtraLoss(None, {})
        coef = model.pesc_config.aux_loss_coef
        logs = {"aux_loss": float(loss.detach())}
        for i, usage in expert_usage(model).items():
            logs[f"usage_max/l{i}"] = max(usage)
            logs.update({f"usage/l{i}/e{j}": u for j, u in enumerate(usage)})
        return ExtraLoss(loss * coef if coef else None, logs)

    def save(self, model: nn.Module, out_dir: Path, cfg: Any) -> None:
        save_artifact(model, out_dir, model.pesc_config, run_cfg=cfg)

    def load(self, base_model: nn.Module, artifact_dir: Path) -> nn.Module:
        return load_artifact(base_model, artifact_dir)


METHOD = PescMethod()
