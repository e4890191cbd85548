"""A forward pre-hook shared by the distributed engines' MoE fixes (ZeRO-3 leaves, ESFT expert parallelism)."""

from __future__ import annotations

import torch
from torch import nn


def input_requires_grad(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: the module's floating-point inputs require grad while training.

    Used where backward must pass through a module even with nothing trained below it: a ZeRO-3 leaf
    (:func:`moecraft.train.distributed.mark_zero3_leaf_modules`), and ESFT's experts under expert parallelism,
    whose all-to-all backward is a collective every process must join (:mod:`moecraft.esft.expert_parallel`).

    ZeRO-3 reduces a leaf module's gradients in a full backward hook, which torch runs when the gradient of
    the module's *inputs* is ready. When no input requires grad (every layer below is frozen: ESFT's first
    MoE layer) torch runs it as soon as the output gradient arrives, before the module's own backward, so
    the experts' gradients are reduced as zeros and then land on released (empty) parameters. An input
    that requires grad restores the order at the cost of one input-gradient pass through that block.
    """
    if not (module.training and torch.is_grad_enabled()):
        return args, kwargs

    def fix(x: object) -> object:
        return x.detach().requires_grad_() if torch.is_tensor(x) and x.is_floating_point() \
            and not x.requires_grad else x

    return tuple(fix(a) for a in args), {k: fix(v) for k, v in kwargs.items()}
