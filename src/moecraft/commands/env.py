"""Show the environment for a bug report: library versions, devices, expert kernels, code sandbox, lock.

Prints moecraft, Python, torch (with its CUDA/ROCm), transformers, peft, accelerate, datasets, deepspeed,
bitsandbytes and gguf versions, the supported range of each pinned library, the devices torch sees, which
experts kernels (eager/grouped_mm/batched_mm) transformers offers on this torch, the sandbox for generated
code, and whether the installed versions are the ones constraints.txt locks.
Example: moecraft env --json > env.json   (attach it to a bug report)
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from moecraft import compat
from moecraft.config import checked
from moecraft.errors import MoecraftError

# what a bug report needs, in this order; then the libraries under them
REPORTED = ("torch", "transformers", "peft", "accelerate", "datasets", "deepspeed", "bitsandbytes", "gguf")
UNDERLYING = ("safetensors", "tokenizers", "huggingface_hub")
_NOT_LOCKED = {"moecraft", "pip", "setuptools", "wheel"}  # the lock leaves out the package and the venv's tools


@dataclass
@checked()
class EnvConfig:
    json: bool = field(default=False, metadata={"help": "print one JSON object (for bug reports)"})
    constraints: str | None = field(default=None, metadata={
        "help": "lock file to compare the installed versions with; default: constraints.txt of the source "
                "checkout moecraft runs from, when there is one"})
    check: bool = field(default=False, metadata={
        "help": "fail (exit 2) when an installed version differs from the lock or an installed package is not in "
                "it (make install runs this)"})


CONFIG = EnvConfig


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def supported_ranges() -> dict[str, str]:
    """The version ranges moecraft's installed metadata (pyproject.toml) declares for the reported libraries."""
    try:
        requires = importlib.metadata.requires("moecraft") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    out = {}
    for line in requires:
        req = Requirement(line)
        if req.marker is None and _normalize(req.name) in {_normalize(n) for n in REPORTED}:
            out[req.name] = str(req.specifier)
    return out


def read_lock(path: Path) -> dict[str, str]:
    """``name -> version`` of the ``name==version`` lines of a pip constraints file (comments, markers ignored)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        if "==" in line:
            name, version = (s.strip() for s in line.split("==", 1))
            pins[_normalize(name)] = version
    return pins


def _requirement_closure(package: str) -> set[str]:
    """The installed distributions ``package`` depends on, directly or not (normalized names, itself included)."""
    seen, todo = set(), [package]
    while todo:
        name = _normalize(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def lock_status(path: Path | None) -> dict[str, Any]:
    """How the installed versions compare with a lock file: which differ, which are not installed."""
    if path is None:
        return {"file": None, "note": "no constraints.txt found (moecraft is not running from a source checkout)"}
    if not path.is_file():
        return {"file": str(path), "note": "file not found"}
    pins = read_lock(path)
    differ, missing = {}, []
    # installed but not locked: a dependency added to pyproject.toml since the last `make lock`; not what only torch
    # brought (a CUDA build's nvidia-* and triton: the user's choice of torch build, README, Install)
    skip = pins.keys() | _NOT_LOCKED | _requirement_closure("torch")
    unpinned = sorted({_normalize(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
                       if _normalize(d.metadata["Name"]) not in skip}.items())
    for name, version in sorted(pins.items()):
        found = compat.version_of(name)
        if found is None:
            missing.append(name)
        # PEP 440 ==: a pin without a local label accepts any (2.13.0 matches 2.13.0+cpu and 2.13.0+cu128)
        elif not SpecifierSet(f"=={version}").contains(found, prereleases=True):
            differ[name] = {"installed": found, "locked": version}
    return {"file": str(path), "pins": len(pins), "differ": differ, "not_installed": missing,
            "unpinned": {n: v for n, v in unpinned}}


def _default_lock() -> Path | None:
    root = Path(__file__).resolve().parents[3]  # src/moecraft/commands/env.py -> the checkout
    lock = root / "constraints.txt"
    return lock if lock.is_file() and (root / "pyproject.toml").is_file() else None


def devices() -> list[dict[str, Any]]:
    import torch

    out = [{"type": "cpu", "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}]
    if torch.cuda.is_available():  # ROCm builds answer through torch.cuda too
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append({"type": "cuda", "index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                        "memory_gib": round(p.total_memory / 2**30, 1)})
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append({"type": "mps"})
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        out.extend({"type": "xpu", "index": i, "name": xpu.get_device_name(i)} for i in range(xpu.device_count()))
    return out


def sandbox_status() -> str:
    """The code-execution sandbox that ``eval``'s code metric would use ('unknown' where moecraft cannot say)."""
    try:
        from moecraft.eval import code_exec

        status = getattr(code_exec, "sandbox_status", None)
        return str(status()) if status is not None else "unknown"
    except Exception as exc:  # a report must still come out
        return f"unknown ({type(exc).__name__}: {exc})"


