"""Training artifacts: only the trained tensors, a manifest naming the base model, load and merge.

Layout of a run folder (``moecraft train --out run/``)::

    run/artifact.json        manifest: format, method, base model name + fingerprint, sizes, files
    run/trained.safetensors  ESFT / FFT: trained tensors under the base model's state-dict names
    run/adapter/             LoRA: the peft adapter folder
    run/expert_config.json   ESFT: the expert config used
    run/train_config.yaml, run/run_info.json, run/metrics.jsonl

ESFT tensors of routed experts are row slices of the fused base tensor: ``model.layers.1.mlp.experts.gate_up_proj``
holds only the selected experts [S, ...]; which rows they are is recorded in the safetensors metadata
(``expert_rows``: tensor name -> expert ids, in row order). Any other tensor is a full replacement.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moecraft.errors import MoecraftError
from moecraft.pesc.config import CONFIG_FILE as PESC_CONFIG

FORMAT = "moecraft.artifact/1"
MANIFEST = "artifact.json"
TENSORS = "trained.safetensors"


# ----------------------------------------------------------------------------- base identity
def weights_hash(model: nn.Module) -> str:
    """Hash of the input embedding (first 64 rows) and every router weight, rounded to bf16.

    Cheap even for large models, and tells apart two bases with the same config but different weights
    (fp32 and bf16 copies of the same checkpoint hash alike).
    """
    h = hashlib.sha256()
    tensors = [model.get_input_embeddings().weight]
    try:
        from moecraft.families import moe_layers

        tensors += [layer.router.weight for layer in moe_layers(model)]
    except MoecraftError:
        pass  # dense model (PESC, LoRA on llama): the embedding alone
    for i, t in enumerate(tensors):
        if hasattr(t, "full_tensor"):  # a sharded load (FSDP2 DTensor): collective, every process hashes
            t = t.full_tensor()
        t = t[:64] if i == 0 else t
        h.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def base_fingerprint(model: nn.Module) -> dict:
    from moecraft.models import model_fingerprint

    fp = model_fingerprint(model)
    fp["weights_hash"] = weights_hash(model)
    fp["num_parameters"] = sum(p.numel() for p in model.parameters())
    return fp


def check_base(expected: dict, model: nn.Module, where: str, base_name: str | None = None) -> None:
    """Raise a clear error when ``model`` is not the base the artifact was trained on.

    ``base_name`` (the model id the artifact records) is named in the message when given.
    """
    got = base_fingerprint(model)
    for key, what in (("model_type", "family"), ("config_hash", "config"), ("weights_hash", "weights")):
        if key == "config_hash" and "config" not in expected:
            continue  # written before the hash left out load-time entries (dtype, path): not comparable
        if key in expected and expected[key] != got[key]:
            detail = f"artifact was trained on {expected.get(key)!r}, this base has {got[key]!r}"
            if key == "config_hash" and isinstance(expected.get("config"), dict):
                old, new = expected["config"], got["config"]
                diff = [f"{k}: {old.get(k)!r} vs {new.get(k)!r}" for k in sorted(set(old) | set(new))
                        if old.get(k) != new.get(k)]
                detail = "artifact's base vs this base: " + "; ".join(diff[:6]) + ("; ..." * (len(diff) > 6))
            raise MoecraftError(
                f"{where}: wrong base model ({what} mismatch: {detail}; "
                f"artifact base: {base_name or expected.get('name_or_path') or '?'})"
            )


# ----------------------------------------------------------------------------- tensors
def save_tensors(path: Path, tensors: dict[str, torch.Tensor], expert_rows: dict[str, list[int]] | None = None) -> int:
    """Write tensors (+ ``expert_rows`` metadata) as safetensors; returns the file size in bytes."""
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {"format": FORMAT, "expert_rows": json.dumps(expert_rows or {})}
    tmp = path.with_suffix(".tmp")
    save_file(plain, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path.stat().st_size


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The tensors of an artifact file and their checked ``expert_rows``; any problem names the file."""
    if not path.is_file():
        raise MoecraftError(f"artifact tensors not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
        raise MoecraftError(f"{path}: not a readable safetensors file ({exc})") from exc
    return tensors, _checked_rows(path, meta.get("expert_rows", "{}"), tensors)


def _checked_rows(path: Path, text: str, tensors: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """``expert_rows`` metadata: tensor name -> the expert ids of its rows, in row order. Each id list must
    be non-negative unique ints, one per row of a tensor the file holds (the upper bound, the base's expert
    count, is checked by :func:`apply_tensors`). A bad row would write trained weights into other experts."""
    try:
        rows = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise MoecraftError(f"{path}: damaged 'expert_rows' metadata (not JSON: {exc})") from None
    if not isinstance(rows, dict):
        raise MoecraftError(f"{path}: damaged 'expert_rows' metadata (expected tensor name -> expert ids, "
                            f"got {type(rows).__name__})")
    for name, ids in rows.items():
        if name not in tensors:
            raise MoecraftError(f"{path}: 'expert_rows' names tensor '{name}', which the file does not hold")
        if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise MoecraftError(f"{path}: expert rows of '{name}' must be non-negative integers, got {str(ids)[:80]}")
        if len(set(ids)) != len(ids):
            raise MoecraftError(f"{path}: expert rows of '{name}' repeat an expert: {ids}")
        shape = tuple(tensors[name].shape)
        if not shape or shape[0] != len(ids):
            raise MoecraftError(f"{path}: '{name}' of shape {shape} does not have one row per expert id {ids}")
    return rows


@torch.no_grad()
def apply_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], expert_rows: dict[str, list[int]],
                  where: str) -> None:
    """Write trained tensors into ``model`` in place (rows of fused expert tensors, or whole tensors)."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    for name, t in tensors.items():
        if name not in params:
            raise MoecraftError(f"{where}: tensor '{name}' does not exist in the base model (wrong base?)")
        target = params[name]
        if name in expert_rows:
            rows = torch.tensor(expert_rows[name], dtype=torch.long)
            if rows.numel() and (int(rows.max()) >= target.shape[0] or tuple(t.shape[1:]) != tuple(target.shape[1:])
                                 or t.shape[0] != rows.numel()):
                raise MoecraftError(f"{where}: '{name}' of shape {tuple(t.shape)} (experts {rows.tolist()}) does not "
                                    f"fit the base tensor of shape {tuple(target.shape)} (wrong base?)")
            target[rows.to(target.device)] = t.to(target.device, target.dtype)
        else:
            if tuple(t.shape) != tuple(target.shape):
                raise MoecraftError(f"{where}: '{name}' has shape {tuple(t.shape)}, the base has "
                                    f"{tuple(target.shape)} (wrong base?)")
            target.copy_(t.to(target.device, target.dtype))


# ----------------------------------------------------------------------------- manifest
def write_manifest(out_dir: Path, *, method: str, base: str, fingerprint: dict, extra: dict | None = None) -> dict:
    out_dir = Path(out_dir)
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file() and _is_artifact_file(out_dir, p))
    base_bytes = fingerprint.get("base_bytes")
    manifest = {"format": FORMAT, "method": method, "base": base, "fingerprint": fingerprint,
                "artifact_bytes": size, "base_bytes": base_bytes,
                "size_ratio": (size / base_bytes) if base_bytes else None, **(extra or {})}
    from moecraft.files import write_text

    write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # atomic: written last, marks a whole artifact
    return manifest


def _is_artifact_file(root: Path, p: Path) -> bool:
    """Trained weights: top-level safetensors (ESFT/FFT ``trained``, PESC ``pesc_weights``) or peft's adapter/."""
    rel = p.relative_to(root).parts
    return (len(rel) == 1 and p.suffix == ".safetensors") or rel[0] == "adapter"


