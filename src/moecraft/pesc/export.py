"""Exporting a PESC model as a self-contained checkpoint that ``AutoModelForCausalLM`` loads.

* ``lora`` expert kind -> ``mixtral``: a plain Mixtral checkpoint (``MixtralForCausalLM``, no custom code;
  vLLM and stock transformers load it). Expert e of layer l is the FFN with its LoRA deltas merged,
  W + s B_e A_e, written to ``experts.gate_up_proj`` [E, 2I, H] (gate rows, then up) and
  ``experts.down_proj`` [E, H, I]; the router goes to ``gate.weight`` [E, H]. Mixtral's routing (top-k of
  the softmax, renormalised) equals PESC's (softmax over the top-k logits). Un-crafted layers become E
  copies of the FFN behind a zero router. Needs a Llama/Mistral base (no attention biases or q/k norms).
* ``adapter`` kind (and ``lora`` on any base) -> ``custom``: the crafted model's own weights, with a
  ``modeling_pesc.py`` written beside them (``trust_remote_code=True``): the dense architecture's class
  with its FFNs replaced by :class:`moecraft.pesc.layer.PescMoE` (whose source the file embeds).

Base-model LoRA (attention) is merged into the base weights in both formats.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import nn

from moecraft.errors import MoecraftError
from moecraft.hf_folder import write_legacy_config, write_tokenizer
from moecraft.pesc import layer as layer_module
from moecraft.pesc.arch import decoder_layers, dense_arch
from moecraft.pesc.craft import pesc_layers
from moecraft.pesc.layer import PescMoE

Format = Literal["auto", "mixtral", "custom"]


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The crafted model's tensors with base-model (peft) LoRA merged: W + scaling * B A under the
    original names, no ``lora_*`` or ``base_layer`` keys."""
    from peft.tuners.lora import LoraLayer

    sd = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = base.weight.detach()
            for adapter in module.lora_A:
                weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            sd[f"{name}.base_layer.weight"] = weight
    out = {}
    for key, t in sd.items():
        if ".lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = t.detach()
    return out


def _untie(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; tied lm_head is rebuilt from the embeddings on load.
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return {k: v.contiguous().cpu().clone() for k, v in sd.items()}


def export_model(model: nn.Module, out_dir: str | Path, fmt: Format = "auto", tokenizer=None,
                 base: str | None = None) -> Path:
    """Write ``model`` (crafted, trained) to ``out_dir`` in ``fmt`` (see module docstring).

    The config carries the transformers-4 keys beside the 5.x ones, and the tokenizer files are the base's
    own (``base``: its name or folder) where they are local (:mod:`moecraft.hf_folder`).
    """
    layers = pesc_layers(model)
    if not layers:
        raise MoecraftError("model is not a PESC model (craft it or load an artifact first)")
    kind = layers[0][1].expert_kind
    if fmt == "auto":
        fmt = "mixtral" if kind == "lora" and dense_arch(model).mixtral_ok else "custom"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "mixtral":
        _export_mixtral(model, out)
    elif fmt == "custom":
        _export_custom(model, out)
    else:
        raise MoecraftError(f"unknown export format {fmt!r}; choose auto, mixtral or custom")
    write_legacy_config(out)
    write_tokenizer(tokenizer, out, base)
    from moecraft.files import fix_modes

    fix_modes(out)  # safetensors writes 0600: files as the umask says
    return out


def _export_mixtral(model: nn.Module, out: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = model.config
    layers = pesc_layers(model)
    if layers[0][1].expert_kind != "lora":
        raise MoecraftError("only the 'lora' expert kind exports to Mixtral; use format 'custom' for adapters")
    if not dense_arch(model).mixtral_ok or getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise MoecraftError(f"a {cfg.model_type} base does not fit the Mixtral layout (biases/norms); use format 'custom'")
    moe = layers[0][1]
    mcfg = MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=getattr(cfg, "head_dim", None),
        hidden_act=cfg.hidden_act, max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=getattr(cfg, "rope_parameters", None), tie_word_embeddings=cfg.tie_word_embeddings,
        sliding_window=getattr(cfg, "sliding_window", None), attention_dropout=cfg.attention_dropout,
        num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k, router_jitter_noise=0.0,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )
    sd = merged_state_dict(model)
    arch = dense_arch(model)
    crafted = dict(layers)
    new: dict[str, torch.Tensor] = {k: v for k, v in sd.items() if ".mlp." not in k}
    for i in range(len(decoder_layers(model))):
        p = f"model.layers.{i}.mlp"
        if i in crafted:
            m = crafted[i]
            ffn_prefix = f"{p}.ffn"
        else:
            m = None
            ffn_prefix = p
        gw, uw, dw = (sd[f"{ffn_prefix}.{n}.weight"] for n in arch.proj_names)
        e = moe.num_experts
        if m is None:
            gate_up = torch.cat([gw, uw]).unsqueeze(0).expand(e, -1, -1)
            down = dw.unsqueeze(0).expand(e, -1, -1)
            router = torch.zeros(e, cfg.hidden_size, dtype=gw.dtype)
        else:
            ex, s, r = m.experts, m.scaling, m.rank
            g = gw.float() + _delta(ex.gate_up_A[:, :, :r], ex.gate_B, s)
            u = uw.float() + _delta(ex.gate_up_A[:, :, r:], ex.up_B, s)
            gate_up = torch.cat([g, u], dim=1).to(gw.dtype)
            down = (dw.float() + _delta(ex.down_A, ex.down_B, s)).to(dw.dtype)
            router = m.router.weight
        new[f"{p}.gate.weight"] = router.detach()
        new[f"{p}.experts.gate_up_proj"] = gate_up.detach()
        new[f"{p}.experts.down_proj"] = down.detach()
    target = MixtralForCausalLM(mcfg).to(_dtype(model))
    missing, unexpected = target.load_state_dict(new, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and mcfg.tie_word_embeddings)]
    if missing or unexpected:
        raise MoecraftError(f"Mixtral export: missing {missing[:4]}, unexpected {unexpected[:4]}")
    target.save_pretrained(out, save_original_format=True)


