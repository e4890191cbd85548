"""moecraft: expert-level parameter-efficient fine-tuning of Mixture-of-Experts LLMs (ESFT, PESC).

The public Python API mirrors the CLI one to one; each function takes the same config dataclass that
the matching ``moecraft <command>`` builds from its options or ``--config`` YAML.
"""

from __future__ import annotations

from moecraft.lazy import lazy_exports

__version__ = "0.1.0"

# module -> names; imported on first use so that `moecraft --help` stays fast (configs from their light modules)
_EXPORTS = {
    "moecraft.esft.config": ["ScoreConfig", "SelectConfig"],
    "moecraft.esft.stats": ["score_experts", "ExpertScores"],
    "moecraft.esft.selection": ["select_experts", "ExpertConfig"],
    "moecraft.models": ["load_model", "tiny_model"],
    "moecraft.data": ["load_records"],
    "moecraft.families": ["get_family"],
    "moecraft.train.config": ["TrainConfig"],
    "moecraft.artifacts": ["load_artifact", "merge_artifact"],
    "moecraft.pesc": ["craft_model"],
    "moecraft.pesc.config": ["CraftConfig"],
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["__version__", *(name for names in _EXPORTS.values() for name in names)]
