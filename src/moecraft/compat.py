"""Every private or version-dependent API of transformers, peft and accelerate that moecraft uses, in one place.

These libraries move fast and moecraft leans on their internals (fused expert tensors, the routers' outputs,
the experts implementations, a private grouped-GEMM helper, the expert-parallel plan, a peft rewrite hook).
Call sites get them from here, so a release that moves one breaks in one file, and a feature the installed
version lacks stops with one line naming the versions (:func:`require`) instead of an ``ImportError`` or an
``AttributeError`` deep in a run. The supported range is ``pyproject.toml``'s; :data:`MINIMUM` repeats its
lower bounds (a test keeps them equal) and ``constraints.txt`` pins the versions the suite is run with.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from packaging.version import Version

from moecraft.errors import MoecraftError

# pyproject.toml's lower bounds (tests/test_env.py checks they agree), the versions CI's second stage runs. Below
# them the suite fails: transformers 5.13 to 5.18 lack DeepSeek-V2's router logits output (bench/replicate), older
# ones the router modules; peft 0.19 takes the fused expert tensors the wrong way round; accelerate 1.1
# (transformers' own minimum) hangs under DeepSpeed on CPU (1.2 to 1.9 untried)
MINIMUM = {"transformers": "5.19", "peft": "0.20", "accelerate": "1.10"}


@dataclass(frozen=True)
class Feature:
    package: str
    minimum: str
    what: str


FEATURES: dict[str, Feature] = {
    # 5.13 gave every MoE family of moecraft a router module returning (logits, top-k weights, top-k ids)
    "moe_layout": Feature("transformers", MINIMUM["transformers"],
                          "MoE routers that return (logits, weights, indices) and fused expert tensors"),
    # 5.22 moved token dispatch into transformers.distributed.expert_parallel (EpDispatchExpertsParallel)
    "expert_parallel": Feature("transformers", "5.22",
                               "--expert-parallel (DistributedConfig(ep_size=...) with expert-parallel token dispatch)"),
    # below 0.20 peft takes transformers 5's fused [E, out, in] expert tensors for [E, in, out]
    "lora_experts": Feature("peft", MINIMUM["peft"], "LoRA on the fused routed-expert tensors (--lora-experts)"),
}


def version_of(package: str) -> str | None:
    """The installed version of ``package``, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _at_least(package: str, minimum: str) -> bool:
    found = version_of(package)
    # a dev/local build of the minimum (5.22.0.dev0, 2.13.0+cpu) counts as that release
    return found is not None and Version(Version(found).base_version) >= Version(minimum)


def supports(feature: str) -> bool:
    """Whether the installed libraries have ``feature`` (a key of :data:`FEATURES`)."""
    f = FEATURES[feature]
    return _at_least(f.package, f.minimum)


def require(feature: str) -> None:
    """Raise a :class:`MoecraftError` naming the versions when the installed libraries lack ``feature``."""
    f = FEATURES[feature]
    if not supports(feature):
        raise MoecraftError(f"moecraft needs {f.package} >= {f.minimum} for {f.what}; found {f.package} "
                            f"{version_of(f.package) or '(not installed)'}")


def check_supported_versions() -> None:
    """Raise a :class:`MoecraftError` when transformers, peft or accelerate is below what moecraft supports."""
    low = [f"{p} >= {m} (found {version_of(p) or 'none'})" for p, m in MINIMUM.items() if not _at_least(p, m)]
    if low:
        raise MoecraftError(f"moecraft needs {', '.join(low)}; install the tested versions with "
                            "`pip install -c constraints.txt -e .` (README, Install)")


# ---- transformers ---------------------------------------------------------------------------------------------

def _grouped_linear() -> Callable | None:
    """transformers' private grouped-GEMM helper (CPU fallback included), or None: callers then take the
    generic path (the experts module's own forward), so it is an optional speed-up, not a requirement."""
    try:
        from transformers.integrations.moe import _grouped_linear as found
    except ImportError:  # pragma: no cover
        return None
    return found


def __getattr__(name: str):
    # resolved on first use, so importing this module (``moecraft env``) does not import transformers
    if name == "grouped_linear":
        value = globals()["grouped_linear"] = _grouped_linear()
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def experts_implementation(config: Any) -> str:
    """The experts kernel a (sub)config asks for: eager, grouped_mm, batched_mm (private config attribute)."""
    return getattr(config, "_experts_implementation", None) or "eager"


def apply_gate(experts: Any, h):
    """The experts module's own gating of the fused gate/up output (a private method of transformers' experts)."""
    return experts._apply_gate(h)


def expert_parallel_api() -> tuple[type, type]:
    """(``DistributedConfig``, ``EpDispatchExpertsParallel``), or a clear error when this transformers lacks them."""
    require("expert_parallel")
    try:
        from transformers.distributed import DistributedConfig
        from transformers.distributed.expert_parallel import EpDispatchExpertsParallel
    except ImportError as exc:  # a release past the tested ones that moved them
        raise MoecraftError(f"--expert-parallel: transformers {version_of('transformers')} has no expert-parallel "
                            f"token dispatch where moecraft looks for it ({exc})") from None
    if "ep_size" not in DistributedConfig.__dataclass_fields__:
        raise MoecraftError(f"--expert-parallel: transformers {version_of('transformers')}'s DistributedConfig "
                            "has no ep_size")
    return DistributedConfig, EpDispatchExpertsParallel


def mesh_manager(model: Any):
    """The device-mesh manager a sharded (``distributed_config``) load attaches to the model (private)."""
    return model._mesh_manager


def unset_hf_deepspeed_config() -> None:
    """Drop the ZeRO-3 config accelerate registered with transformers (which would build models partitioned)."""
    from transformers.integrations import unset_hf_deepspeed_config as unset

    unset()


def expert_kernels() -> dict[str, str]:
    """moecraft's experts kernels and whether transformers offers them on this torch: name -> status."""
    import torch

    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        registered = set(ALL_EXPERTS_FUNCTIONS.keys())
    except ImportError:
        registered = set()
    out = {"eager": "available"}
    for name in ("grouped_mm", "batched_mm"):
        out[name] = "available" if name in registered else "not in this transformers"
    if "grouped_mm" in registered:
        native = hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")
        out["grouped_mm"] += (" (torch grouped GEMM)" if native else " (transformers' per-expert loop: this torch "
                              "has no grouped GEMM)")
    return out


# ---- peft -----------------------------------------------------------------------------------------------------

def peft_weight_conversion():
    """peft's module that rewrites LoRA configs for transformers 5 (peft >= 0.19), or None (private)."""
    try:
        from peft.utils import transformers_weight_conversion
    except ImportError:
        return None
    return transformers_weight_conversion if hasattr(transformers_weight_conversion,
                                                     "convert_peft_config_for_transformers") else None


# ---- accelerate -----------------------------------------------------------------------------------------------

def fsdp_version(plugin: Any) -> int:
    """The FSDP version of accelerate's FSDP plugin (accelerate before FSDP2 support has only FSDP1)."""
    return int(getattr(plugin, "fsdp_version", 1) or 1)
