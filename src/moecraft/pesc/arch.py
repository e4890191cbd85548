"""Where the FFN lives in each supported dense architecture: the only per-architecture knowledge of PESC."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moecraft.errors import UnsupportedModelError


@dataclass(frozen=True)
class DenseArch:
    layers_path: str = "model.layers"  # decoder layers, from the *ForCausalLM
    ffn_attr: str = "mlp"
    proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    act_name: str = "act_fn"
    mixtral_ok: bool = True  # exportable to Mixtral (no attention biases, no q/k norms, Mixtral-style layer)


_LLAMA = DenseArch()
ARCHS: dict[str, DenseArch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": DenseArch(mixtral_ok=False),  # q/k/v biases
    "qwen3": DenseArch(mixtral_ok=False),  # q/k RMSNorm
    "gemma": DenseArch(mixtral_ok=False),  # (1 + w) norms, scaled embeddings
    "gemma2": DenseArch(mixtral_ok=False),
    "gemma3_text": DenseArch(mixtral_ok=False),
}


def dense_arch(model: nn.Module) -> DenseArch:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHS:
        raise UnsupportedModelError(
            f"PESC crafts dense models of types {sorted(ARCHS)}; got model_type={model_type!r}"
        )
    return ARCHS[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(dense_arch(model).layers_path)
