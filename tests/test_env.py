"""Versions: the compat module's refusals name the versions, its minimums are pyproject.toml's lower bounds, the
lock files pin what pyproject.toml allows, and ``moecraft env`` reports what is installed (``--json`` too)."""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from moecraft import compat
from moecraft.cli import main
from moecraft.commands import env as env_cmd
from moecraft.errors import MoecraftError

ROOT = Path(__file__).resolve().parents[1]
PINNED = ("transformers", "peft", "accelerate")


def _requirements() -> dict[str, Requirement]:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name: Requirement(d) for d in deps}


def test_minimums_are_pyprojects_lower_bounds_and_ranges_stop_at_the_next_major():
    reqs = _requirements()
    for name in PINNED:
        spec = {s.operator: s.version for s in reqs[name].specifier}
        assert spec[">="] == compat.MINIMUM[name], name
        low = Version(spec[">="])
        next_major = f"{low.major + 1}" if low.major else "1"  # 0.x: the next major is 1.0
        assert spec["<"] == next_major, name


@pytest.mark.parametrize("lock, lowest", [("constraints.txt", False), ("constraints-min.txt", True)])
def test_lock_files_pin_versions_pyproject_allows(lock, lowest):
    pins = env_cmd.read_lock(ROOT / lock)
    assert pins["torch"] == "2.13.0"  # no local label: a CUDA build of 2.13.0 satisfies it too
    for name, req in _requirements().items():
        key = env_cmd._normalize(name)
        assert key in pins, f"{lock} does not pin {name}: run `make lock`"
        assert req.specifier.contains(pins[key], prereleases=True), f"{lock}: {name}=={pins[key]} vs {req}"
        if lowest and name in PINNED:
            assert Version(pins[key]) == Version(compat.MINIMUM[name])


def test_require_names_the_feature_and_both_versions(monkeypatch):
    real = compat.version_of
    assert compat.supports("moe_layout")  # the installed versions are within range
    monkeypatch.setattr(compat, "version_of", lambda p: "5.21.3" if p == "transformers" else real(p))
    assert not compat.supports("expert_parallel") and compat.supports("moe_layout")
    with pytest.raises(MoecraftError) as err:
        compat.expert_parallel_api()
    assert str(err.value) == ("moecraft needs transformers >= 5.22 for --expert-parallel (DistributedConfig(ep_size=...)"
                              " with expert-parallel token dispatch); found transformers 5.21.3")
    monkeypatch.setattr(compat, "version_of", lambda p: "5.22.0.dev0" if p == "transformers" else real(p))
    assert compat.supports("expert_parallel")  # a dev build of the minimum counts as it
    monkeypatch.setattr(compat, "version_of", lambda p: None if p == "peft" else real(p))
    with pytest.raises(MoecraftError, match=r"needs peft >= 0\.20 for LoRA on the fused routed-expert tensors .*"
                                            r"found peft \(not installed\)"):
        compat.require("lora_experts")


def test_expert_kernels_are_transformers_registry():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    kernels = compat.expert_kernels()
    assert list(kernels) == ["eager", "grouped_mm", "batched_mm"]
    for name in ("grouped_mm", "batched_mm"):
        assert kernels[name].startswith("available") == (name in ALL_EXPERTS_FUNCTIONS)
    native = hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")
    assert ("torch grouped GEMM" in kernels["grouped_mm"]) == native
    assert compat.grouped_linear is not None  # the private helper moecraft's sparse ESFT uses


def test_env_json_reports_the_installed_versions(capsys, tmp_path):
    lock = tmp_path / "lock.txt"
    torch_version = importlib.metadata.version("torch")
    lock.write_text(f"# a lock\ntorch=={torch_version.split('+')[0]}\ntransformers==4.0.0 ; python_version >= '3'\n"
                    "no-such-package==1.0\n")
    assert main(["env", "--json", "--constraints", str(lock)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"versions", "supported", "platform", "devices", "expert_kernels", "sandbox", "features",
                           "lock"}
    versions = report["versions"]
    assert set(versions) >= {"moecraft", "python", "torch", "cuda", "rocm", "transformers", "peft", "accelerate",
                             "datasets", "deepspeed", "bitsandbytes", "gguf"}
    for name in ("torch", "transformers", "peft", "accelerate", "datasets"):
        assert versions[name] == importlib.metadata.version(name)
    assert versions["cuda"] == torch.version.cuda
    assert report["devices"][0]["type"] == "cpu"
    assert len(report["devices"]) == 1 + (torch.cuda.device_count() if torch.cuda.is_available() else 0) \
        + (torch.backends.mps.is_available()) + (torch.xpu.is_available() if hasattr(torch, "xpu") else 0)
    assert report["expert_kernels"] == compat.expert_kernels()
    assert isinstance(report["sandbox"], str) and report["sandbox"]
    assert report["features"]["expert_parallel"]["available"] == compat.supports("expert_parallel")
    # the lock comparison: torch matches (local label ignored), transformers differs, the unknown one is missing
    assert report["lock"]["pins"] == 3
    assert report["lock"]["differ"] == {"transformers": {"installed": versions["transformers"], "locked": "4.0.0"}}
    assert report["lock"]["not_installed"] == ["no-such-package"]
    assert "peft" in report["lock"]["unpinned"]


def test_env_text_and_check(capsys, tmp_path):
    # the version import would find (the first on the path), as moecraft env reports it
    pins = {env_cmd._normalize(d.metadata["Name"]): importlib.metadata.version(d.metadata["Name"])
            for d in importlib.metadata.distributions()}
    lock = tmp_path / "lock.txt"
    lock.write_text("".join(f"{n}=={v}\n" for n, v in pins.items() if n not in env_cmd._NOT_LOCKED))
    assert main(["env", "--constraints", str(lock), "--check"]) == 0  # everything installed, as locked
    text = capsys.readouterr().out
    for name in ("moecraft", "python", "torch", "transformers", "peft", "accelerate", "datasets", "deepspeed",
                 "bitsandbytes", "gguf", "devices", "expert kernels", "code sandbox", "lock"):
        assert re.search(rf"^{name} +\S", text, re.M), name
    assert re.search(rf"^transformers +{re.escape(pins['transformers'])} +\(supported: ", text, re.M)
    assert "every installed one matches" in text

    stale = tmp_path / "stale.txt"
    stale.write_text("".join(f"{n}=={'0.0.1' if n == 'peft' else v}\n" for n, v in pins.items()
                             if n not in env_cmd._NOT_LOCKED | {"datasets"}))
    assert main(["env", "--constraints", str(stale), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"moecraft env: error: installed versions are not those of {stale}: peft {pins['peft']} (locked "
                   f"0.0.1), datasets {pins['datasets']} (not locked); after a change of dependencies in "
                   "pyproject.toml, refresh the lock with `make lock`; otherwise install into a fresh venv"]
