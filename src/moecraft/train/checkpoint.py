"""Atomic, verified training checkpoints for ``--resume``, on one process or many (DDP, FSDP2), that load no pickles.

``<out>/checkpoint/`` holds ``trainable.safetensors`` (the trainable tensors, full, by name: they load on
one device whatever engine wrote them), ``optimizer.json`` + ``optimizer.safetensors`` (the full optimiser
state keyed by parameter name), ``state.json`` (step, scheduler, run settings, content hashes of the run's
inputs), ``rng-<rank>.json`` (each process's RNG) and, written last, ``manifest.json`` with the size and
sha256 of every other file.

No file is read with pickle (``torch.load``): tensors are safetensors, everything else JSON, so a checkpoint
folder from elsewhere cannot run code when resumed. The manifest's hashes catch damage (a partial copy, bit
rot), not tampering: anyone who can write the folder can recompute them. What makes tampering harmless is
that nothing in the folder is executable; only DeepSpeed's own engine files (below) are pickles.

``state.json`` records what the run trained on by content, not by path (:func:`run_inputs`): the expert
selection, the sha256 of each data file and the base model's fingerprint; ``--resume`` refuses a mismatch
and names what changed (:func:`check_inputs`).

Writing: everything goes to ``checkpoint.tmp``, each file is fsynced, then the folder is renamed over
``checkpoint`` (the previous one waits as ``checkpoint.old`` until the rename is done). A run killed at
any moment therefore leaves a complete checkpoint behind; a folder that fails its manifest (partial copy,
bit rot, a hand edit) is reported and never loaded.

Under ESFT's expert parallelism each process holds other experts, so each writes its own optimiser state
(``optimizer-<rank>.*``); ``trainable.safetensors`` still holds every trained expert, as one process would.

DeepSpeed keeps its optimiser partitioned inside its engine, so under DeepSpeed the optimiser part is the
engine's own checkpoint (``deepspeed/``, frozen parameters excluded) inside the same folder and manifest.
Those files are DeepSpeed's pickles: they are checked against the manifest first, then loaded by DeepSpeed
with ``torch.load(weights_only=True)`` and an allow-list of the few DeepSpeed types they hold
(:func:`_deepspeed_weights_only`), so they cannot run code either.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moecraft.errors import DataError, MoecraftError
from moecraft.esft.expert_parallel import is_expert_parallel, local_rows
from moecraft.files import sha256_file
from moecraft.train.distributed import gathered

NAME = "checkpoint"
MANIFEST = "manifest.json"
FORMAT = "moecraft.checkpoint/2"  # /1 kept its state in pickles (state.pt, optimizer.pt, rng-*.pt)
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


def resume_metrics(path: Path, step: int) -> list[str]:
    """The lines of ``metrics.jsonl`` up to ``step``: what a resumed run keeps before it appends its own.

    A last line cut short (a kill in mid-write) is dropped; a bad line before it is an error naming it.
    """
    if not path.is_file():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    kept = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:  # the tail of a write that a kill cut short
                break
            raise DataError(f"{path}:{i + 1}: not valid JSON; fix or delete that line, then --resume again") from None
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    return kept


# ----------------------------------------------------------------------------- JSON + safetensors state
# Optimiser and scheduler states are nested dicts/lists/tuples of numbers, strings and tensors. They are
# stored as JSON with each tensor replaced by {"__tensor__": key} and kept in a safetensors file under that
# key; tuples and dicts with non-string keys (torch's own optimizer.state_dict() keys state by int) are
# tagged so that they come back as they were. Floats round-trip exactly (JSON writes repr, NaN included).
def _encode(obj, tensors: dict[str, torch.Tensor], key: str):
    if torch.is_tensor(obj):
        if hasattr(obj, "full_tensor"):  # a DTensor here would be one shard passed off as the whole
            raise TypeError(f"{key}: a sharded tensor cannot be stored whole")
        tensors[key] = obj.detach().to("cpu").contiguous().clone()  # clone: safetensors refuses shared storage
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and "/" not in k and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{key}/{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, f"{key}/{i}/k"), _encode(v, tensors, f"{key}/{i}/v")]
                              for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"{key}: cannot store a {type(obj).__name__} in a checkpoint")


def _decode(obj, tensors: dict[str, torch.Tensor], where: str):
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        if obj["__tensor__"] not in tensors:
            raise CorruptCheckpointError(f"{where}: tensor {obj['__tensor__']!r} is missing")
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def write_state(folder: Path, stem: str, obj) -> None:
    """``obj`` as ``<stem>.json``, its tensors in ``<stem>.safetensors`` (only when it has any)."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(obj, tensors, stem)
    if tensors:
        save_file(tensors, str(folder / f"{stem}.safetensors"))
    (folder / f"{stem}.json").write_text(json.dumps(encoded))


