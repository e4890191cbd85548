"""Router tuning (Router Lens / CEFT, arXiv 2508.19594): only the routers of the MoE layers are trained.

Tuning the routers alone on the task shows which experts the task needs: run ``moecraft score`` on the
router-tuned model (merged) to select experts, then fine-tune those (the two-stage recipe in the README).
Everything but the routers' own weights (and GPT-OSS's router bias) is frozen; DeepSeek-V3's
expert-choice correction bias is a buffer and stays as it is. The artifact holds the router tensors only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from moecraft.artifacts import TENSORS, save_tensors
from moecraft.families import moe_layers
from moecraft.methods.fft import FFT


class RouterTuning(FFT):
    """FFT's artifact handling (whole tensors, loaded as they are), on the routers alone."""

    name = "router"
    default_lr = 1e-4  # moecraft's choice for these small tensors (not taken from the paper); --lr to change

    def prepare(self, model: nn.Module, cfg: Any) -> nn.Module:
        model.requires_grad_(False)
        for layer in moe_layers(model):  # an unknown family is a clear error there
            layer.router.requires_grad_(True)
        return model

    def save(self, model: nn.Module, out_dir: Path, cfg: Any) -> None:
        save_tensors(Path(out_dir) / TENSORS, {n: p for n, p in model.named_parameters() if p.requires_grad})


METHOD = RouterTuning()
