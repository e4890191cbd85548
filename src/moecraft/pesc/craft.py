"""Crafting a dense model into PESC, the load-balancing loss, and the saved artifact (save/load).

Artifact folder: ``pesc_weights.safetensors`` (routers, experts and base-LoRA weights only, under
their names in the crafted model), ``pesc_config.yaml`` (the :class:`CraftConfig`),
``base_fingerprint.json`` (:func:`moecraft.artifacts.base_fingerprint` of the dense base) and
``run_info.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moecraft.artifacts import base_fingerprint, check_base
from moecraft.config import dump_yaml, load_yaml
from moecraft.errors import MoecraftError
from moecraft.files import check_complete, fix_modes, read_json
from moecraft.pesc.arch import decoder_layers, dense_arch
from moecraft.pesc.config import CONFIG_FILE, FFN_PROJ, CraftConfig, base_lora_targets
from moecraft.pesc.layer import PescMoE

WEIGHTS = "pesc_weights.safetensors"
FINGERPRINT = "base_fingerprint.json"


def pesc_layers(model: nn.Module) -> list[tuple[int, PescMoE]]:
    """(decoder-layer index, PESC layer) of every crafted layer, in order."""
    return [(i, m) for i, layer in enumerate(decoder_layers(model)) for m in [getattr(layer, dense_arch(model).ffn_attr)]
            if isinstance(m, PescMoE)]


def _check(cfg: CraftConfig, n_layers: int) -> list[int]:
    if cfg.num_experts < 1 or not 1 <= cfg.top_k <= cfg.num_experts:
        raise MoecraftError(f"PESC needs 1 <= top_k ({cfg.top_k}) <= num_experts ({cfg.num_experts})")
    if cfg.adapter_dim < 1:
        raise MoecraftError(f"adapter_dim must be >= 1, got {cfg.adapter_dim}")
    layers = list(range(n_layers)) if cfg.layers is None else sorted(set(cfg.layers))
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise MoecraftError(f"layers {bad} out of range: the model has {n_layers} decoder layers")
    if cfg.expert == "lora" and cfg.lora_rank > 0:
        ffn_targets = set(FFN_PROJ) & set(base_lora_targets(cfg))
        if ffn_targets:
            raise MoecraftError(f"lora_targets {sorted(ffn_targets)}: the 'lora' expert kind already adapts the FFN")
    return layers


def craft_model(model: nn.Module, cfg: CraftConfig) -> nn.Module:
    """Turn ``model`` (in place) into a PESC MoE: every selected FFN becomes a :class:`PescMoE` that
    keeps the FFN module itself (no copy). Up/B matrices start at zero, so the output is unchanged."""
    arch = dense_arch(model)
    if pesc_layers(model):
        raise MoecraftError("model is already crafted (it has PESC layers)")
    layers = decoder_layers(model)
    selected = _check(cfg, len(layers))
    conf = model.config
    dtype = _param_dtype(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    for i in selected:
        ffn = getattr(layers[i], arch.ffn_attr)
        device = next(ffn.parameters()).device
        moe = PescMoE(
            ffn, conf.hidden_size, conf.intermediate_size, cfg.num_experts, cfg.top_k, cfg.adapter_dim, cfg.scaling,
            cfg.dropout, cfg.expert, arch.proj_names, arch.act_name, dtype=torch.float32, device="cpu",
        )
        moe.reset_parameters(gen)  # drawn in float32 on CPU so the init does not depend on device/dtype
        for name, p in list(moe.named_parameters()):
            if not name.startswith("ffn."):
                p.data = p.data.to(device=device, dtype=dtype)
        setattr(layers[i], arch.ffn_attr, moe)
    if cfg.lora_rank > 0:
        _inject_lora(model, cfg)
    model.train(model.training)  # new modules start in train mode; follow the model's mode
    model.pesc_config = cfg
    # the layers see only hidden states: hand them each forward's attention mask, so that padding never
    # counts in the load-balancing loss
    model.register_forward_pre_hook(_hand_token_mask, with_kwargs=True)
    return model


def _hand_token_mask(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a crafted model: set every PESC layer's ``token_mask`` to the real tokens of
    this forward (the last ``seq`` columns of a 2-D ``attention_mask``, which during cached generation
    also covers the past tokens), or None when there is no such mask (every token counts)."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    seq = ids.shape[-1] if ids is not None else embeds.shape[1] if embeds is not None else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or seq is None or mask.shape[1] < seq:
        mask = None  # no mask, or a 4-D / custom one: count every token
    else:
        mask = mask[:, -seq:]
    for _, layer in pesc_layers(model):
        layer.token_mask = mask


def _param_dtype(model: nn.Module) -> torch.dtype:
    # Quantised bases hold uint8 weights (and fp32 norms after k-bit preparation): experts/routers then
    # train in bf16, the QLoRA compute dtype.
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False):
        return torch.bfloat16
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.bfloat16


def _inject_lora(model: nn.Module, cfg: CraftConfig) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=base_lora_targets(cfg), bias="none")
    inject_adapter_in_model(lcfg, model)


def is_pesc_param(name: str) -> bool:
    """Routers, experts and base-LoRA tensors: what PESC trains and saves."""
    return ".router." in name or ".experts." in name or ".lora_A." in name or ".lora_B." in name


def mark_trainable(model: nn.Module) -> list[str]:
    """Freeze everything but routers, experts and LoRA; returns the trainable names."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(is_pesc_param(name) and p.is_floating_point())
        if p.requires_grad:
            names.append(name)
    return names


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean over crafted layers of the Switch loss E * sum_i f_i P_i of the last forward (unscaled), over
    its real tokens (``attention_mask`` != 0): Switch Transformer eq. 4, :func:`moecraft.pesc.layer.switch_loss`."""
    losses = [m.last_aux_loss for _, m in pesc_layers(model) if m.last_aux_loss is not None]
    return torch.stack(losses).mean() if losses else None  # already >= float32 (softmax of the routers)


def expert_usage(model: nn.Module) -> dict[int, list[float]]:
    """Per crafted layer, the fraction of token slots each expert got in the last forward."""
    return {i: m.last_usage.tolist() for i, m in pesc_layers(model) if m.last_usage is not None}


def save_artifact(model: nn.Module, out_dir: str | Path, cfg: CraftConfig | None = None, run_cfg=None) -> Path:
    """Write only the PESC tensors + crafting config + base fingerprint + run_info to ``out_dir``."""
    from moecraft.runinfo import write_run_info

    cfg = cfg or getattr(model, "pesc_config", None)
    if cfg is None or not pesc_layers(model):
        raise MoecraftError("model is not a PESC model (craft it first)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if is_pesc_param(n)}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "moecraft-pesc"})
    (out / CONFIG_FILE).write_text(dump_yaml(cfg))
    (out / FINGERPRINT).write_text(json.dumps(base_fingerprint(model), indent=2) + "\n")
    write_run_info(out, run_cfg if run_cfg is not None else cfg)
    fix_modes(out)  # safetensors writes 0600: files as the umask says
    return out


def read_config(artifact_dir: str | Path) -> CraftConfig:
    path = Path(artifact_dir) / CONFIG_FILE
    if not Path(artifact_dir).is_dir():
        raise MoecraftError(f"artifact folder not found: {artifact_dir}")
    check_complete(artifact_dir)
    if not path.is_file():
        raise MoecraftError(f"{artifact_dir} is not a PESC artifact (no {CONFIG_FILE})")
    return load_yaml(CraftConfig, path)


def load_artifact(base_model: nn.Module, artifact_dir: str | Path) -> nn.Module:
    """Craft ``base_model`` with the saved config and load the saved PESC tensors onto it."""
    artifact = Path(artifact_dir)
    cfg = read_config(artifact)
    fp_path = artifact / FINGERPRINT
    if fp_path.is_file():
        check_base(read_json(fp_path, "base fingerprint"), base_model, str(artifact), cfg.model)
    weights = artifact / WEIGHTS
    if not weights.is_file():
        raise MoecraftError(f"{artifact}: missing {WEIGHTS}")
    craft_model(base_model, cfg)
    tensors = load_file(str(weights))
    params = dict(base_model.named_parameters())
    expected = {n for n in params if is_pesc_param(n)}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
        raise MoecraftError(f"{weights}: tensors do not match the crafted model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for n, t in tensors.items():
            if params[n].shape != t.shape:
                raise MoecraftError(f"{weights}: {n} has shape {tuple(t.shape)}, model expects {tuple(params[n].shape)}")
            params[n].copy_(t)
    return base_model


def load_base(cfg: CraftConfig, device: str | None = None):
    """Dense base + tokenizer: 4-bit NF4 (double quantisation, bf16 compute) when ``cfg.quantize`` asks for
    it and CUDA + bitsandbytes are present, else ``cfg.dtype``."""
    from moecraft.models import load_model, load_tokenizer, resolve_dtype

    want_nf4 = cfg.quantize == "nf4" or (cfg.quantize == "auto" and qlora_available())
    if cfg.quantize == "nf4" and not qlora_available():
        raise MoecraftError("quantize=nf4 needs CUDA and the bitsandbytes package; use quantize=none")
    if want_nf4 and not cfg.model.startswith("tiny:"):
        import tempfile

        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from moecraft.models import gguf_file, load_gguf

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        with tempfile.TemporaryDirectory(prefix="moecraft-gguf-") as tmp:
            source = cfg.model
            if gguf_file(cfg.model) is not None:
                # bitsandbytes quantises while loading a folder: write the dequantized GGUF weights as one first
                dense, tok = load_gguf(gguf_file(cfg.model), dtype=torch.bfloat16)
                dense.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                del dense
                source = tmp
            model = AutoModelForCausalLM.from_pretrained(source, quantization_config=bnb, dtype=torch.bfloat16,
                                                         device_map={"": 0})
            return model, load_tokenizer(source)
    dtype = cfg.dtype
    if dtype == "auto" and torch.cuda.is_available():
        dtype = "bf16"
    model, tok = load_model(cfg.model, dtype=resolve_dtype(dtype), device=device or "cpu", seed=cfg.seed)
    return model, tok


def qlora_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True
