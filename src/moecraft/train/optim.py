"""AdamW with fp32 master weights for bf16/fp16 trainable tensors.

A bf16 weight holds 8 significant bits: an update smaller than about 2^-9 of the weight rounds to nothing.
ESFT's learning rate (1e-5, paper §4.1) makes Adam steps of about 1e-5, far below that for most weights,
so training a bf16 model in place mostly does nothing. The cure used by every mixed-precision trainer is
an fp32 master copy: the update is applied to it, and the bf16 weight the model computes with is the
master rounded after every step. Only trainable tensors need one, which for ESFT is a few percent of
the model, whereas loading the whole model in fp32 (the other cure) doubles the frozen weights too.

The master lives in the optimiser state (``state[p]["master"]``) next to ``exp_avg`` and ``exp_avg_sq``,
so checkpoints keep it under the parameter's name like any optimiser state, whatever engine shards it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


class AdamWMaster(torch.optim.Optimizer):
    """``torch.optim.AdamW`` (its single-tensor update, operation for operation) on fp32 master weights.

    For an fp32 parameter the update is applied to the parameter itself (no master; bit-identical to
    ``torch.optim.AdamW(foreach=False)``). For a bf16/fp16 parameter, the moments and an fp32 master are
    kept in the state, the update is applied to the master with the fp32 gradient, and the parameter is set
    to the master rounded to its dtype.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        if lr < 0 or eps < 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or weight_decay < 0:
            raise ValueError(f"invalid AdamW settings lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def load_state_dict(self, state_dict: dict) -> None:
        """``Optimizer.load_state_dict``, except that the fp32 state stays fp32: torch casts floating-point
        state to its parameter's dtype, which would round the masters and moments of bf16 weights."""
        saved = {pid: {k: v for k, v in s.items() if torch.is_tensor(v) and k != "step"}
                 for pid, s in state_dict["state"].items()}
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(saved_ids, params):
            for key, value in saved.get(pid, {}).items():
                self.state[p][key] = value.to(device=p.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                           memory_format=torch.preserve_format)
                    if p.dtype in LOW_PRECISION:
                        state["master"] = p.detach().to(torch.float32, copy=True)
                weight = state.get("master", p)
                grad = p.grad.to(torch.float32)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                step = state["step"].item()
                weight.mul_(1 - lr * decay)  # decoupled weight decay
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1**step)
                denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
                weight.addcdiv_(exp_avg, denom, value=-step_size)
                if weight is not p:
                    p.copy_(weight)  # round to the parameter's dtype
        return loss


def has_low_precision(params: Iterable[torch.Tensor]) -> bool:
    return any(p.dtype in LOW_PRECISION for p in params)
