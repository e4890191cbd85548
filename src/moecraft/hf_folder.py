"""Writing a model folder that every consumer reads: transformers 4.x and 5.x, vLLM/SGLang, llama.cpp converters.

transformers 5 saves a config in its own form (``rope_parameters`` instead of ``rope_theta``/``rope_scaling``,
``dtype`` instead of ``torch_dtype``, ``num_local_experts`` for Qwen3-MoE) and re-saves tokenizers under its
own class names. Older readers then load something else without a word: transformers 4.57 drops DeepSeek-V2's
YaRN scaling, cannot build the tokenizer, and sizes Qwen3-MoE's router wrongly. So a merged checkpoint is
written as the base was, with only the weights changed:

- weights in the base's original key layout (``save_original_format=True``, asked for explicitly: per-expert
  keys where the hub checkpoint has them), so vLLM/SGLang loaders find the names they expect;
- the base's own ``config.json`` and ``generation_config.json``, byte for byte, when the base is a folder
  (or a hub id whose files are in the local cache); otherwise transformers' config plus the legacy keys
  (:func:`add_legacy_keys`), so 4.x and 5.x read the same model;
- the base's remote-code files (``*.py`` named by ``auto_map``) and its tokenizer files, byte for byte.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moecraft.errors import MoecraftError

# files that define the tokenizer (sentencepiece, BPE, chat template); copied as they are
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
)
CONFIG_FILES = ("config.json", "generation_config.json")

# transformers-5 config key -> the key transformers 4.x (and llama.cpp's converters) read, per model type
_EXPERT_COUNT_KEYS = {"qwen3_moe": "num_experts", "qwen2_moe": "num_experts", "olmoe": "num_experts",
                      "mixtral": "num_local_experts", "gpt_oss": "num_local_experts"}


def base_folder(name_or_path: str) -> Path | None:
    """The local folder holding the base's original files: the path itself, or the hub cache's snapshot of a
    hub id (no download: only what is cached). ``None`` for built-in tiny models or uncached ids."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path if (path / "config.json").is_file() else None
    if path.suffix == ".gguf" or name_or_path.startswith("tiny:"):
        return None
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # noqa: BLE001 - not a hub id, or not cached: fall back to transformers' own files
        return None
    return cached if (cached / "config.json").is_file() else None


def add_legacy_keys(config: dict) -> dict:
    """``config`` (a transformers-5 ``config.json`` dict) with the transformers-4 keys added beside the new ones.

    Adds ``torch_dtype`` from ``dtype``, ``rope_theta`` and ``rope_scaling`` from ``rope_parameters`` (the
    scaling entry in 4.x form, ``type`` and ``rope_type`` both set) and the expert count under the name 4.x
    reads for the model type. Existing keys are never changed.
    """
    out = dict(config)
    if "dtype" in out and "torch_dtype" not in out:
        out["torch_dtype"] = out["dtype"]
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "full_attention" in rope and isinstance(rope["full_attention"], dict):
        rope = rope["full_attention"]  # per-layer-type parameters: 4.x has one global entry
    if isinstance(rope, dict):
        if "rope_theta" in rope and "rope_theta" not in out:
            out["rope_theta"] = rope["rope_theta"]
        kind = rope.get("rope_type", "default")
        if kind != "default" and "rope_scaling" not in out:
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            scaling["type"] = kind
            out["rope_scaling"] = scaling
    key = _EXPERT_COUNT_KEYS.get(out.get("model_type", ""))
    if key and key not in out:
        count = out.get("num_local_experts", out.get("num_experts"))
        if count is not None:
            out[key] = count
    return out


def _copy_tokenizer_files(base: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
            copied.append(name)
    return copied


def _copy_config_and_code(base: Path, out: Path) -> list[str]:
    """The base's config, generation config and (when ``auto_map`` names them) remote-code modules.

    Remote code is every top-level ``*.py`` of the base: its modules are named in ``auto_map`` and may
    import each other.
    """
    copied = []
    for name in CONFIG_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
            copied.append(name)
    try:
        config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MoecraftError(f"{base / 'config.json'}: not a readable JSON config ({exc})") from exc
    if isinstance(config, dict) and config.get("auto_map"):
        for src in sorted(base.glob("*.py")):
            shutil.copyfile(src, out / src.name)
            copied.append(src.name)
    return copied


def write_legacy_config(out: Path) -> None:
    """Rewrite ``out/config.json`` (as transformers 5 wrote it) with the transformers-4 keys added."""
    path = Path(out) / "config.json"
    path.write_text(json.dumps(add_legacy_keys(json.loads(path.read_text(encoding="utf-8"))), indent=2) + "\n")


def write_tokenizer(tokenizer, out: str | Path, base: str | None = None) -> list[str]:
    """The base's tokenizer files copied byte for byte when they are local; else ``tokenizer`` saved by
    transformers, with the class name that transformers 4.x also knows. Returns the names copied."""
    return _write_tokenizer(tokenizer, Path(out), base_folder(base) if base else None)


def _write_tokenizer(tokenizer, out: Path, folder: Path | None) -> list[str]:
    if folder is not None and (folder / "tokenizer_config.json").is_file():
        return _copy_tokenizer_files(folder, out)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        path = out / "tokenizer_config.json"
        if path.is_file():  # 5.x names its generic fast tokenizer TokenizersBackend, which 4.x cannot import
            cfg = json.loads(path.read_text(encoding="utf-8"))
            if cfg.get("tokenizer_class") == "TokenizersBackend":
                cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
                path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return []


def save_model_folder(model, tokenizer, out: str | Path, base: str | None = None) -> list[str]:
    """Write ``model`` (weights in the base's original key layout) and what loads it into ``out``.

    With a ``base`` whose files are local (:func:`base_folder`), its config, tokenizer and remote-code files
    are copied byte for byte (the merged weights have the base's names and shapes, so its config describes
    them). Otherwise transformers' files are written, the config with :func:`add_legacy_keys`. Returns the
    names of the files taken from the base (empty when none).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), save_original_format=True)
    folder = base_folder(base) if base else None  # looked up once: a hub id means a cache search
    copied = _write_tokenizer(tokenizer, out, folder)
    if folder is not None:
        for name in CONFIG_FILES:  # transformers' own, written just now, give way to the base's
            (out / name).unlink(missing_ok=True)
        copied += _copy_config_and_code(folder, out)
        if not (out / "generation_config.json").is_file() and hasattr(model, "generation_config"):
            model.generation_config.save_pretrained(str(out))
    else:
        write_legacy_config(out)
    return copied