def environment(constraints: str | Path | None = None) -> dict[str, Any]:
    """Everything ``moecraft env`` reports, as one JSON-safe dict."""
    import torch

    from moecraft import __version__

    versions: dict[str, str | None] = {"moecraft": __version__, "python": platform.python_version()}
    for name in REPORTED + UNDERLYING:
        versions[name] = compat.version_of(name)
    versions["cuda"] = torch.version.cuda
    versions["rocm"] = getattr(torch.version, "hip", None)
    try:
        kernels = compat.expert_kernels()
    except Exception as exc:  # transformers that does not import: say so instead of failing the report
        kernels = {"error": f"{type(exc).__name__}: {exc}"}
    features = {name: {"available": compat.supports(name), "needs": f"{f.package} >= {f.minimum}"}
                for name, f in compat.FEATURES.items()}
    return {
        "versions": versions,
        "supported": supported_ranges(),
        "platform": platform.platform(),
        "moecraft_path": str(Path(__file__).resolve().parents[1]),
        "devices": devices(),
        "expert_kernels": kernels,
        "sandbox": sandbox_status(),
        "features": features,
        "lock": lock_status(Path(constraints) if constraints else _default_lock()),
    }


def _device_text(d: dict[str, Any]) -> str:
    if d["type"] == "cpu":
        return f"cpu ({d['cores']} cores, {d['torch_threads']} torch threads)"
    if d["type"] == "cuda":
        return f"cuda:{d['index']} {d['name']} (capability {d['capability']}, {d['memory_gib']} GiB)"
    return d["type"] + (f":{d['index']} {d['name']}" if "index" in d else "")


def _lock_text(lock: dict[str, Any]) -> str:
    if "pins" not in lock:
        return f"{lock['file']}: {lock['note']}" if lock["file"] else lock["note"]
    parts = [f"{lock['file']}: {lock['pins']} pins"]
    if lock["differ"]:
        parts.append("DIFFER: " + ", ".join(f"{n} {d['installed']} (locked {d['locked']})"
                                            for n, d in lock["differ"].items()))
    else:
        parts.append("every installed one matches")
    if lock["unpinned"]:
        parts.append("NOT LOCKED: " + ", ".join(f"{n} {v}" for n, v in lock["unpinned"].items()))
    if lock["not_installed"]:
        parts.append(f"{len(lock['not_installed'])} not installed")
    return "; ".join(parts)


def format_text(env: dict[str, Any]) -> str:
    v, supported = env["versions"], env["supported"]
    rows = [("moecraft", f"{v['moecraft']} ({env['moecraft_path']})"),
            ("python", f"{v['python']} ({env['platform']})"),
            ("torch", f"{v['torch']} (CUDA {v['cuda'] or 'none'}, ROCm {v['rocm'] or 'none'})")]
    for name in REPORTED[1:] + UNDERLYING:
        text = v[name] or "not installed"
        if name in supported:
            text += f"   (supported: {supported[name]})"
        rows.append((name, text))
    rows += [("devices", "; ".join(_device_text(d) for d in env["devices"])),
             ("expert kernels", "; ".join(f"{k}: {s}" for k, s in env["expert_kernels"].items())),
             ("code sandbox", env["sandbox"]),
             ("features", "; ".join(f"{k}: {'yes' if f['available'] else 'no'} (needs {f['needs']})"
                                    for k, f in env["features"].items())),
             ("lock", _lock_text(env["lock"]))]
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{width}}{t}" for k, t in rows)


def run(cfg: EnvConfig) -> int:
    if cfg.constraints and not Path(cfg.constraints).is_file():
        raise MoecraftError(f"constraints file not found: {cfg.constraints}")
    env = environment(cfg.constraints)
    print(json.dumps(env, indent=2) if cfg.json else format_text(env))
    if cfg.check:
        check_lock(env["lock"])
    return 0


def check_lock(lock: dict[str, Any]) -> None:
    """Raise a :class:`MoecraftError` when the installed versions are not the locked ones."""
    if "pins" not in lock:
        raise MoecraftError(f"--check needs a lock file: {_lock_text(lock)}")
    wrong = [f"{n} {d['installed']} (locked {d['locked']})" for n, d in lock["differ"].items()]
    wrong += [f"{n} {v} (not locked)" for n, v in lock["unpinned"].items()]
    if wrong:
        raise MoecraftError(f"installed versions are not those of {lock['file']}: {', '.join(wrong)}; after a change of "
                            "dependencies in pyproject.toml, refresh the lock with `make lock`; otherwise install "
                            "into a fresh venv")
