"""PESC: Parameter-Efficient Sparsity Crafting (dense model -> MoE whose experts are adapters / LoRAs).

Python API::

    from moecraft.pesc import CraftConfig, craft_model, save_artifact, load_artifact, export_model, generate
    model, tok = moecraft.models.load_model("tiny:llama")
    craft_model(model, CraftConfig(num_experts=8, top_k=2, adapter_dim=512))

Which kind exports to what: ``expert="lora"`` -> plain Mixtral checkpoint (Llama/Mistral bases) or
custom code; ``expert="adapter"`` -> checkpoint + ``modeling_pesc.py`` (``trust_remote_code=True``).

The names are imported on first use: :mod:`moecraft.pesc.config` (the CLI's options) stays light to import.
(``generate`` lives in :mod:`moecraft.pesc.generation`, so that no submodule shadows the function.)
"""

from moecraft.lazy import lazy_exports

_EXPORTS = {
    "moecraft.pesc.config": ["CraftConfig"],
    "moecraft.pesc.craft": ["aux_loss", "craft_model", "expert_usage", "load_artifact", "load_base", "mark_trainable",
                            "pesc_layers", "save_artifact"],
    "moecraft.pesc.export": ["export_model"],
    "moecraft.pesc.generation": ["generate"],
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(name for names in _EXPORTS.values() for name in names)
