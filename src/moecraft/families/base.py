"""What moecraft needs to know about an MoE model family, and the generic code that uses it.

A family entry (:class:`MoEFamily`) says where the MoE block, the router, the routed experts and the
shared experts of a decoder layer live, and how the router turns hidden states into routing weights
(:class:`RoutingSpec`). Everything else in moecraft asks these objects instead of hard-coding names.

transformers 5 routers all return ``(router_logits, top_k_weights, top_k_indices)`` and transformers 5
routed experts are one module holding fused 3-D tensors (``gate_up_proj``, ``down_proj``, optional
biases; layout flags ``is_transposed``/``is_concatenated``/``has_bias`` set by
``use_experts_implementation``), which is what lets one small entry per family suffice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from transformers import PretrainedConfig

Scoring = Literal["softmax", "sigmoid", "topk_softmax"]
GroupScore = Literal["max", "top2_sum"]


@dataclass(frozen=True)
class RoutingSpec:
    """How a router maps a token's hidden state ``u`` to its top-k experts and their weights.

    ``scoring``:
      - ``softmax``: s = softmax(W u) over all experts, top-k of s (ESFT eq. 3 and eq. 2).
      - ``sigmoid``: s = sigmoid(W u); top-k chosen on s + correction bias (DeepSeek-V3 "noaux_tc").
      - ``topk_softmax``: top-k of the logits W u + b, softmax over those k only (GPT-OSS).
    Optional steps, in the order routers apply them: group-limited choice (the best ``topk_group`` of
    ``n_group`` expert groups, group score = max or sum of top-2), renormalisation of the k weights to sum
    to one (``norm_topk_prob``), multiplication by ``scaling_factor``.
    """

    num_experts: int
    top_k: int
    scoring: Scoring = "softmax"
    norm_topk_prob: bool = False
    scaling_factor: float = 1.0
    n_group: int | None = None
    topk_group: int | None = None
    group_score: GroupScore | None = None
    router_bias: bool = False  # nn.Linear-style bias added to the logits (GPT-OSS)
    correction_bias: bool = False  # bias added to the scores only to choose experts (DeepSeek-V3)

    @property
    def group_limited(self) -> bool:
        return self.group_score is not None and (self.n_group or 1) > 1


@dataclass(frozen=True)
class MoELayer:
    """The pieces of one MoE decoder layer, as found in a live model."""

    index: int  # decoder-layer index in the model
    block: nn.Module  # the MoE block (router + experts + shared experts)
    router: nn.Module
    experts: nn.Module  # fused 3-D routed experts
    shared: tuple[tuple[str, nn.Module], ...]  # (attribute name, module) of the always-on shared experts
    block_path: str  # dotted name of ``block`` inside the model


@dataclass(frozen=True)
class MoEFamily:
    """Layout and routing of one transformers MoE family. One instance per family, in its own module."""

    name: str
    model_types: tuple[str, ...]  # values of ``config.model_type`` served by this entry
    routing: Callable[[PretrainedConfig], RoutingSpec]
    tiny_config: Callable[..., PretrainedConfig]  # a small random-init config of the real class (tests, demo)
    example_checkpoint: str  # a real hub id of this family, for docs and error messages
    block_attr: str = "mlp"  # attribute of the decoder layer that holds the MoE block
    router_attr: str = "gate"
    experts_attr: str = "experts"
    shared_attrs: tuple[str, ...] = ()  # shared experts and their gates, if any
    notes: str = ""
    extra: dict = field(default_factory=dict)

    # ----------------------------------------------------------------- layout
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        base = model.get_decoder() if hasattr(model, "get_decoder") else model
        layers = getattr(base, "layers", None)
        if layers is None:
            raise AttributeError(f"{type(model).__name__}: no decoder layers found")
        return layers

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        """All MoE layers (dense layers such as DeepSeek's first ``first_k_dense_replace`` are skipped)."""
        prefix = _module_path(model, self.decoder_layers(model))
        out = []
        for i, layer in enumerate(self.decoder_layers(model)):
            block = getattr(layer, self.block_attr, None)
            if block is None or not hasattr(block, self.router_attr) or not hasattr(block, self.experts_attr):
                continue
            shared = tuple((a, getattr(block, a)) for a in self.shared_attrs if getattr(block, a, None) is not None)
            out.append(
                MoELayer(
                    index=i,
                    block=block,
                    router=getattr(block, self.router_attr),
                    experts=getattr(block, self.experts_attr),
                    shared=shared,
                    block_path=f"{prefix}.{i}.{self.block_attr}",
                )
            )
        return out


def _module_path(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise LookupError("module not inside model")


def router_bias_tensors(router: nn.Module, spec: RoutingSpec) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(logit bias, choice-only correction bias) of a router, where the spec says it has them."""
    logit_bias = router.bias if spec.router_bias else None
    correction = router.e_score_correction_bias if spec.correction_bias else None
    return logit_bias, correction


def reference_route(
    hidden: torch.Tensor,
    router_weight: torch.Tensor,
    spec: RoutingSpec,
    logit_bias: torch.Tensor | None = None,
    correction_bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch routing, written from the spec (not from transformers' code), in ``dtype``.

    Returns ``(weights, indices)`` of shape ``(tokens, top_k)``: the routing weight g_{i,t} of each chosen
    expert (ESFT eq. 2/3, extended by the family's renormalisation and scaling) and its index. Used by the
    tests as the independent reference for the statistics gathered from the live routers.
    """
    x = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    logits = x @ router_weight.to(dtype).T
    if logit_bias is not None:
        logits = logits + logit_bias.to(dtype)
    n_tok, n_exp = logits.shape
    if spec.scoring == "topk_softmax":
        top_logits, idx = torch.topk(logits, spec.top_k, dim=-1)
        weights = torch.softmax(top_logits, dim=-1)
        return weights * spec.scaling_factor, idx
    scores = torch.softmax(logits, dim=-1) if spec.scoring == "softmax" else torch.sigmoid(logits)
    choice = scores if correction_bias is None else scores + correction_bias.to(dtype)
    if spec.group_limited:
        groups = choice.view(n_tok, spec.n_group, n_exp // spec.n_group)
        if spec.group_score == "max":
            group_scores = groups.max(dim=-1).values
        else:
            group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(spec.topk_group, dim=-1).indices, True)
        keep = keep.unsqueeze(-1).expand_as(groups).reshape(n_tok, n_exp)
        # softmax scoring zeroes the dropped groups, sigmoid scoring forbids them: same choice either way
        choice = choice.masked_fill(~keep, float("-inf"))
    idx = torch.topk(choice, spec.top_k, dim=-1).indices
    weights = scores.gather(1, idx)
    if spec.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * spec.scaling_factor, idx