def read_manifest(artifact_dir: str | Path) -> dict:
    """The checked ``artifact.json`` of a training output; a missing folder or bad manifest: MoecraftError."""
    from moecraft.files import check_complete, read_json

    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        raise MoecraftError(f"artifact folder not found: {artifact_dir}")
    check_complete(artifact_dir)
    path = artifact_dir / MANIFEST
    if not path.is_file():
        hint = ""
        if (artifact_dir / "pesc_config.yaml").is_file():
            hint = " (a PESC artifact from `moecraft craft`: use `moecraft export`)"
        raise MoecraftError(f"{artifact_dir} is not a moecraft training output (no {MANIFEST}){hint}")
    manifest = read_json(path, "artifact manifest")
    if manifest.get("format") != FORMAT:
        raise MoecraftError(f"{path}: unknown artifact format {manifest.get('format')!r} (expected {FORMAT})")
    kinds = {"method": str, "base": str, "fingerprint": dict}
    bad = [k for k, kind in kinds.items() if not isinstance(manifest.get(k), kind) or manifest[k] == ""]
    if bad:
        raise MoecraftError(f"{path}: incomplete artifact manifest (missing or malformed: {bad})")
    return manifest


def load_artifact(base_model: nn.Module, artifact_dir: str | Path) -> nn.Module:
    """Put any moecraft artifact onto ``base_model`` (unmerged for adapters); wrong base -> MoecraftError.

    A training output names its method and base in ``artifact.json``; a PESC artifact written by
    ``moecraft craft`` (no training yet) has its own config and base fingerprint, checked by PESC.
    """
    from moecraft.files import check_complete
    from moecraft.methods import get_method

    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        raise MoecraftError(f"artifact folder not found: {artifact_dir}")
    check_complete(artifact_dir)
    if not (artifact_dir / MANIFEST).is_file() and (artifact_dir / PESC_CONFIG).is_file():
        return get_method("pesc").load(base_model, artifact_dir)
    manifest = read_manifest(artifact_dir)
    check_base(manifest["fingerprint"], base_model, str(artifact_dir), manifest.get("base"))
    return get_method(manifest["method"]).load(base_model, artifact_dir)


def merge_artifact(base_model: nn.Module, artifact_dir: str | Path) -> nn.Module:
    """Base + artifact as one plain model of the base's class (adapters merged into the weights)."""
    from moecraft.methods import get_method

    model = load_artifact(base_model, artifact_dir)
    method = get_method(read_manifest(artifact_dir)["method"])
    merge = getattr(method, "merge", None)
    if merge is not None:
        return merge(model)
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
