"""LoRA baseline of the ESFT paper (§4.1: rank 8, alpha 16, lr 1e-4) via ``peft``.

Targets every ``nn.Linear`` of attention and of the dense/shared MLPs; routers and the LM head are left
alone. ``lora_experts`` also puts LoRA (same rank and alpha, on every routed expert) on the fused 3-D
routed-expert tensors through peft's ``target_parameters`` (peft >= 0.17); peft applies no dropout there,
so it needs ``lora_dropout`` 0. Targets are applied as written (see :func:`_targets_as_written`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from moecraft.compat import peft_weight_conversion, require
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


@contextmanager
def _targets_as_written() -> Iterator[None]:
    """While peft builds a LoRA model, keep it from rewriting our targets for the transformers-4 layout.

    Under transformers >= 5, peft (0.19 to 0.21 at least) takes every LoRA config on DeepSeek-V2/V3,
    Qwen3-MoE, OLMoE and Mixtral for one written against the old per-expert ``nn.Linear`` layout: it turns
    the ``gate_proj``/``up_proj``/``down_proj`` targets into the routed experts' fused ``gate_up_proj`` /
    ``down_proj`` tensors and adds rank/alpha patterns ``.*\\.gate_up_proj`` that match no module (its
    "alpha_pattern keys did not match" warning). Our targets are read from the loaded model itself, so the
    rewrite would drop the LoRA of the dense and shared-expert MLPs and adapt the routed experts instead,
    ``lora_experts`` or not (huggingface/peft#3711). Saving and loading go through here too, so an artifact
    loads onto exactly the modules it was trained on.
    """
    conversion = peft_weight_conversion()
    if conversion is None:  # a peft without the rewrite: nothing to keep off
        yield
        return
    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


class LoRA:
    name = "lora"
    default_lr = 1e-4

    def prepare(self, model: nn.Module, cfg: Any) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        kw = {}
        if getattr(cfg, "lora_experts", False):
            require("lora_experts")
            if cfg.lora_dropout:
                raise MoecraftError(f"lora_experts needs lora_dropout 0 (got {cfg.lora_dropout}): peft cannot apply "
                                    "dropout to the fused routed-expert tensors")
            kw["target_parameters"] = _expert_parameters(model)
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=lora_targets(model), bias="none", **kw)
        with _targets_as_written():
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
        with _targets_as_written():
            return PeftModel.from_pretrained(base_model, str(path))

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()


METHOD = LoRA()
