"""Really sparse ESFT: train only the selected routed experts of a fused transformers-5 experts module.

transformers 5 keeps a layer's routed experts as fused 3-D tensors (``gate_up_proj`` [E, ...],
``down_proj`` [E, ...], optional ``*_bias`` [E, ...]), so ``requires_grad`` cannot pick single experts and
masking the gradient still computes (and stores) the full weight gradient. :class:`SparseExperts` replaces
the experts module of a layer by two copies of the *same* class, one holding the selected experts as a
trainable ``Parameter`` [S, ...] and one holding the other E-S experts as tensors that do not require grad.
(Under expert parallelism, where transformers' FSDP keeps the original module alive, the frozen group holds
the original tensors instead of a copy: ``share_frozen``.)
Each (token, expert) assignment of the router goes to the group that owns its expert, each group runs the
model's own expert code (eager, grouped_mm or batched_mm: whatever ``config._experts_implementation``
says) with its own weights, and the per-assignment outputs are weighted and reduced exactly as the original
implementation does. So frozen experts get no weight-gradient computation, no ``.grad``, no optimiser
state and no weight decay, while routing and outputs are those of the unmodified model: bit-identical on
CPU float32 (eager and grouped_mm; tested), since every expert's GEMM sees the same rows as before.

ESFT (paper §3.3): only the experts of the selected set (eq. 8) are updated; everything else is frozen.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from moecraft.compat import apply_gate, experts_implementation
from moecraft.compat import grouped_linear as _grouped_linear
from moecraft.errors import MoecraftError
from moecraft.esft.expert_lora import effective_group
from moecraft.families import moe_layers


def _expert_param_names(experts: nn.Module, num_experts: int) -> list[str]:
    """Names of the per-expert tensors (leading dimension E) of a fused experts module."""
    return [n for n, p in experts.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == num_experts]


def _clone_with(template: nn.Module, tensors: Mapping[str, torch.Tensor], num_experts: int, trainable: bool):
    """A shallow copy of ``template`` (same class, config, activation, flags) holding ``tensors`` instead."""
    sub = copy.copy(template)
    # copy.copy shares the registries; give the clone its own so replacing tensors leaves the template alone
    sub._parameters = dict(template._parameters)
    sub._buffers = dict(template._buffers)
    sub._modules = dict(template._modules)
    for name, t in tensors.items():
        sub._parameters[name] = nn.Parameter(t, requires_grad=trainable)
    sub.num_experts = num_experts
    return sub


def _grouped_experts(group: nn.Module, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Bare expert outputs of rows ``x`` already sorted by local expert id ``ids`` (grouped GEMM).

    The body of transformers' ``grouped_mm_experts_forward`` without its sort, weighting and reduction,
    so the caller can hand each expert exactly the rows, in exactly the order, the unmodified model would.
    """
    counts = torch.bincount(ids, minlength=group.num_experts)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    has_gate = getattr(group, "has_gate", True)
    has_bias = getattr(group, "has_bias", False)
    transposed = getattr(group, "is_transposed", False)
    up = group.gate_up_proj if has_gate else group.up_proj
    up_bias = (group.gate_up_proj_bias if has_gate else group.up_proj_bias)[ids] if has_bias else None
    h = _grouped_linear(x, up, offsets, bias=up_bias, is_transposed=transposed)
    h = apply_gate(group, h) if has_gate else group.act_fn(h)
    down_bias = group.down_proj_bias[ids] if has_bias else None
    h = _grouped_linear(h, group.down_proj, offsets, bias=down_bias, is_transposed=transposed)
    if getattr(group, "has_post_expert_norm", False):
        h = group.post_expert_norm(h)
    return h


