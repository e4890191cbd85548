"""Atomic, verified training checkpoints for ``--resume``, on one process or many (DDP, FSDP2).

``<out>/checkpoint/`` holds ``trainable.safetensors`` (the trainable tensors, full, by name: they load on
one device whatever engine wrote them), ``optimizer.pt`` (the full optimiser state keyed by parameter
name), ``state.pt`` (step, scheduler, run settings), ``rng-<rank>.pt`` (each process's RNG) and, written
last, ``manifest.json`` with the size and sha256 of every other file.

Writing: everything goes to ``checkpoint.tmp``, each file is fsynced, then the folder is renamed over
``checkpoint`` (the previous one waits as ``checkpoint.old`` until the rename is done). A run killed at
any moment therefore leaves a complete checkpoint behind; a folder that fails its manifest (partial copy,
bit rot, a hand edit) is reported and never loaded.

Under ESFT's expert parallelism each process holds other experts, so each writes its own optimiser state
(``optimizer-<rank>.pt``); ``trainable.safetensors`` still holds every trained expert, as one process would.

DeepSpeed keeps its optimiser partitioned inside its engine, so under DeepSpeed the optimiser part is the
engine's own checkpoint (``deepspeed/``, frozen parameters excluded) inside the same folder and manifest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moecraft.errors import MoecraftError
from moecraft.esft.expert_parallel import is_expert_parallel, local_rows
from moecraft.files import sha256_file
from moecraft.train.distributed import gathered

NAME = "checkpoint"
MANIFEST = "manifest.json"
ENGINE_TAG = "engine"  # DeepSpeed's checkpoint sub-folder; not "latest", the name of its pointer file


class CorruptCheckpointError(MoecraftError):
    """A checkpoint folder that is partial or whose files do not match their recorded hashes."""


# ----------------------------------------------------------------------------- files
def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_manifest(folder: Path, step: int) -> None:
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in _files(folder)}
    (folder / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))


def verify(folder: Path) -> dict:
    """The manifest of ``folder`` after checking every file against it; CorruptCheckpointError otherwise."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CorruptCheckpointError(f"{folder}: partial checkpoint (no {MANIFEST}); it was not loaded")
    try:
        manifest = json.loads(manifest_path.read_text())
        recorded = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(
            f"{folder}/{MANIFEST} is unreadable ({exc}); the checkpoint was not loaded") from exc
    present = {str(p.relative_to(folder)) for p in _files(folder)}
    if missing := sorted(set(recorded) - present):
        raise CorruptCheckpointError(f"{folder}: missing {', '.join(missing)}; the checkpoint was not loaded")
    if extra := sorted(present - set(recorded)):
        raise CorruptCheckpointError(f"{folder}: unexpected {', '.join(extra)}; the checkpoint was not loaded")
    for name, meta in recorded.items():
        path = folder / name
        if path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
            raise CorruptCheckpointError(f"{folder}: {name} does not match its sha256 in {MANIFEST} "
                                         "(corrupted or partly written); the checkpoint was not loaded")
    return manifest


def find_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint to resume from: ``checkpoint``, or ``checkpoint.old`` if a kill fell between renames."""
    for name in (NAME, f"{NAME}.old"):
        path = Path(out_dir) / name
        if path.is_dir():
            return path
    return None


# ----------------------------------------------------------------------------- state
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable tensors, by name; call inside :func:`gathered` when the model is sharded."""
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_state(model: nn.Module, optimizer, sharded: bool) -> dict:
    """The whole optimiser state keyed by parameter name (gathered from FSDP2 shards when ``sharded``).

    A collective when sharded: every process calls it; the full state is on CPU.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=sharded, cpu_offload=sharded)
    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=options)


def load_optimizer_state(model: nn.Module, optimizer, state: dict, sharded: bool) -> None:
    """Inverse of :func:`optimizer_state` on a fresh optimiser; when ``sharded`` only process 0 needs ``state``
    (the others may pass ``{}``): it is broadcast and each process keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)
    optimizer.zero_grad(set_to_none=True)  # torch initialises the state to load into only when no grads exist
    options = StateDictOptions(full_state_dict=sharded, broadcast_from_rank0=sharded)
    set_optimizer_state_dict(model, optimizer, state, options=options)


