"""moecraft: expert-level parameter-efficient fine-tuning of Mixture-of-Experts LLMs (ESFT, PESC).

The public Python API mirrors the CLI one to one; each function takes the same config dataclass that
the matching ``moecraft <command>`` builds from its options or ``--config`` YAML.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module; imported on first use so that `moecraft --help` stays fast
_LAZY = {
    "score_experts": "moecraft.esft.stats",
    "ScoreConfig": "moecraft.esft.stats",
    "ExpertScores": "moecraft.esft.stats",
    "select_experts": "moecraft.esft.selection",
    "SelectConfig": "moecraft.esft.selection",
    "ExpertConfig": "moecraft.esft.selection",
    "load_model": "moecraft.models",
    "tiny_model": "moecraft.models",
    "load_records": "moecraft.data",
    "get_family": "moecraft.families",
    "TrainConfig": "moecraft.train",
    "load_artifact": "moecraft.artifacts",
    "merge_artifact": "moecraft.artifacts",
    "craft_model": "moecraft.pesc",
    "CraftConfig": "moecraft.pesc",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moecraft' has no attribute '{name}'")


__all__ = ["__version__", *_LAZY]
