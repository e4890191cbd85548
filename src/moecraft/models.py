"""Loading models and tokenizers: hub ids, local folders, and built-in tiny random models.

``tiny:<family>`` (e.g. ``tiny:deepseek_v2``, ``tiny:llama``) builds a small random-weight model of the
real transformers class, with a byte-level tokenizer, so that every command runs offline. Anything else
is passed to ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from moecraft.errors import MoecraftError

TINY_PREFIX = "tiny:"

# A simple, explicit chat format (the ESFT eval prompts use the same "User: ...\n\nAssistant:" style).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + bos/eos/pad), so any text, Chinese included, is covered."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(sorted(alphabet))}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>", model_max_length=4096
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _dense_tiny_configs():
    common = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    return {
        "llama": lambda v: LlamaConfig(vocab_size=v, **common),
        "mistral": lambda v: MistralConfig(vocab_size=v, **common),
        "qwen2": lambda v: Qwen2Config(vocab_size=v, **common),
        "qwen3": lambda v: Qwen3Config(vocab_size=v, head_dim=16, **common),
    }


def tiny_config(kind: str, vocab_size: int = 320):
    """Config of a tiny random model: any MoE family name, or a dense ``llama``/``mistral``/``qwen2``."""
    from moecraft.families import FAMILIES

    if kind in FAMILIES:
        return FAMILIES[kind].tiny_config(vocab_size=vocab_size)
    dense = _dense_tiny_configs()
    if kind in dense:
        return dense[kind](vocab_size)
    raise MoecraftError(f"unknown tiny model '{kind}'; choose from {sorted([*FAMILIES, *dense])}")


def tiny_model(kind: str, seed: int = 0, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """A tiny random-weight model of the real transformers class for ``kind`` (deterministic in ``seed``)."""
    tokenizer = tokenizer or byte_tokenizer()
    config = tiny_config(kind, vocab_size=len(tokenizer))
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _randomise_routers(model, seed)
    return model.eval()


def _randomise_routers(model: PreTrainedModel, seed: int) -> None:
    """Some families initialise router weights/biases to zero; a random model needs them random to route."""
    from moecraft.families import FAMILIES, get_family

    if model.config.model_type not in {mt for f in FAMILIES.values() for mt in f.model_types}:
        return
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in get_family(model).moe_layers(model):
        with torch.no_grad():
            w = layer.router.weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.5 / w.shape[1] ** 0.5)
            for name in ("bias", "e_score_correction_bias"):
                b = getattr(layer.router, name, None)
                if isinstance(b, torch.Tensor):
                    b.copy_(torch.randn(b.shape, generator=gen) * 0.1)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    if name_or_path.startswith(TINY_PREFIX):
        return byte_tokenizer()
    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def load_model(
    name_or_path: str, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu", seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer from ``tiny:<kind>``, a local folder or a hub id."""
    if name_or_path.startswith(TINY_PREFIX):
        tokenizer = byte_tokenizer()
        model = tiny_model(name_or_path[len(TINY_PREFIX) :], seed=seed, tokenizer=tokenizer)
        return model.to(device).eval(), tokenizer
    path = Path(name_or_path)
    if path.exists() and not (path / "config.json").is_file():
        raise MoecraftError(f"{path} is not a model folder (no config.json)")
    try:
        AutoConfig.from_pretrained(name_or_path)  # fails early, before the weights, on a bad id or path
        tokenizer = load_tokenizer(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype))
    except OSError as exc:
        raise MoecraftError(
            f"could not load model '{name_or_path}': not a local model folder, and the hub has no such model or "
            f"cannot be reached ({str(exc).splitlines()[0]}). Use a local folder, or tiny:<family> to try offline."
        ) from exc
    return model.to(device).eval(), tokenizer


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
    if dtype not in table:
        raise MoecraftError(f"unknown dtype '{dtype}'; choose from {sorted(table)} or 'auto'")
    return table[dtype]


def model_fingerprint(model: PreTrainedModel) -> dict:
    """Identity of a base model, written beside artifacts so loading onto the wrong base fails clearly."""
    cfg = model.config.to_dict()
    keep = {k: cfg[k] for k in sorted(cfg) if isinstance(cfg[k], (int, float, str, bool)) and "token_id" not in k}
    return {"model_type": model.config.model_type, "architecture": type(model).__name__,
            "config_hash": _stable_hash(keep), "name_or_path": getattr(model.config, "_name_or_path", "")}


def _stable_hash(obj) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
