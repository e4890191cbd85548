"""What the training loop tells a distributed engine about MoE models (the engines themselves do the rest).

DeepSpeed ZeRO-3 gathers a module's parameters when its forward starts and frees them after. Inside an
MoE block only the experts some token picks run, so ranks whose tokens route differently request
different gathers and wait for each other forever. Marking each MoE block a ZeRO-3 *leaf* makes ZeRO-3
gather the whole block at once on every rank, the fix DeepSpeed provides (``set_z3_leaf_modules``).
The family layer says which module is the MoE block; PESC's crafted layer is one too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress

from torch import nn

from moecraft.errors import MoecraftError, UnsupportedModelError


def moe_block_classes(model: nn.Module) -> list[type[nn.Module]]:
    """Classes of the MoE blocks of ``model``: a supported MoE family's, or PESC's crafted layer."""
    from moecraft.families import moe_layers
    from moecraft.pesc.layer import PescMoE

    classes = {type(m) for m in model.modules() if isinstance(m, PescMoE)}
    with suppress(UnsupportedModelError):  # a dense model (PESC, or LoRA/FFT on a dense base) has none
        classes |= {type(layer.block) for layer in moe_layers(model)}
    return sorted(classes, key=lambda c: c.__name__)


def is_zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.distributed_type.name == "DEEPSPEED" and plugin is not None and plugin.zero_stage == 3


def mark_zero3_leaf_modules(model: nn.Module, accelerator) -> list[str]:
    """Under DeepSpeed ZeRO-3, make every MoE block a leaf module; returns the class names marked."""
    if not is_zero3(accelerator):
        return []
    from deepspeed.utils import set_z3_leaf_modules

    classes = moe_block_classes(model)
    if classes:
        set_z3_leaf_modules(model, classes)
    return [c.__name__ for c in classes]


@contextmanager
def gathered(model: nn.Module, deepspeed: bool = False) -> Iterator[None]:
    """Every trainable tensor whole, as a plain tensor, on every process while inside (a collective).

    FSDP2 keeps parameters as sharded DTensors; ``unshard`` swaps the full ones in until ``reshard``.
    ZeRO-3 keeps them partitioned; ``GatheredParameters`` does the same. Elsewhere this does nothing.
    """
    if deepspeed:
        import deepspeed as ds

        with ds.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad]):
            yield
        return
    units = [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]  # FSDP2 units
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def check_engine(accelerator, batch_size: int, grad_accum: int) -> None:
    """Refuse engine settings that would silently train something else than asked; fill DeepSpeed's batch."""
    import os
    import warnings

    kind = accelerator.distributed_type.name
    for engine in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true" and kind != engine:
            warnings.warn(f"{engine} was requested but accelerate runs it only on accelerators; this run is "
                          f"{kind} (plain data parallel on CPU)", stacklevel=2)
    if kind == "FSDP" and accelerator.state.fsdp_plugin.fsdp_version == 1 \
            and not accelerator.state.fsdp_plugin.use_orig_params:
        raise MoecraftError("FSDP1 cannot put frozen and trainable tensors in one unit without use_orig_params; "
                            "use FSDP2 (configs/accelerate/fsdp2.yaml)")
    if kind == "DEEPSPEED":
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        # accelerate reads the micro-batch size from a prepared dataloader; moecraft batches itself
        if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds_config["train_micro_batch_size_per_gpu"] = batch_size
        engine_accum = ds_config.get("gradient_accumulation_steps")
        if engine_accum not in (None, "auto", grad_accum):
            raise MoecraftError(f"DeepSpeed config has gradient_accumulation_steps={engine_accum} but --grad-accum "
                                f"is {grad_accum}; DeepSpeed steps inside backward, so set them equal")
