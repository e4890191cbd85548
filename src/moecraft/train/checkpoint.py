"""Atomic training checkpoints for ``--resume``: trainable tensors, optimiser, scheduler, step, data, RNG.

A checkpoint is written to ``<out>/checkpoint.tmp``, every file fsynced, then renamed over
``<out>/checkpoint`` (the previous one is kept as ``checkpoint.old`` until the rename is done), so a
run killed at any moment leaves one complete checkpoint behind.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moecraft.errors import MoecraftError

NAME = "checkpoint"


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, model: nn.Module, optimizer, scheduler, state: dict) -> Path:
    """Write the trainable tensors (by name), optimiser/scheduler state, ``state`` (step, ...) and RNG."""
    out_dir = Path(out_dir)
    final, tmp, old = out_dir / NAME, out_dir / f"{NAME}.tmp", out_dir / f"{NAME}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": state,
                "rng": rng_state()}, tmp / "state.pt")
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(out_dir: Path) -> Path | None:
    for name in (NAME, f"{NAME}.old"):  # .old survives a kill between the two renames
        path = Path(out_dir) / name
        if (path / "state.pt").is_file() and (path / "trainable.safetensors").is_file():
            return path
    return None


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> dict:
    """Restore everything :func:`save_checkpoint` wrote; returns the saved ``state``."""
    tensors = load_file(str(path / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        raise MoecraftError(f"{path}: checkpoint does not match this run's trainable tensors "
                            f"(different method or options?)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device, p.dtype))
    blob = torch.load(path / "state.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return blob["state"]
