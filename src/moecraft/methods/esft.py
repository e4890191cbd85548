"""ESFT (paper §3.3): train only the routed experts chosen by ``moecraft select`` (eq. 8), really sparsely.

The experts of each listed layer are split by :mod:`moecraft.esft.sparse` into a trainable [S, ...] part and
a frozen part with no gradient. Paper §6.3 / Table 3 options: ``train_shared_experts`` also trains the
shared experts, ``train_non_expert_modules`` also trains attention, norms, embeddings, routers and dense
layers (both default to the expert config's values). Routed experts not selected are never trained.
``expert_adapter="lora"`` trains per-expert LoRA factors on the selected experts instead of their weights
(:mod:`moecraft.esft.expert_lora`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch import nn

from moecraft.artifacts import TENSORS, apply_tensors, read_tensors, save_tensors
from moecraft.errors import MoecraftError
from moecraft.esft import expert_lora
from moecraft.esft.expert_parallel import apply_sparse_experts_ep, is_expert_parallel
from moecraft.esft.selection import ExpertConfig
from moecraft.esft.sparse import SparseExperts, apply_sparse_experts, sparse_modules
from moecraft.families import get_family, moe_layers
from moecraft.methods import ExtraLoss, trainable_param_groups

EXPERT_CONFIG = "expert_config.json"


def check_expert_config(ec: ExpertConfig, model: nn.Module, where: str, others_trained: bool = False) -> None:
    """The expert config must be for this model's family, expert count and MoE layers.

    No routed expert at all is allowed only when something else is trained (``others_trained``: shared
    experts or non-expert modules, the paper's Table 3 ablations).
    """
    family = get_family(model).name
    if ec.family and ec.family != family:
        raise MoecraftError(f"{where}: written for family '{ec.family}', the model is '{family}'")
    layers = moe_layers(model)
    # under expert parallelism a process holds 1/ep_size of each layer's experts
    scale = model.config.distributed_config.ep_size if is_expert_parallel(model) else 1
    n = layers[0].experts.num_experts * scale
    if ec.num_experts and ec.num_experts != n:
        raise MoecraftError(f"{where}: written for {ec.num_experts} experts per layer, the model has {n}")
    bad = sorted(set(ec.experts) - {layer.index for layer in layers})
    if bad:
        raise MoecraftError(f"{where}: layers {bad} are not MoE layers of this model ({[m.index for m in layers]})")
    for layer in layers:  # the file need not record num_experts: check every id against the model itself
        n_routed = layer.experts.num_experts * scale
        out_of_range = [i for i in ec.experts.get(layer.index, []) if not 0 <= i < n_routed]
        if out_of_range:
            raise MoecraftError(f"{where}: layer {layer.index}: expert ids {out_of_range} out of range: the model "
                                f"has {n_routed} routed experts per layer (ids 0..{n_routed - 1})")
    if not any(ec.experts.values()) and not others_trained:
        raise MoecraftError(f"{where}: selects no experts at all; nothing to train")


class ESFT:
    name = "esft"
    default_lr = 1e-5  # paper §4.1

    def prepare(self, model: nn.Module, cfg: Any) -> nn.Module:
        if not getattr(cfg, "experts", None):
            raise MoecraftError("--method esft needs --experts (an expert config from `moecraft select`)")
        ec = ExpertConfig.load(cfg.experts)  # validates ids (range, repeats)
        shared = ec.train_shared_experts if cfg.train_shared_experts is None else cfg.train_shared_experts
        non_expert = ec.train_non_expert_modules if cfg.train_non_expert_modules is None else cfg.train_non_expert_modules
        layers = moe_layers(model)
        has_shared = any(layer.shared for layer in layers)
        check_expert_config(ec, model, str(cfg.experts), others_trained=non_expert or (shared and has_shared))
        expert_parallel = is_expert_parallel(model)
        if expert_parallel and getattr(cfg, "train_router", False):
            raise MoecraftError("--train-router does not run under --expert-parallel yet")
        if expert_parallel and (non_expert or (shared and has_shared)):
            raise MoecraftError("--expert-parallel trains routed experts only; to also train shared experts or "
                                "non-expert modules, use FSDP2 or ZeRO-3 without --expert-parallel")
        model.requires_grad_(False)
        if non_expert:
            model.requires_grad_(True)
            for layer in layers:  # routed and shared experts are not "non-expert modules"
                layer.experts.requires_grad_(False)
                for _, mod in layer.shared:
                    mod.requires_grad_(False)
        if shared:
            for layer in layers:
                for _, mod in layer.shared:
                    mod.requires_grad_(True)
        # trainable parts require grad, frozen parts do not
        (apply_sparse_experts_ep if expert_parallel else apply_sparse_experts)(model, ec.experts)
        if getattr(cfg, "train_router", False):  # CEFT: the routers of the tuned layers learn too
            for layer in layers:
                if ec.experts.get(layer.index):
                    layer.router.requires_grad_(True)
        if getattr(cfg, "expert_adapter", "none") == "lora":
            if expert_parallel:
                raise MoecraftError("--expert-adapter lora does not run under --expert-parallel yet")
            if cfg.lora_dropout:
                raise MoecraftError("--expert-adapter lora has no dropout: give --lora-dropout 0")
            expert_lora.attach(sparse_modules(model), cfg.lora_r, cfg.lora_alpha, seed=getattr(cfg, "seed", 0))
        model._moecraft_expert_config_path = Path(cfg.experts)
        return model

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        return trainable_param_groups(model, weight_decay)

    def extra_loss(self, model: nn.Module) -> ExtraLoss:
        return ExtraLoss(None, {})

    def save(self, model: nn.Module, out_dir: Path, cfg: Any) -> None:
        out_dir = Path(out_dir)
        sparse = sparse_modules(model)
        inside = {id(p) for m in sparse.values() for p in m.parameters()}
        tensors, rows = {}, {}
        adapted = any(m.expert_lora is not None for m in sparse.values())
        if adapted:  # the selected experts' own weights did not change: their adapters are the artifact
            expert_lora.save(sparse, out_dir / expert_lora.ADAPTERS)
        for path, m in ({} if adapted else sparse).items():
            for pname in m.param_names:
                key = f"{path}.{pname}"
                tensors[key] = getattr(m.trainable, pname)
                rows[key] = list(m.expert_ids)
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in inside:
                tensors[name] = p
        save_tensors(out_dir / TENSORS, tensors, rows)
        ec_path = getattr(model, "_moecraft_expert_config_path", None)
        if ec_path is not None and ec_path.resolve() != (out_dir / EXPERT_CONFIG).resolve():
            shutil.copyfile(ec_path, out_dir / EXPERT_CONFIG)

    def load(self, base_model: nn.Module, artifact_dir: Path) -> nn.Module:
        if any(isinstance(m, SparseExperts) for m in base_model.modules()):
            raise MoecraftError("load ESFT artifacts onto a plain base model, not a wrapped one")
        tensors, rows = read_tensors(Path(artifact_dir) / TENSORS)
        apply_tensors(base_model, tensors, rows, str(artifact_dir))
        if (Path(artifact_dir) / expert_lora.ADAPTERS).is_file():  # --expert-adapter lora: fold B A in
            expert_lora.fold_into(base_model, Path(artifact_dir) / expert_lora.ADAPTERS)
        return base_model

    def merge(self, model: nn.Module) -> nn.Module:
        return model  # ESFT writes the trained experts into the fused tensors: load is already merged


METHOD = ESFT()
