"""Expert parallelism (EP) for ESFT, on transformers' own expert-parallel plan.

A model too large for one device is loaded with ``DistributedConfig(ep_size=N, fsdp_size=N)``: transformers
gives each of the N processes 1/N of every MoE layer's routed experts (``base_model_ep_plan``), FSDP2-shards
everything else, and moves each (token, expert) pair to the expert's process with an all-to-all
(``AllToAllEP``). Every process trains on its own micro-batches, as under DDP.

ESFT then wraps each process's *local* experts in :class:`SparseExperts` (its selected experts trainable, the
rest frozen) and installs transformers' same dispatch on it, so the exchange of tokens is transformers'
code and only the expert computation is ESFT's. Because every expert lives on exactly one process, the
trained experts need no gradient all-reduce; their gradient already sums the tokens of all processes, so
the loss is divided by N, as DDP's mean would (transformers sets the same divide factor on its expert
FSDP units). What is trained is only routed experts: shared experts and non-expert modules are FSDP
shards of frozen tensors here.

:func:`gathered_experts` puts the global view back for saving: on every process, each wrapped layer holds
the selected experts of all processes in global-id order, exactly the tensors a one-process run holds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from moecraft.compat import expert_parallel_api, mesh_manager
from moecraft.errors import MoecraftError
from moecraft.esft.sparse import SparseExperts, _child_name, _clone_with, _expert_param_names, sparse_modules
from moecraft.families import moe_layers
from moecraft.grad_hooks import input_requires_grad


@dataclass
class ExpertShard:
    """Where a process's :class:`SparseExperts` sits among all processes' experts of its layer."""

    offset: int  # global id of this process's first expert
    selected: list[int]  # global ids selected in the layer, all processes together
    group: object  # the expert-parallel process group


def expert_parallel_config(ep_size: int, world_size: int):
    """transformers' ``DistributedConfig`` for ESFT with ``ep_size`` processes, each owning 1/ep_size experts."""
    DistributedConfig, _ = expert_parallel_api()  # a clear error naming the versions where it is missing
    if ep_size != world_size:
        raise MoecraftError(f"--expert-parallel {ep_size} must equal the number of processes ({world_size}): each "
                            "process owns 1/N of the experts and trains on its own batches")
    return DistributedConfig(tp_size=1, fsdp_size=world_size, ep_size=ep_size, ep_implementation="all_to_all")


def is_expert_parallel(model: nn.Module) -> bool:
    config = getattr(getattr(model, "config", None), "distributed_config", None)
    return config is not None and (getattr(config, "ep_size", 1) or 1) > 1


def apply_sparse_experts_ep(model: nn.Module, experts: Mapping[int | str, list[int]]) -> dict[str, SparseExperts]:
    """:func:`moecraft.esft.sparse.apply_sparse_experts` for a model loaded with expert parallelism.

    Every layer with selected experts is wrapped on every process (with no trainable expert where the
    process owns none of them), so all processes hold the same parameter names and run the same collectives.
    """
    _, EpDispatchExpertsParallel = expert_parallel_api()
    implementation = model.config.distributed_config.ep_implementation
    mesh = mesh_manager(model)
    ep_mesh, tp_mesh = mesh.get_mesh("ep"), mesh.get_mesh("tp")
    rank = ep_mesh.get_local_rank()
    wanted = {int(k): sorted(int(i) for i in v) for k, v in experts.items() if len(v)}
    wrapped = {}
    for layer in moe_layers(model):
        if layer.index not in wanted:
            continue
        old = layer.experts
        n_local = int(old.num_experts)  # transformers set it to the local count when it sharded the experts
        names = _expert_param_names(old, n_local * ep_mesh.size())  # DTensors: their global shape
        local = {n: _local(getattr(old, n)) for n in names}
        if any(t.shape[0] != n_local for t in local.values()):
            raise MoecraftError(f"layer {layer.index}: expert tensors are not split by expert across processes")
        view = _clone_with(_plain_module(old), local, n_local, trainable=False)
        offset = rank * n_local
        ids = wanted[layer.index]
        # share_frozen: transformers' FSDP state keeps the original tensors alive, so a copy would double them
        sparse = SparseExperts(view, [i - offset for i in ids if offset <= i < offset + n_local], allow_empty=True,
                               share_frozen=True)
        sparse.ep = ExpertShard(offset, ids, ep_mesh.get_group())
        EpDispatchExpertsParallel().install_forward(sparse, ep_mesh, tp_mesh=tp_mesh, ep_implementation=implementation)
        # the all-to-alls' backward is a collective, recorded by autograd only where the dispatched tokens
        # require grad: in a layer with nothing trained below it, only the processes owning one of its
        # selected experts would record it and the others would hang. So the tokens always require grad.
        sparse.register_forward_pre_hook(input_requires_grad, with_kwargs=True)
        name = _child_name(layer.block, old)
        setattr(layer.block, name, sparse)
        wrapped[f"{layer.block_path}.{name}"] = sparse
    return wrapped


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def _plain_module(experts: nn.Module) -> nn.Module:
    """A shallow copy of a sharded experts module as its own transformers class, with none of the FSDP2
    class and hooks or the EP forward that transformers put on the instance: the single-device expert code."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(experts)
    if isinstance(experts, FSDPModule):  # fully_shard made the class FSDP<cls>(FSDPModule, cls)
        cls = next(b for b in cls.__bases__ if not issubclass(b, FSDPModule))
    plain = cls.__new__(cls)
    plain.__dict__.update(experts.__dict__)
    plain.__dict__.pop("forward", None)
    for name in _HOOK_DICTS:
        if name in plain.__dict__:
            plain.__dict__[name] = type(plain.__dict__[name])()
    plain._is_expert_parallel = False  # the ids it gets are its own, never another process's sentinel
    return plain


def _local(t: torch.Tensor) -> torch.Tensor:
    """A process's own rows of an expert tensor (DTensor shard or plain), detached."""
    return (t.to_local() if hasattr(t, "to_local") else t).detach()


