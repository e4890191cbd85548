"""The PESC layer: a dense FFN turned into a top-k mixture of parameter-efficient experts.

This module imports only ``torch``: its source is copied verbatim into the ``trust_remote_code``
modeling file of exported adapter-kind checkpoints (:mod:`moecraft.pesc.export`), so keep it that way.

Two expert kinds (PESC, arXiv 2401.02731, Sec. 3; the reference code's layer):

* ``adapter``: y = FFN(x) is computed once per token and shared; expert i is the bottleneck adapter
  A_i(y) = s * W_up,i GELU(W_down,i dropout(y)) and the layer returns y + sum_{i in topk} w_i A_i(y).
* ``lora`` (MixLoRA-style): expert i is the FFN with LoRA deltas on its projections,
  E_i(x) = (W_d + s B_d,i A_d,i) [act((W_g + s B_g,i A_g,i) x) * (W_u + s B_u,i A_u,i) x]; the layer
  returns sum_{i in topk} w_i E_i(x). The base products W_g x, W_u x are computed once per token and,
  by linearity, W_d is applied once to sum_i w_i h_i.

Routing (both kinds): logits = W_r x (bias-free), w = softmax over the top-k logits, which equals
Mixtral's top-k of the full softmax renormalised. Up/B matrices start at zero, so at step 0 the layer
equals the dense FFN. Experts run as grouped matrix products over token-expert pairs sorted by expert
(``torch._grouped_mm`` on CUDA, a padded ``bmm`` elsewhere), never a Python loop over experts.

Load balancing: the Switch Transformer loss (Fedus et al. 2021, eq. 4-6), :func:`switch_loss`, over the
real tokens of the last forward only (padding excluded through ``token_mask``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    # Softmax in float32 for half types (as Mixtral's router does); float64 stays float64.
    return t.float() if t.element_size() < 4 else t


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    # torch._grouped_mm is CUDA-only in practice (the CPU kernel rejects ordinary strides) and needs
    # 16-byte aligned rows.
    if not (x.is_cuda and hasattr(torch, "_grouped_mm")) or x.dtype not in (torch.bfloat16,):
        return False
    el = x.element_size()
    return (x.shape[-1] * el) % 16 == 0 and (w.shape[-1] * el) % 16 == 0


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [M, d_in] sorted by group, group g has ``counts[g]`` rows; returns x_g @ w[g] [M, d_out].

    Uses ``torch._grouped_mm`` where it works, else scatters the groups into a padded [G, C, d_in]
    batch (C = largest group) for one ``bmm``.
    """
    offsets = torch.cumsum(counts, 0)
    if _grouped_mm_ok(x, w):
        return torch._grouped_mm(x.contiguous(), w, offs=offsets.to(torch.int32))
    groups = w.shape[0]
    cap = int(counts.max().item()) if x.shape[0] else 0
    starts = offsets - counts
    group_of_row = torch.repeat_interleave(torch.arange(groups, device=x.device), counts, output_size=x.shape[0])
    slot = group_of_row * cap + (torch.arange(x.shape[0], device=x.device) - starts[group_of_row])
    padded = x.new_zeros(groups * cap, x.shape[1]).index_copy(0, slot, x)
    out = torch.bmm(padded.view(groups, cap, x.shape[1]), w)
    return out.reshape(groups * cap, w.shape[-1]).index_select(0, slot)


class AdapterExperts(nn.Module):
    """E bottleneck adapters, stored stacked for grouped products: ``down`` [E, H, r], ``up`` [E, r, H]."""

    def __init__(self, num_experts: int, hidden: int, rank: int, dtype=None, device=None):
        super().__init__()
        self.down = nn.Parameter(torch.empty(num_experts, hidden, rank, dtype=dtype, device=device))
        self.up = nn.Parameter(torch.zeros(num_experts, rank, hidden, dtype=dtype, device=device))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # nn.Linear's default (kaiming-uniform, a=sqrt(5)) bound for the down projection; up = 0.
        bound = 1.0 / math.sqrt(self.down.shape[1])
        with torch.no_grad():
            self.down.copy_(torch.empty(self.down.shape).uniform_(-bound, bound, generator=generator))
            self.up.zero_()


