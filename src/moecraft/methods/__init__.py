"""Training methods behind one registry: ``esft``, ``fft``, ``lora``, ``router`` (MoE models) and ``pesc`` (dense models).

The training loop (:mod:`moecraft.train`) is method-agnostic: it asks the method to prepare the model
(freeze, wrap, add adapters), to name the parameters the optimiser gets, for any extra loss term
(PESC's load-balancing loss), and to save/load the artifact (only what was trained).
Adding a method is one module here that defines ``METHOD`` and one line in ``_MODULES``.

Optional hooks a method may define: ``load_base(cfg, device) -> (model, tokenizer)`` to load its base
itself (PESC: 4-bit QLoRA), and ``merge(model)`` to fold what was trained into plain weights.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from moecraft.errors import MoecraftError


@dataclass
class ExtraLoss:
    """A loss term a method adds to the language-model loss, with what to log about it."""

    loss: torch.Tensor | None
    logs: dict[str, float]


class TrainingMethod(Protocol):
    name: str
    default_lr: float  # the paper's default learning rate for this method

    def prepare(self, model: nn.Module, cfg: Any) -> nn.Module:
        """Freeze/convert/wrap ``model`` for training with this method; returns the model to train."""

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """Optimiser parameter groups: only trainable tensors (frozen ones get no optimiser state)."""

    def extra_loss(self, model: nn.Module) -> ExtraLoss:
        """Extra loss after a forward pass (e.g. PESC's auxiliary load-balancing loss)."""

    def save(self, model: nn.Module, out_dir: Path, cfg: Any) -> None:
        """Write only what was trained, plus what is needed to load it onto the base model."""

    def load(self, base_model: nn.Module, artifact_dir: Path) -> nn.Module:
        """Put a saved artifact onto a base model (unmerged); clear error on a mismatched base."""


def trainable_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the parameters that require grad: decay on matrices, none on biases and norms.

    Frozen tensors are left out, so they get no optimiser state and no weight decay.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


_MODULES: tuple[str, ...] = ("esft", "fft", "lora", "pesc", "router")


def method_names() -> list[str]:
    return list(_MODULES)


def get_method(name: str) -> TrainingMethod:
    if name not in _MODULES:
        raise MoecraftError(f"unknown training method '{name}'; choose from {list(_MODULES)}")
    return importlib.import_module(f"moecraft.methods.{name}").METHOD