def _delta(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """Per-expert LoRA delta as nn.Linear weights [E, out, in]: s * (A_t @ B_t).T, in float32."""
    return s * torch.bmm(a.detach().float(), b.detach().float()).transpose(1, 2)


def _dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


_TEMPLATE = '''

# ---- generated by moecraft.pesc.export: the dense class with PESC layers in place of its FFNs ----
from transformers import {config_cls}, {model_cls}


class Pesc{config_cls}({config_cls}):
    model_type = "pesc_{model_type}"

    def __init__(self, pesc=None, **kwargs):
        self.pesc = pesc or {{}}
        super().__init__(**kwargs)


class Pesc{model_cls}({model_cls}):
    config_class = Pesc{config_cls}

    def __init__(self, config):
        super().__init__(config)
        p = config.pesc
        for i in p["layers"]:
            layer = self.model.layers[i]
            layer.{ffn_attr} = PescMoE(
                layer.{ffn_attr}, config.hidden_size, config.intermediate_size, p["num_experts"], p["top_k"],
                p["rank"], p["scaling"], 0.0, p["expert"], tuple(p["proj_names"]), p["act_name"],
            )
'''


def _export_custom(model: nn.Module, out: Path) -> None:
    arch = dense_arch(model)
    layers = pesc_layers(model)
    moe: PescMoE = layers[0][1]
    model_cls = type(model).__name__
    config_cls = type(model.config).__name__
    mt = model.config.model_type
    source = inspect.getsource(layer_module) + _TEMPLATE.format(
        config_cls=config_cls, model_cls=model_cls, model_type=mt, ffn_attr=arch.ffn_attr
    )
    (out / "modeling_pesc.py").write_text(source)
    cfg = model.config.to_dict()
    cfg.update(
        model_type=f"pesc_{mt}",
        architectures=[f"Pesc{model_cls}"],
        auto_map={"AutoConfig": f"modeling_pesc.Pesc{config_cls}",
                  "AutoModelForCausalLM": f"modeling_pesc.Pesc{model_cls}"},
        pesc={"layers": [i for i, _ in layers], "num_experts": moe.num_experts, "top_k": moe.top_k,
              "rank": moe.rank, "scaling": moe.scaling, "expert": moe.expert_kind,
              "proj_names": list(moe.proj_names), "act_name": moe.act_name},
    )
    cfg.pop("dtype", None)
    cfg["dtype"] = str(_dtype(model)).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(_untie(merged_state_dict(model), model), str(out / "model.safetensors"), metadata={"format": "pt"})