class LoraExperts(nn.Module):
    """E LoRA deltas on gate/up/down. A's stored transposed for grouped products:
    ``gate_up_A`` [E, H, 2r] (gate then up), ``gate_B``/``up_B`` [E, r, I], ``down_A`` [E, I, r],
    ``down_B`` [E, r, H]; the delta of projection p for expert e, as an nn.Linear weight, is
    s * (A_p[e] @ B_p[e]).T."""

    def __init__(self, num_experts: int, hidden: int, inter: int, rank: int, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.gate_up_A = nn.Parameter(torch.empty(num_experts, hidden, 2 * rank, **kw))
        self.gate_B = nn.Parameter(torch.zeros(num_experts, rank, inter, **kw))
        self.up_B = nn.Parameter(torch.zeros(num_experts, rank, inter, **kw))
        self.down_A = nn.Parameter(torch.empty(num_experts, inter, rank, **kw))
        self.down_B = nn.Parameter(torch.zeros(num_experts, rank, hidden, **kw))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            for a in (self.gate_up_A, self.down_A):
                bound = 1.0 / math.sqrt(a.shape[1])
                a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=generator))
            for b in (self.gate_B, self.up_B, self.down_B):
                b.zero_()


def switch_loss(
    logits: torch.Tensor, idx: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, f) of the Switch load-balancing loss, Switch Transformer eq. 4-6: loss = E * sum_i f_i P_i.

    Over the T real tokens (``mask`` [N] != 0, all N tokens without a mask): f_i is the share of their
    T*k top-k slots (``idx`` [N, k]) that pick expert i, P_i the mean over them of the softmax of
    ``logits`` [N, E] over all experts. f is a count (no gradient); P carries the router gradient. With
    no real token the loss is a zero that keeps the graph (every process joins the all-reduce).
    """
    n, k = idx.shape
    probs = torch.softmax(_at_least_fp32(logits), dim=-1)
    slots = F.one_hot(idx, num_experts).sum(1).to(probs.dtype)  # [N, E]: top-k slots of each token per expert
    if mask is not None:
        if mask.numel() != n:
            raise ValueError(f"token_mask has {mask.numel()} entries for {n} routed tokens")
        # weights, not boolean indexing: no host sync, and sums are deterministic (bincount weights are not on CUDA)
        m = mask.reshape(-1, 1).to(probs.dtype)
        slots, probs = slots * m, probs * m
    real = slots.sum() / k  # T
    usage = slots.sum(0) / (real * k).clamp(min=1)
    p_mean = probs.sum(0) / real.clamp(min=1)
    return num_experts * torch.sum(usage * p_mean), usage


class PescMoE(nn.Module):
    """Replaces a decoder layer's FFN (kept as ``self.ffn``, not copied) by a PESC mixture.

    After each forward, ``last_aux_loss`` is the Switch load-balancing loss of its tokens and
    ``last_usage`` the detached f (see :func:`switch_loss`). ``token_mask`` ([batch, seq], 1 = real token),
    when set, marks the tokens that count; a crafted model sets it from its ``attention_mask`` on every
    forward (:func:`moecraft.pesc.craft.craft_model`), so padding never enters f or P.
    """

    def __init__(
        self,
        ffn: nn.Module,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int = 8,
        top_k: int = 2,
        rank: int = 512,
        scaling: float = 0.25,
        dropout: float = 0.0,
        expert: str = "adapter",
        proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
        act_name: str = "act_fn",
        dtype=None,
        device=None,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.ffn = ffn
        self.num_experts, self.top_k, self.rank, self.scaling = num_experts, top_k, rank, scaling
        self.expert_kind = expert
        self.proj_names, self.act_name = tuple(proj_names), act_name
        self.dropout = nn.Dropout(dropout)
        self.router = nn.Linear(hidden_size, num_experts, bias=False, dtype=dtype, device=device)
        if expert == "adapter":
            self.experts = AdapterExperts(num_experts, hidden_size, rank, dtype=dtype, device=device)
        elif expert == "lora":
            self.experts = LoraExperts(num_experts, hidden_size, intermediate_size, rank, dtype=dtype, device=device)
        else:
            raise ValueError(f"unknown expert kind {expert!r}; choose 'adapter' or 'lora'")
        self.token_mask: torch.Tensor | None = None
        # (router logits [N, E], top-k indices [N, k], token mask [N] or None) of the last forward. The loss
        # is computed from these when asked for, outside any checkpointed region: generation never pays
        # for it, and recomputation under gradient checkpointing cannot see another forward's mask.
        self._routing: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        bound = 1.0 / math.sqrt(self.router.weight.shape[1])
        with torch.no_grad():
            w = self.router.weight
            w.copy_(torch.empty(w.shape).uniform_(-bound, bound, generator=generator))
        self.experts.reset_parameters(generator)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits [N, E], top-k weights [N, k] = softmax of the top-k logits, indices [N, k])."""
        logits = self.router(x.to(self.router.weight.dtype))  # no-op unless a QLoRA base runs in fp32
        top_logits, idx = logits.topk(self.top_k, dim=-1)
        return logits, torch.softmax(_at_least_fp32(top_logits), dim=-1), idx

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        n, k, e = x.shape[0], self.top_k, self.num_experts
        logits, weights, idx = self.route(x)
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)  # token-expert slots grouped by expert
        token = order // k
        counts = torch.bincount(flat, minlength=e)
        slot_w = weights.reshape(-1)[order].to(x.dtype).unsqueeze(-1)

        mask = self.token_mask
        self._routing = (logits, idx, None if mask is None else mask.reshape(-1))

        if self.expert_kind == "adapter":
            y = self.ffn(x)
            ys = self.dropout(y.index_select(0, token)).to(self.experts.down.dtype)
            h = F.gelu(grouped_mm(ys, self.experts.down, counts))
            delta = grouped_mm(h, self.experts.up, counts).to(y.dtype) * (self.scaling * slot_w)
            out = y + self._unsort_sum(delta, order, n)
        else:
            gate, up, down = (getattr(self.ffn, p) for p in self.proj_names)
            act = getattr(self.ffn, self.act_name)
            ex, r = self.experts, self.rank
            a = grouped_mm(self.dropout(x.index_select(0, token)), ex.gate_up_A, counts)
            dg = grouped_mm(a[:, :r].contiguous(), ex.gate_B, counts)
            du = grouped_mm(a[:, r:].contiguous(), ex.up_B, counts)
            h = act(gate(x).index_select(0, token) + self.scaling * dg) * (up(x).index_select(0, token) + self.scaling * du)
            hw = h * slot_w
            hsum = self._unsort_sum(hw, order, n)
            dd = grouped_mm(grouped_mm(self.dropout(hw), ex.down_A, counts), ex.down_B, counts)
            out = down(hsum) + self.scaling * self._unsort_sum(dd, order, n)
        return out.reshape(*shape[:-1], out.shape[-1])

    @property
    def last_aux_loss(self) -> torch.Tensor | None:
        """Switch loss E * sum_i f_i P_i of the last forward's real tokens (None before any forward)."""
        return None if self._routing is None else self._switch()[0]

    @property
    def last_usage(self) -> torch.Tensor | None:
        """f of the last forward: each expert's share of the real tokens' top-k slots (detached)."""
        return None if self._routing is None else self._switch()[1].detach()

    def _switch(self) -> tuple[torch.Tensor, torch.Tensor]:
        logits, idx, mask = self._routing
        return switch_loss(logits, idx, self.num_experts, mask)

    def _unsort_sum(self, values: torch.Tensor, order: torch.Tensor, n: int) -> torch.Tensor:
        # Put slots back in (token, k) order and sum over k: deterministic, unlike index_add on CUDA.
        full = values.new_empty(values.shape).index_copy(0, order, values)
        return full.view(n, self.top_k, -1).sum(1)
