"""Put a trained moecraft artifact (ESFT experts, FFT weights, LoRA adapter, PESC experts) onto a base model."""

from __future__ import annotations

import json
from pathlib import Path

from moecraft.errors import MoecraftError


def artifact_method(path: Path) -> str:
    """The training method that wrote ``path``: the ``method`` field of its JSON metadata files."""
    if not path.is_dir():
        raise MoecraftError(f"artifact folder not found: {path}")
    for p in sorted(path.glob("*.json")):
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(d, dict):
            for cand in (d, d.get("config") or {}):
                if isinstance(cand, dict) and isinstance(cand.get("method"), str):
                    return cand["method"]
    raise MoecraftError(f"{path}: no JSON file naming the training method ('method' field); is it a moecraft artifact?")


def apply_artifact(model, path: Path):
    from moecraft.methods import get_method

    return get_method(artifact_method(path)).load(model, path)
