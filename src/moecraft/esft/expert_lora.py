"""LoRA on the selected routed experts only (ESFT's selection + LoRA: MoE-Sieve, arXiv 2603.24044).

ESFT (:mod:`moecraft.esft.sparse`) splits each layer's experts into a trainable group [S, ...] (the selected
ones) and a frozen group. Here the selected group's weights are frozen too, and each of its fused weight
tensors gets per-expert low-rank factors: for expert s with weight W_s of shape [out, in] (or [in, out]
where the family stores experts transposed),

    W_s' = W_s + (alpha / r) * B_s @ A_s,      A_s: [r, in] (random), B_s: [out, r] (zeros)

(LoRA, Hu et al. 2021, eq. 3, applied per expert). B starts at zero, so the model equals the base at step 0
exactly. The forward builds W' for the S selected experts once per call and runs the model's own expert
kernel on it, so routing and reduction stay those of the unmodified model; autograd then reaches only A and
B: frozen and unselected experts get no adapter, no gradient and no optimiser state, and the selected
experts' own weights get no ``.grad`` either. The artifact holds A, B and the expert ids; loading folds
B @ A into the base rows (that is also the merge).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moecraft.errors import MoecraftError

ADAPTERS = "expert_lora.safetensors"
FORMAT = "moecraft.expert_lora/1"


class ExpertLoRA(nn.Module):
    """Per-expert LoRA factors for the fused weight tensors of one layer's selected experts.

    ``weights``: name -> the selected group's fused tensor [S, d0, d1] (biases are left alone); with
    ``transposed`` the tensor is [S, in, out] (GPT-OSS), else [S, out, in].
    """

    def __init__(self, weights: dict[str, torch.Tensor], rank: int, alpha: float, transposed: bool, seed: int = 0):
        super().__init__()
        if rank < 1:
            raise MoecraftError(f"expert LoRA rank must be >= 1, got {rank}")
        self.rank, self.alpha, self.transposed = int(rank), float(alpha), bool(transposed)
        self.scaling = self.alpha / self.rank
        self.names = sorted(weights)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        gen = torch.Generator().manual_seed(seed)
        for name in self.names:
            w = weights[name]
            s, d0, d1 = w.shape
            out_dim, in_dim = (d1, d0) if self.transposed else (d0, d1)
            # A as peft initialises it (kaiming-uniform, a = sqrt(5)): bound 1/sqrt(in); B zero
            bound = 1.0 / math.sqrt(in_dim)
            a = (torch.rand((s, self.rank, in_dim), generator=gen, dtype=torch.float32) * 2 - 1) * bound
            self.lora_A[name] = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
            self.lora_B[name] = nn.Parameter(torch.zeros((s, out_dim, self.rank), device=w.device, dtype=w.dtype))

    def delta(self, name: str) -> torch.Tensor:
        """(alpha / r) * B @ A for every selected expert, in the fused tensor's own layout [S, d0, d1]."""
        d = torch.bmm(self.lora_B[name], self.lora_A[name]) * self.scaling  # [S, out, in]
        return d.transpose(1, 2) if self.transposed else d


def attach(sparse_modules: dict, rank: int, alpha: float, seed: int = 0) -> None:
    """Freeze each SparseExperts' selected weights and give it an :class:`ExpertLoRA` (``.expert_lora``)."""
    for i, (_, sparse) in enumerate(sorted(sparse_modules.items())):
        group = sparse.trainable
        weights = {n: getattr(group, n) for n in sparse.param_names if getattr(group, n).dim() == 3}
        if not weights:
            raise MoecraftError(f"{type(group).__name__} holds no 3-D expert weights to adapt")
        for n in sparse.param_names:
            getattr(group, n).requires_grad_(False)
        sparse.expert_lora = ExpertLoRA(weights, rank, alpha, getattr(group, "is_transposed", False), seed + i)


def effective_group(group: nn.Module, lora: ExpertLoRA) -> nn.Module:
    """A shallow copy of ``group`` whose adapted tensors are W + delta (graph tensors, not Parameters)."""
    import copy

    sub = copy.copy(group)
    sub._parameters = dict(group._parameters)
    for name in lora.names:
        sub._parameters[name] = group._parameters[name] + lora.delta(name).to(group._parameters[name].dtype)
    return sub


def save(sparse_modules: dict, path: Path) -> None:
    """A, B of every adapted layer, keyed ``{experts path}.{tensor}.lora_A`` / ``.lora_B``, with the expert
    ids, rank, alpha and layout in the metadata."""
    tensors, meta = {}, {}
    for mpath, sparse in sparse_modules.items():
        lora = sparse.expert_lora
        for name in lora.names:
            for part in ("lora_A", "lora_B"):
                tensors[f"{mpath}.{name}.{part}"] = getattr(lora, part)[name].detach().to("cpu").contiguous().clone()
        meta[mpath] = {"experts": list(sparse.expert_ids), "rank": lora.rank, "alpha": lora.alpha,
                       "transposed": lora.transposed, "tensors": lora.names}
    save_file(tensors, str(path), metadata={"format": FORMAT, "layers": json.dumps(meta)})


@torch.no_grad()
def fold_into(model: nn.Module, path: Path) -> None:
    """Add (alpha / r) * B @ A of a saved adapter file to the selected rows of the base's fused tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        layers = json.loads(meta.get("layers", "{}"))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own type for a damaged file
        raise MoecraftError(f"{path}: not a readable expert-LoRA file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise MoecraftError(f"{path}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    params = dict(model.named_parameters())
    for mpath, info in layers.items():
        rows = torch.tensor(info["experts"], dtype=torch.long)
        scaling = float(info["alpha"]) / int(info["rank"])
        for name in info["tensors"]:
            key = f"{mpath}.{name}"
            if key not in params:
                raise MoecraftError(f"{path}: '{key}' does not exist in the base model (wrong base?)")
            a, b = tensors[f"{key}.lora_A"].float(), tensors[f"{key}.lora_B"].float()
            delta = torch.bmm(b, a) * scaling
            if info["transposed"]:
                delta = delta.transpose(1, 2)
            target = params[key]
            if rows.numel() != delta.shape[0] or tuple(delta.shape[1:]) != tuple(target.shape[1:]) \
                    or (rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= target.shape[0])):
                raise MoecraftError(f"{path}: adapter of '{key}' (experts {rows.tolist()}, shape "
                                    f"{tuple(delta.shape)}) does not fit the base tensor {tuple(target.shape)}")
            idx = rows.to(target.device)
            target[idx] = (target[idx].float() + delta.to(target.device)).to(target.dtype)