def read_state(folder: Path, stem: str):
    """Inverse of :func:`write_state`; reads JSON and safetensors only, so it cannot run code."""
    path, tensor_file = folder / f"{stem}.json", folder / f"{stem}.safetensors"
    try:
        encoded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path}: unreadable ({exc}); the checkpoint was not loaded") from exc
    try:
        tensors = load_file(str(tensor_file)) if tensor_file.is_file() else {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
        raise CorruptCheckpointError(f"{tensor_file}: unreadable ({exc}); the checkpoint was not loaded") from exc
    return _decode(encoded, tensors, str(path))


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """This process's RNG states as plain JSON values (lists of ints and floats)."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ----------------------------------------------------------------------------- what the run trains on
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def data_identity(source: str | None) -> dict | None:
    """What a data source is, by content: a file's sha256, a folder's (every file's), a built-in task's
    generated records; a hub data set is known by its name only (its files are not local)."""
    if not source:
        return None
    path = Path(source)
    if source.startswith("builtin:"):
        from moecraft.data import load_records

        return {"kind": "builtin", "sha256": _digest(load_records(source))}  # generated: cheap, and exact
    if path.is_file():
        return {"kind": "file", "sha256": sha256_file(path)}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {"kind": "folder", "sha256": _digest({str(p.relative_to(path)): sha256_file(p) for p in files})}
    return {"kind": "hub", "name": source}  # a missing file is build_data's error to report


def expert_identity(experts_path: str | None) -> dict | None:
    """The expert selection by content: sorted ids per layer (as :class:`SparseExperts` orders them) and the
    file's shared/non-expert flags; not the file's path, name or scores."""
    if not experts_path:
        return None
    from moecraft.esft.selection import ExpertConfig

    ec = ExpertConfig.load(experts_path)
    return {"experts": {str(layer): sorted(set(ids)) for layer, ids in sorted(ec.experts.items())},
            "train_shared_experts": ec.train_shared_experts,
            "train_non_expert_modules": ec.train_non_expert_modules}


def base_identity(model: nn.Module, fingerprint: dict) -> dict:
    """The base model's fingerprint (config hash, weights hash of embedding + routers) and a hash of 64
    evenly spaced values of every parameter, exact in the loaded dtype; call before the method changes it.

    Sharded parameters (expert parallelism loads DTensors) contribute their name and shape only: each
    process holds another shard, and the checkpoint records process 0's view.
    """
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        if hasattr(p, "full_tensor") or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(64, flat.numel()), device=flat.device).long()
        digest.update(flat[idx].to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    return {"config_hash": fingerprint.get("config_hash"), "dtype": ", ".join(dtypes),
            "weights_hash": fingerprint.get("weights_hash"), "sampled_hash": digest.hexdigest()}


def run_inputs(cfg, model: nn.Module, fingerprint: dict) -> dict:
    """Content hashes of everything a resumed run must share with the run that wrote the checkpoint."""
    return {"expert_config": expert_identity(cfg.experts) if cfg.method == "esft" else None,
            "data": {opt: data_identity(getattr(cfg, opt)) for opt in ("data", "eval_data", "mix_data")},
            "base": base_identity(model, fingerprint)}


def _short(value) -> str:
    return value[:12] if isinstance(value, str) else repr(value)


def check_inputs(saved: dict | None, now: dict, path: Path) -> None:
    """Refuse to resume when the expert selection, a data file or the base model changed; name what changed."""
    if saved is None:
        raise MoecraftError(f"{path}: no record of the run's inputs; it cannot be checked, so it is not resumed")
    tail = "; resume with the inputs the run started with, or train into a new --out"
    old_ec, new_ec = saved.get("expert_config"), now.get("expert_config")
    if old_ec != new_ec:
        old_ec, new_ec = old_ec or {}, new_ec or {}
        old_x, new_x = old_ec.get("experts", {}), new_ec.get("experts", {})
        diff = [f"layer {k}: {old_x.get(k, '(none)')} -> {new_x.get(k, '(none)')}"
                for k in sorted(set(old_x) | set(new_x), key=int) if old_x.get(k) != new_x.get(k)]
        diff += [f"{k}: {old_ec.get(k)} -> {new_ec.get(k)}" for k in ("train_shared_experts", "train_non_expert_modules")
                 if old_ec.get(k) != new_ec.get(k)]
        raise MoecraftError(f"--resume: the expert config changed since the checkpoint {path} "
                            f"({'; '.join(diff)}){tail}")
    for opt, old in saved.get("data", {}).items():
        new = now["data"].get(opt)
        if old != new:
            what = {"data": "training data", "eval_data": "eval data", "mix_data": "mixed-in data"}[opt]
            old_s = "none" if old is None else old.get("name") or f"sha256 {_short(old.get('sha256'))}"
            new_s = "none" if new is None else new.get("name") or f"sha256 {_short(new.get('sha256'))}"
            raise MoecraftError(f"--resume: the {what} (--{opt.replace('_', '-')}) changed since the checkpoint "
                                f"{path} ({old_s} -> {new_s}){tail}")
    old_b, new_b = saved.get("base", {}), now["base"]
    if old_b != new_b:
        key = next(k for k in ("config_hash", "dtype", "weights_hash", "sampled_hash") if old_b.get(k) != new_b.get(k))
        what = {"config_hash": "config", "dtype": "dtype", "weights_hash": "weights", "sampled_hash": "weights"}[key]
        detail = f"{old_b.get(key)} -> {new_b.get(key)}" if key == "dtype" else \
            f"{key.replace('_', ' ')} {_short(old_b.get(key))} -> {_short(new_b.get(key))}"
        raise MoecraftError(f"--resume: the base model's {what} changed since the checkpoint {path} ({detail}){tail}")


# ----------------------------------------------------------------------------- model and optimiser state
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


def non_finite_trainable(model: nn.Module) -> list[str]:
    """Names of this process's trainable tensors holding NaN or inf (its shard, under FSDP2 or ZeRO-3)."""
    bad = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        local = p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p)  # the shard this process has
        if local.numel() and not bool(torch.isfinite(local.detach()).all()):
            bad.append(name)
    return bad


# ----------------------------------------------------------------------------- save / load
def save_checkpoint(out_dir: Path, accelerator, model, optimizer, scheduler, state: dict) -> Path:
    """Write a checkpoint of the prepared ``model`` / ``optimizer`` (collective: every process calls it).

    ``state`` (JSON values: step, settings, inputs) goes to ``state.json`` with the scheduler's state.
    """
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
        write_state(tmp, f"optimizer-{accelerator.process_index}", getattr(optimizer, "optimizer", optimizer).state_dict())
        optim = None
    elif deepspeed:  # the engine's own collective save; frozen experts are not written
        model.save_checkpoint(str(tmp / "deepspeed"), tag=ENGINE_TAG, exclude_frozen_parameters=True,
                              save_latest=False)
        optim = None
    else:
        optim = optimizer_state(model, optimizer, _is_sharded(accelerator))
    (tmp / f"rng-{accelerator.process_index}.json").write_text(json.dumps(rng_state()))
    if main:
        save_file(tensors, str(tmp / "trainable.safetensors"))
        if optim is not None:
            write_state(tmp, "optimizer", optim)
        write_state(tmp, "state", {"format": FORMAT, "state": state, "scheduler": scheduler.state_dict(),
                                   "num_processes": accelerator.num_processes})
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


def open_checkpoint(path: Path, num_processes: int) -> dict:
    """Verify ``path`` against its manifest and return its ``state.json`` (no tensors are loaded yet)."""
    verify(path)
    if not (path / "state.json").is_file():
        pickles = sorted(p.name for p in path.glob("*.pt"))
        if pickles:
            raise MoecraftError(f"{path} was written by an older moecraft, in pickle files ({', '.join(pickles)}) "
                                "that --resume does not load because loading a pickle can run code; start the run "
                                "again into a new --out, or finish it with the moecraft version that wrote it")
        raise CorruptCheckpointError(f"{path}: no state.json; the checkpoint was not loaded")
    blob = read_state(path, "state")
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{path}/state.json: not a {FORMAT} state; the checkpoint was not loaded")
    if blob["num_processes"] != num_processes:
        raise MoecraftError(f"{path} was written by {blob['num_processes']} process(es); resume with the same "
                            f"number (this run has {num_processes}): data order and RNG are per process")
    return blob


def load_trainable(path: Path, model: nn.Module) -> None:
    """Copy the checkpoint's trainable tensors into the *unprepared* ``model`` (before ``accelerator.prepare``,
    so that the engine shards the restored tensors itself)."""
    tensors = load_file(str(path / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        raise MoecraftError(f"{path}: checkpoint does not match this run's trainable tensors "
                            "(different method or options?)")
    rows = local_rows(model)  # expert parallelism: this process's experts of the whole tensors
    sources = {}
    for name, p in params.items():
        t = tensors[name]
        if name in rows and (rows[name].numel() == 0 or int(rows[name].max()) < t.shape[0]):
            t = t[rows[name]]
        if tuple(t.shape) != tuple(p.shape):  # e.g. another number of selected experts
            raise MoecraftError(f"{path}: '{name}' has shape {tuple(t.shape)} in the checkpoint, {tuple(p.shape)} "
                                "in this run (different method or options?)")
        sources[name] = t
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(sources[name].to(p.device, p.dtype))


def read_checkpoint(path: Path, model: nn.Module, num_processes: int, inputs: dict | None = None) -> dict:
    """:func:`open_checkpoint`, :func:`check_inputs` against ``inputs`` (when given), :func:`load_trainable`."""
    blob = open_checkpoint(path, num_processes)
    if inputs is not None:
        check_inputs(blob["state"].get("inputs"), inputs, path)
    load_trainable(path, model)
    return blob


# The only non-tensor types DeepSpeed's ZeRO checkpoints hold (torch.serialization.get_unsafe_globals_in_checkpoint
# on ZeRO-2 and ZeRO-3 checkpoints of deepspeed 0.19): plain records, nothing that runs code when rebuilt.
_DEEPSPEED_TYPES = ("deepspeed.runtime.fp16.loss_scaler:LossScaler", "deepspeed.runtime.zero.config:ZeroStageEnum",
                    "deepspeed.utils.tensor_fragment:fragment_address")


@contextmanager
def _deepspeed_weights_only():
    """DeepSpeed's engine reads its files with ``torch.load(weights_only=False)``; inside this block every
    ``torch.load`` is ``weights_only=True`` with only :data:`_DEEPSPEED_TYPES` allowed, and a file holding
    anything else is an error, not code run."""
    import importlib
    import pickle

    allowed = []
    for spec in _DEEPSPEED_TYPES:
        module, _, name = spec.partition(":")
        with suppress(ImportError, AttributeError):  # another DeepSpeed version: the load names what is missing
            allowed.append(getattr(importlib.import_module(module), name))
    original = torch.load

    def weights_only_load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = weights_only_load
    try:
        yield
    except pickle.UnpicklingError as exc:
        detail = str(exc).split("WeightsUnpickler error: ")[-1].split(".")[0]
        raise MoecraftError(f"the DeepSpeed checkpoint holds more than tensors and known DeepSpeed records "
                            f"({detail}); --resume does not unpickle it") from exc
    finally:
        torch.load = original


def restore_optimizer(path: Path, blob: dict, accelerator, model, optimizer, scheduler) -> None:
    """Load optimiser, scheduler and this process's RNG from a checkpoint opened by :func:`open_checkpoint`."""
    if accelerator.distributed_type.name == "DEEPSPEED":
        verify(path)  # checked again right before DeepSpeed reads its own files
        with _deepspeed_weights_only():
            model.load_checkpoint(str(path / "deepspeed"), tag=ENGINE_TAG, load_module_strict=False,
                                  load_optimizer_states=True, load_lr_scheduler_states=False)
    elif is_expert_parallel(accelerator.unwrap_model(model)):
        getattr(optimizer, "optimizer", optimizer).load_state_dict(
            read_state(path, f"optimizer-{accelerator.process_index}"))
    else:
        sharded = _is_sharded(accelerator)
        optim = read_state(path, "optimizer") if accelerator.is_main_process or not sharded else {}
        load_optimizer_state(model, optimizer, optim, sharded)
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(json.loads((path / f"rng-{accelerator.process_index}.json").read_text()))
