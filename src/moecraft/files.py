"""Small file helpers: JSON for score, expert-config and artifact files; output-path checks; file hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moecraft.errors import MoecraftError


class _RepeatedKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object, refusing a key given twice (``json`` would keep the last one silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        repeated = sorted({k for k, _ in pairs if sum(1 for k2, _ in pairs if k2 == k) > 1})
        raise _RepeatedKey(f"key {repeated[0]!r} appears more than once")
    return out


def read_json(path: str | Path, what: str) -> dict:
    """The JSON object in ``path``; a missing file or bad JSON is a MoecraftError naming ``what`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise MoecraftError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError, _RepeatedKey) as exc:
        raise MoecraftError(f"{path}: not a valid JSON {what} ({exc})") from exc
    except RecursionError:
        raise MoecraftError(f"{path}: not a valid JSON {what} (nested too deeply)") from None
    if not isinstance(data, dict):
        raise MoecraftError(f"{path}: not a {what} (expected a JSON object)")
    return data


def write_json(path: str | Path, data: dict) -> Path:
    """Write ``data`` as readable UTF-8 JSON, creating parent folders. Floats keep their exact value."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def check_output_file(path: str | Path, option: str) -> None:
    """Fail before any work when an output file path is an existing folder (it could not be written later)."""
    if Path(path).is_dir():
        raise MoecraftError(f"{option} {path} is a folder; give a file path")


def check_output_folder(path: str | Path, option: str) -> None:
    """Fail before any work when an output folder path is an existing file."""
    if Path(path).exists() and not Path(path).is_dir():
        raise MoecraftError(f"{option} {path} is an existing file; give a folder path")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