def _is_sharded(accelerator) -> bool:
    return accelerator.distributed_type.name == "FSDP"


# ----------------------------------------------------------------------------- save / load
def save_checkpoint(out_dir: Path, accelerator, model, optimizer, scheduler, state: dict) -> Path:
    """Write a checkpoint of the prepared ``model`` / ``optimizer`` (collective: every process calls it)."""
    out_dir = Path(out_dir)
    final, tmp, old = out_dir / NAME, out_dir / f"{NAME}.tmp", out_dir / f"{NAME}.old"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
    unwrapped = accelerator.unwrap_model(model)
    with gathered(unwrapped, deepspeed=deepspeed):  # whole tensors (FSDP2, ZeRO-3); only the writer copies them
        tensors = trainable_tensors(unwrapped) if main else None
    per_process = is_expert_parallel(unwrapped)  # its own experts' state; plain tensors
    if per_process:
        torch.save(getattr(optimizer, "optimizer", optimizer).state_dict(),
                   tmp / f"optimizer-{accelerator.process_index}.pt")
        optim = None
    elif deepspeed:  # the engine's own collective save; frozen experts are not written
        model.save_checkpoint(str(tmp / "deepspeed"), tag=ENGINE_TAG, exclude_frozen_parameters=True,
                              save_latest=False)
        optim = None
    else:
        optim = optimizer_state(model, optimizer, _is_sharded(accelerator))
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if main:
        save_file(tensors, str(tmp / "trainable.safetensors"))
        if optim is not None:
            torch.save(optim, tmp / "optimizer.pt")
        torch.save({"state": state, "scheduler": scheduler.state_dict(),
                    "num_processes": accelerator.num_processes}, tmp / "state.pt")
    accelerator.wait_for_everyone()
    if main:
        write_manifest(tmp, state["step"])
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_checkpoint(path: Path, model: nn.Module, num_processes: int) -> dict:
    """Verify ``path`` and copy its trainable tensors into the *unprepared* ``model``; returns state.pt.

    Call before ``accelerator.prepare`` so that the engine shards the restored tensors itself.
    """
    verify(path)
    blob = torch.load(path / "state.pt", weights_only=False)
    if blob["num_processes"] != num_processes:
        raise MoecraftError(f"{path} was written by {blob['num_processes']} process(es); resume with the same "
                            f"number (this run has {num_processes}): data order and RNG are per process")
    tensors = load_file(str(path / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        raise MoecraftError(f"{path}: checkpoint does not match this run's trainable tensors "
                            "(different method or options?)")
    rows = local_rows(model)  # expert parallelism: this process's experts of the whole tensors
    with torch.no_grad():
        for name, p in params.items():
            p.copy_((tensors[name][rows[name]] if name in rows else tensors[name]).to(p.device, p.dtype))
    return blob


def restore_optimizer(path: Path, blob: dict, accelerator, model, optimizer, scheduler) -> None:
    """Load optimiser, scheduler and this process's RNG from a checkpoint verified by :func:`read_checkpoint`."""
    if accelerator.distributed_type.name == "DEEPSPEED":
        model.load_checkpoint(str(path / "deepspeed"), tag=ENGINE_TAG, load_module_strict=False,
                              load_optimizer_states=True, load_lr_scheduler_states=False)
    elif is_expert_parallel(accelerator.unwrap_model(model)):
        getattr(optimizer, "optimizer", optimizer).load_state_dict(
            torch.load(path / f"optimizer-{accelerator.process_index}.pt", weights_only=False))
    else:
        sharded = _is_sharded(accelerator)
        optim = torch.load(path / "optimizer.pt", weights_only=False) if accelerator.is_main_process or not sharded \
            else {}
        load_optimizer_state(model, optimizer, optim, sharded)
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(torch.load(path / f"rng-{accelerator.process_index}.pt", weights_only=False))
