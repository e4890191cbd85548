"""Full fine-tuning (FFT) baseline of the ESFT paper (§4.1, lr 3e-5): every parameter is trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from moecraft.artifacts import TENSORS, apply_tensors, read_tensors, save_tensors
from moecraft.methods import ExtraLoss, trainable_param_groups


class FFT:
    name = "fft"
    default_lr = 3e-5

    def prepare(self, model: nn.Module, cfg: Any) -> nn.Module:
        return model.requires_grad_(True)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        return trainable_param_groups(model, weight_decay)

    def extra_loss(self, model: nn.Module) -> ExtraLoss:
        return ExtraLoss(None, {})

    def save(self, model: nn.Module, out_dir: Path, cfg: Any) -> None:
        # named_parameters() lists tied weights once, which is what safetensors needs
        save_tensors(Path(out_dir) / TENSORS, dict(model.named_parameters()))

    def load(self, base_model: nn.Module, artifact_dir: Path) -> nn.Module:
        tensors, rows = read_tensors(Path(artifact_dir) / TENSORS)
        apply_tensors(base_model, tensors, rows, str(artifact_dir))
        return base_model

    def merge(self, model: nn.Module) -> nn.Module:
        return model


METHOD = FFT()
