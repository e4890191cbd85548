"""Reproducibility: the config, seed, command line and library versions written next to every output."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moecraft.config import to_dict

_LIBS = ("moecraft", "torch", "transformers", "accelerate", "peft", "safetensors", "datasets", "tokenizers")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in _LIBS:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            continue
    out["cuda"] = torch.version.cuda or "none"
    return out


def run_info(cfg: Any = None) -> dict:
    return {
        "command": " ".join(sys.argv),
        "config": to_dict(cfg) if cfg is not None else None,
        "versions": library_versions(),
        "platform": platform.platform(),
    }


def write_run_info(path: str | Path, cfg: Any = None) -> Path:
    """Write ``run_info`` as JSON to ``path`` (a file name, or a folder that gets ``run_info.json``)."""
    path = Path(path)
    if path.is_dir() or path.suffix == "":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "run_info.json"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run_info(cfg), indent=2, ensure_ascii=False) + "\n")
    return path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