def expert_parallel_modules(model: nn.Module) -> list[SparseExperts]:
    return [m for m in sparse_modules(model).values() if getattr(m, "ep", None) is not None]


def local_rows(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> this process's rows in the global (gathered) tensor of that name."""
    rows = {}
    for path, m in sparse_modules(model).items():
        if getattr(m, "ep", None) is None:
            continue
        mine = [m.ep.selected.index(i + m.ep.offset) for i in m.expert_ids]
        for pname in m.param_names:
            rows[f"{path}.trainable.{pname}"] = torch.tensor(mine, dtype=torch.long)
    return rows


@contextmanager
def gathered_experts(model: nn.Module) -> Iterator[None]:
    """While inside, every process's EP :class:`SparseExperts` holds all processes' selected experts (a collective).

    Their ``trainable`` tensors become [S, ...] in global-id order and ``expert_ids`` the global ids, so
    names, shapes and rows are those of a one-process run: what ESFT saves and checkpoints write.
    """
    import torch.distributed as dist

    swapped = []
    for m in expert_parallel_modules(model):
        mine = {n: getattr(m.trainable, n).detach().to("cpu") for n in m.param_names}
        parts: list = [None] * dist.get_world_size(m.ep.group)
        dist.all_gather_object(parts, ([i + m.ep.offset for i in m.expert_ids], mine), group=m.ep.group)
        ids = [i for part_ids, _ in parts for i in part_ids]
        if ids != m.ep.selected:  # ranks own contiguous id ranges, so rank order is global-id order
            raise MoecraftError(f"gathered experts {ids} differ from the selection {m.ep.selected}")
        device = getattr(m.trainable, m.param_names[0]).device
        before = (dict(m.trainable._parameters), m.expert_ids)
        for n in m.param_names:
            whole = torch.cat([part[n] for _, part in parts]).to(device)
            m.trainable._parameters[n] = nn.Parameter(whole, requires_grad=True)
        m.expert_ids = ids
        swapped.append((m, before))
    try:
        yield
    finally:
        for m, (params, ids) in swapped:
            m.trainable._parameters.clear()
            m.trainable._parameters.update(params)
            m.expert_ids = ids


def clip_grad_norm_ep(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Total gradient 2-norm over all processes' trained experts, clipped to ``max_norm`` (like
    ``torch.nn.utils.clip_grad_norm_``); each expert lives on one process, so the squares just add up."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else (params[0].device if params else torch.device("cpu"))
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        sq = sq + torch.linalg.vector_norm(g.float()) ** 2
    dist.all_reduce(sq)
    total = sq.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total
