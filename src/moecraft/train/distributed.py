"""What the training loop tells a distributed engine about MoE models (the engines themselves do the rest).

DeepSpeed ZeRO-3 gathers a module's parameters when its forward starts and frees them after. Inside an
MoE block only the experts some token picks run, so ranks whose tokens route differently request
different gathers and wait for each other forever. Marking each MoE block a ZeRO-3 *leaf* makes ZeRO-3
gather the whole block at once on every rank, the fix DeepSpeed provides (``set_z3_leaf_modules``).
The family layer says which module is the MoE block; PESC's crafted layer is one too.

The rest is what it takes for accelerate + DeepSpeed to train the restructured model as asked, on GPUs
and on CPU (gloo): see :func:`make_accelerator`, :func:`check_engine` and
:func:`moecraft.grad_hooks.input_requires_grad`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING

from torch import nn

from moecraft.errors import MoecraftError, UnsupportedModelError
from moecraft.esft.expert_parallel import gathered_experts, is_expert_parallel
from moecraft.grad_hooks import input_requires_grad

if TYPE_CHECKING:
    from accelerate import Accelerator


def moe_block_classes(model: nn.Module) -> list[type[nn.Module]]:
    """Classes of the MoE blocks of ``model``: a supported MoE family's, or PESC's crafted layer."""
    from moecraft.families import moe_layers
    from moecraft.pesc.layer import PescMoE

    classes = {type(m) for m in model.modules() if isinstance(m, PescMoE)}
    with suppress(UnsupportedModelError):  # a dense model (PESC, or LoRA/FFT on a dense base) has none
        classes |= {type(layer.block) for layer in moe_layers(model)}
    return sorted(classes, key=lambda c: c.__name__)


def make_accelerator(**options) -> Accelerator:
    """The run's ``Accelerator``: CPU unless CUDA is there, and DeepSpeed on CPU (gloo) when launched for it.
    ``options`` go to ``Accelerator`` as they are (the trackers of ``--report-to``).

    accelerate starts DeepSpeed only with ``cpu=False`` (``PartialState``) and takes the world size from the
    process group only when it knows the backend, which it never guesses for CPU DeepSpeed; so a launched
    DeepSpeed run on a machine without CUDA is given ``cpu=False`` and the gloo backend explicitly.
    """
    import os

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    if not cuda and launched and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise MoecraftError("DeepSpeed was requested but is not installed: pip install -e '.[deepspeed]'")
        import deepspeed.ops
        from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (C++, ~85 s on 2 cores) that only its
        # inference all-reduce uses; training reduces through gloo, so mark the op unbuildable (DeepSpeed
        # keeps this dict for the process and skips ops marked False)
        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
        return Accelerator(cpu=False, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")], **options)
    return Accelerator(cpu=not cuda, **options)


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
        for module in model.modules():
            if isinstance(module, tuple(classes)):
                module.register_forward_pre_hook(input_requires_grad, with_kwargs=True)
    return [c.__name__ for c in classes]


@contextmanager
def gathered(model: nn.Module, deepspeed: bool = False) -> Iterator[None]:
    """Every trainable tensor whole, as a plain tensor, on every process while inside (a collective).

    FSDP2 keeps parameters as sharded DTensors; ``unshard`` swaps the full ones in until ``reshard``.
    ZeRO-3 keeps them partitioned; ``GatheredParameters`` does the same. Under ESFT's expert parallelism
    each process's trained experts are gathered (:func:`moecraft.esft.expert_parallel.gathered_experts`);
    the FSDP2 units transformers made there hold only frozen tensors and stay sharded. Elsewhere this does
    nothing.
    """
    if is_expert_parallel(model):
        with gathered_experts(model):
            yield
        return
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


def check_engine(accelerator, batch_size: int, grad_accum: int, max_grad_norm: float = 1.0) -> None:
    """Refuse engine settings that would silently train something else than asked; fill DeepSpeed's ``auto``
    micro-batch size, accumulation and clipping from moecraft's options."""
    import os
    import warnings

    from moecraft.compat import fsdp_version

    kind = accelerator.distributed_type.name
    for engine in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true" and kind != engine:
            warnings.warn(f"{engine} was requested but this run is {kind} (plain data parallel): accelerate runs "
                          "FSDP only on accelerators, and DeepSpeed on CPU only under a launcher", stacklevel=2)
    if kind == "FSDP" and fsdp_version(accelerator.state.fsdp_plugin) == 1 \
            and not accelerator.state.fsdp_plugin.use_orig_params:
        raise MoecraftError("FSDP1 cannot put frozen and trainable tensors in one unit without use_orig_params; "
                            "use FSDP2 (configs/accelerate/fsdp2.yaml)")
    if kind == "DEEPSPEED":
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        # accelerate reads the micro-batch size from a prepared dataloader; moecraft batches itself
        if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds_config["train_micro_batch_size_per_gpu"] = batch_size
        if is_zero3(accelerator):
            if accelerator.state.deepspeed_plugin.zero3_init_flag:
                raise MoecraftError("DeepSpeed zero3_init_flag builds the model already partitioned, but moecraft "
                                    "restructures the whole model's experts first (ESFT, PESC); set "
                                    "zero3_init_flag: false (configs/accelerate/zero3.yaml)")
            from moecraft.compat import unset_hf_deepspeed_config

            # accelerate registers its ZeRO-3 config with transformers even with the flag off, and transformers
            # then builds every model partitioned (deepspeed.zero.Init); the engine partitions it at prepare
            unset_hf_deepspeed_config()
        engine_accum = ds_config.get("gradient_accumulation_steps")
        if engine_accum in (None, "auto"):  # accelerate would fill in its own (1): DeepSpeed's loss scale
            ds_config["gradient_accumulation_steps"] = grad_accum
        elif engine_accum != grad_accum:
            raise MoecraftError(f"DeepSpeed config has gradient_accumulation_steps={engine_accum} but --grad-accum "
                                f"is {grad_accum}; DeepSpeed steps inside backward, so set them equal")
        if ds_config.get("gradient_clipping", "auto") == "auto":  # accelerate would fill in 1.0
            ds_config["gradient_clipping"] = max_grad_norm  # 0 turns clipping off, as --max-grad-norm 0 does