class SparseExperts(nn.Module):
    """Drop-in replacement of a fused experts module whose selected experts alone are trainable.

    ``forward(hidden_states, top_k_index, top_k_weights)`` has the experts module's signature. The
    selected experts live in ``self.trainable`` (Parameters [S, ...], requires_grad=True); the others in
    ``self.frozen`` (Parameters [E-S, ...], requires_grad=False, so autograd never forms their weight
    gradient; with ``share_frozen`` the original [E, ...] tensors, of which only the unselected rows are
    read). :meth:`fused` writes both back into the original fused layout (bit-exact).
    """

    def __init__(self, experts: nn.Module, expert_ids: list[int], *, allow_empty: bool = False,
                 share_frozen: bool = False):
        super().__init__()
        num_experts = int(experts.num_experts)
        ids = sorted({int(i) for i in expert_ids})
        if not ids and not allow_empty:  # allowed under expert parallelism: a rank may own none of a layer's picks
            raise MoecraftError("SparseExperts needs at least one selected expert")
        if ids and (ids[0] < 0 or ids[-1] >= num_experts):
            raise MoecraftError(f"expert ids {ids} out of range for a layer with {num_experts} experts")
        names = _expert_param_names(experts, num_experts)
        if not names:
            raise MoecraftError(f"{type(experts).__name__} holds no fused per-expert tensors")
        sel = torch.tensor(ids, dtype=torch.long)
        keep = torch.ones(num_experts, dtype=torch.bool)
        keep[sel] = False
        rest = keep.nonzero().squeeze(1)
        self.num_experts = num_experts
        self.expert_ids = ids
        self.param_names = names
        self.impl_config = getattr(experts, "config", None)
        with torch.no_grad():
            self.trainable = _clone_with(
                experts, {n: getattr(experts, n).detach()[sel].clone() for n in names}, len(ids), True
            )
            # a copy of the unselected rows, so the original tensors can be freed; or, where something else keeps
            # them alive anyway, the original tensors themselves (their selected rows are then never read)
            frozen = {n: getattr(experts, n).detach() if share_frozen else getattr(experts, n).detach()[rest].clone()
                      for n in names}
            self.frozen = (_clone_with(experts, frozen, num_experts if share_frozen else len(rest), False)
                           if len(rest) else None)
        # global expert id -> (group, local id); buffers so they follow .to(device)
        owner = torch.zeros(num_experts, dtype=torch.bool)
        owner[sel] = True
        local = torch.empty(num_experts, dtype=torch.long)
        local[sel] = torch.arange(len(sel))
        local[rest] = rest if share_frozen else torch.arange(len(rest))
        self.frozen_rows = rest if share_frozen else torch.arange(len(rest))
        self.register_buffer("is_trainable", owner, persistent=False)
        self.register_buffer("local_id", local, persistent=False)
        self.register_buffer("selected", sel, persistent=False)
        self.register_buffer("unselected", rest, persistent=False)
        self.expert_lora = None  # per-expert LoRA on the selected experts (moecraft.esft.expert_lora.attach)

    @property
    def implementation(self) -> str:
        return experts_implementation(self.impl_config)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        n_tok, k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        impl = self.implementation
        eager = impl == "eager"
        # Visit assignments (positions p = t*k + slot) in the order the original kernel gives each expert its
        # rows, because CPU GEMM results depend on a row's place in its block: slot-major for the eager loop
        # (torch.where over [slot, token]); for grouped_mm the permutation of the very same (unstable)
        # torch.sort call the original makes.
        if eager:
            order = torch.arange(n_tok * k, device=flat.device).view(n_tok, k).T.reshape(-1)
        elif impl == "grouped_mm" and _grouped_linear is not None:
            order = torch.sort(flat)[1]
        else:
            order = torch.arange(n_tok * k, device=flat.device)
        owned = self.is_trainable[flat[order]]
        outs, positions = [], []
        for group, mask in ((self.trainable, owned), (self.frozen, ~owned)):
            pos = order[mask]
            if group is None or pos.numel() == 0:
                continue
            if group is self.trainable and self.expert_lora is not None:  # W + (alpha/r) B A, see expert_lora
                group = effective_group(group, self.expert_lora)
            ids = self.local_id[flat[pos]]
            if impl == "grouped_mm" and _grouped_linear is not None:
                outs.append(_grouped_experts(group, hidden[pos // k], ids))
            else:
                ones = torch.ones((ids.numel(), 1), dtype=top_k_weights.dtype, device=ids.device)
                # each assignment as its own top-1 "token" of weight 1: the group returns the bare expert
                # output (x*1 and a one-term sum are exact), weighted and reduced below as the original does
                outs.append(group(hidden[pos // k], ids.unsqueeze(1), ones))
            positions.append(pos)
        pos = torch.cat(positions)
        inv = torch.empty_like(pos)
        inv[pos] = torch.arange(pos.numel(), device=pos.device)
        per_pair = torch.cat(outs)[inv].view(n_tok, k, -1)
        weighted = per_pair * top_k_weights.unsqueeze(-1)
        if eager:
            # eager: index_add_ into zeros, expert by expert in increasing id order
            order = top_k_index.argsort(dim=1)
            ordered = weighted.gather(1, order.unsqueeze(-1).expand_as(weighted))
            out = torch.zeros_like(hidden)
            for slot in range(k):
                out = out + ordered[:, slot].to(hidden.dtype)
            return out
        # grouped_mm / batched_mm: weighted sum over the k slots, then cast
        return weighted.sum(dim=1).to(hidden.dtype)

    @torch.no_grad()
    def fused(self) -> dict[str, torch.Tensor]:
        """The full fused tensors [E, ...] with the (trained) selected experts written back (their LoRA folded in)."""
        out = {}
        for name in self.param_names:
            t = getattr(self.trainable, name)
            if self.expert_lora is not None and name in self.expert_lora.names:
                t = t + self.expert_lora.delta(name).to(t.dtype)
            full = t.new_empty((self.num_experts, *t.shape[1:]))
            full[self.selected] = t.detach()
            if self.frozen is not None:
                full[self.unselected] = getattr(self.frozen, name).detach()[self.frozen_rows].to(t.dtype)
            out[name] = full
        return out

    def unwrap(self) -> nn.Module:
        """A plain experts module of the original class holding :meth:`fused` (trainable again)."""
        return _clone_with(self.trainable, self.fused(), self.num_experts, True)


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    for name, module in parent.named_children():
        if module is child:
            return name
    raise LookupError("experts module is not a direct child of its MoE block")


def apply_sparse_experts(model: nn.Module, experts: Mapping[int | str, list[int]]) -> dict[str, SparseExperts]:
    """Wrap the experts of every layer named in ``experts`` (decoder-layer index -> expert ids) in place.

    Returns ``{experts module path: SparseExperts}``. Layers absent from the map (or with no ids) keep their
    original module. Unknown layer indices are an error naming them.
    """
    wanted = {int(k): list(v) for k, v in experts.items() if len(v)}
    layers = {layer.index: layer for layer in moe_layers(model)}
    unknown = sorted(set(wanted) - set(layers))
    if unknown:
        raise MoecraftError(f"expert config names layers {unknown} that are not MoE layers of this model "
                            f"(MoE layers: {sorted(layers)})")
    wrapped = {}
    for idx, ids in sorted(wanted.items()):
        layer = layers.pop(idx)  # holding no reference to a replaced module frees it before the next copy
        if isinstance(layer.experts, SparseExperts):
            raise MoecraftError(f"layer {idx} is already wrapped")
        name = _child_name(layer.block, layer.experts)
        sparse = SparseExperts(layer.experts, ids)
        setattr(layer.block, name, sparse)
        wrapped[f"{layer.block_path}.{name}"] = sparse
        del layer
    return wrapped


def sparse_modules(model: nn.Module) -> dict[str, SparseExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseExperts)}


def remove_sparse_experts(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_sparse_experts` in place: fused experts modules with the trained rows written back."""
    for path, sparse in sparse_modules(model).items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, name, sparse.unwrap())
    return model
