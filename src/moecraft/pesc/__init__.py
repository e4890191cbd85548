"""PESC: Parameter-Efficient Sparsity Crafting (dense model -> MoE whose experts are adapters / LoRAs).

Python API::

    from moecraft.pesc import CraftConfig, craft_model, save_artifact, load_artifact, export_model, generate
    model, tok = moecraft.models.load_model("tiny:llama")
    craft_model(model, CraftConfig(num_experts=8, top_k=2, adapter_dim=512))

Which kind exports to what: ``expert="lora"`` -> plain Mixtral checkpoint (Llama/Mistral bases) or
custom code; ``expert="adapter"`` -> checkpoint + ``modeling_pesc.py`` (``trust_remote_code=True``).
"""

from moecraft.pesc.config import CraftConfig
from moecraft.pesc.craft import (
    aux_loss,
    craft_model,
    expert_usage,
    load_artifact,
    load_base,
    mark_trainable,
    pesc_layers,
    save_artifact,
)
from moecraft.pesc.export import export_model
from moecraft.pesc.generate import generate

__all__ = [
    "CraftConfig", "aux_loss", "craft_model", "expert_usage", "export_model", "generate", "load_artifact",
    "load_base", "mark_trainable", "pesc_layers", "save_artifact",
]
