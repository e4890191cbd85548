"""Registry of supported MoE families: the one place that knows where routers and experts live.

Adding a family: write ``moecraft/families/<name>.py`` defining ``FAMILY = MoEFamily(...)`` (layout,
routing spec, tiny test config), add its module name to ``_MODULES`` below, and add it to the family
list in ``tests/test_families.py``.
"""

from __future__ import annotations

import importlib

from torch import nn
from transformers import PretrainedConfig

from moecraft.errors import UnsupportedModelError
from moecraft.families.base import MoEFamily, MoELayer, RoutingSpec, reference_route, router_bias_tensors

_MODULES = ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "gpt_oss")

FAMILIES: dict[str, MoEFamily] = {}
for _name in _MODULES:
    _family: MoEFamily = importlib.import_module(f"moecraft.families.{_name}").FAMILY
    FAMILIES[_family.name] = _family

_BY_MODEL_TYPE = {mt: fam for fam in FAMILIES.values() for mt in fam.model_types}


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def get_family(obj: nn.Module | PretrainedConfig | str) -> MoEFamily:
    """The family of a model, a config, a ``model_type`` or a family name; a clear error if unsupported."""
    if isinstance(obj, str):
        key = obj
    else:
        config = obj if isinstance(obj, PretrainedConfig) else getattr(obj, "config", None)
        key = getattr(config, "model_type", None) or type(obj).__name__
    family = FAMILIES.get(key) or _BY_MODEL_TYPE.get(key)
    if family is None:
        raise UnsupportedModelError(
            f"model type '{key}' is not a supported MoE family; supported: {', '.join(supported_families())}. "
            "For a dense model (Llama, Mistral, Qwen2, ...) use PESC (`moecraft craft`) instead of ESFT."
        )
    return family


def moe_layers(model: nn.Module) -> list[MoELayer]:
    layers = get_family(model).moe_layers(model)
    if not layers:
        raise UnsupportedModelError(f"{type(model).__name__} has no MoE layers")
    return layers


def routing_spec(model: nn.Module) -> RoutingSpec:
    return get_family(model).routing(model.config)


__all__ = [
    "FAMILIES",
    "MoEFamily",
    "MoELayer",
    "RoutingSpec",
    "get_family",
    "moe_layers",
    "reference_route",
    "router_bias_tensors",
    "routing_spec",
    "supported_families",
]
