"""Craft a dense model into a PESC MoE (adapter or LoRA experts) and save the untrained artifact.

Each FFN of the chosen decoder layers becomes a top-k mixture of parameter-efficient experts on the
shared FFN (PESC, arXiv 2401.02731). The artifact holds only routers, experts and LoRA weights plus
the crafting config; train it with `moecraft train --method pesc`, run it with `moecraft generate`,
export it with `moecraft export`.
"""

from __future__ import annotations

from moecraft.errors import MoecraftError
from moecraft.pesc.config import CraftConfig

CONFIG = CraftConfig


def run(cfg: CraftConfig) -> int:
    if not cfg.output:
        raise MoecraftError("craft: --output (artifact folder) is required")
    from moecraft.files import output_folder
    from moecraft.pesc.craft import craft_model, load_base, mark_trainable, save_artifact
    from moecraft.runinfo import seed_everything

    seed_everything(cfg.seed)
    # written into a temporary sibling and renamed when complete (moecraft.files.output_folder)
    with output_folder(cfg.output, option="--output", inputs=[cfg.model], overwrite=cfg.overwrite) as tmp:
        model, _ = load_base(cfg)
        total = sum(p.numel() for p in model.parameters())
        craft_model(model, cfg)
        trainable = sum(model.get_parameter(n).numel() for n in mark_trainable(model))
        save_artifact(model, tmp, cfg)
    out = cfg.output
    print(f"crafted {cfg.model}: {cfg.num_experts} {cfg.expert} experts, top-{cfg.top_k}, r={cfg.adapter_dim}; "
          f"{trainable:,} trainable parameters on a {total:,}-parameter base -> {out}")
    return 0
