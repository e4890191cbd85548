"""ESFT training on FSDP2 shards, run by tests/test_distributed.py (``torchrun --nproc_per_node 2``, gloo, CPU).

accelerate only runs FSDP on accelerators, so this drives torch's ``fully_shard`` directly, with the same
pieces the training loop uses under FSDP2: ESFT's sparse experts (frozen and trainable tensors in one
FSDP unit), the optimiser groups of the method, ``optimizer_state`` / ``load_optimizer_state``, and
``gathered`` with ``trainable_tensors`` and the method's save, as checkpoints and artifacts are written. With one process (imported by the
test) it is the unsharded reference.

    python tests/fsdp2_worker.py OUT EXPERT_CONFIG [bf16]

``bf16``: the model in bfloat16 and the loop's optimiser for it, AdamW with fp32 master weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from moecraft.methods import get_method
from moecraft.models import tiny_model
from moecraft.train.checkpoint import load_optimizer_state, optimizer_state, trainable_tensors, write_state
from moecraft.train.distributed import gathered
from moecraft.train.optim import AdamWMaster

STEPS, ROWS_PER_RANK, SEQ = 3, 2, 24


def batch(step: int, rows: slice) -> torch.Tensor:
    """Token ids of one global batch (the same on every process); each process takes its ``rows``."""
    g = torch.Generator().manual_seed(step)
    return torch.randint(3, 250, (2 * ROWS_PER_RANK, SEQ), generator=g)[rows]


def run(out: Path, experts: str, rank: int = 0, world: int = 1, bf16: bool = False) -> None:
    esft = get_method("esft")
    cfg = SimpleNamespace(experts=experts, train_shared_experts=None, train_non_expert_modules=None)
    base = tiny_model("deepseek_v2", seed=0).to(torch.bfloat16 if bf16 else torch.float32)
    model = esft.prepare(base, cfg).train()
    adamw = AdamWMaster if bf16 else torch.optim.AdamW
    sharded = world > 1
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:  # one unit per decoder layer, as accelerate's TRANSFORMER_BASED_WRAP
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = adamw(esft.param_groups(model, 0.1), lr=1e-3)
    rows = slice(rank * (2 * ROWS_PER_RANK // world), (rank + 1) * (2 * ROWS_PER_RANK // world))
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        ids = batch(step, rows)
        model(input_ids=ids, labels=ids).loss.backward()  # FSDP2 averages gradients over processes
        optimizer.step()

    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    state = optimizer_state(model, optimizer, sharded)  # full, by name (a collective)
    fresh = adamw(esft.param_groups(model, 0.1), lr=1e-3)
    load_optimizer_state(model, fresh, state, sharded)
    reloaded = optimizer_state(model, fresh, sharded)
    round_trip = rank != 0 or all(torch.equal(reloaded["state"][n][k], v) and reloaded["state"][n][k].dtype == v.dtype
                                  for n, s in state["state"].items()
                                  for k, v in s.items() if torch.is_tensor(v))  # full state lives on process 0
    with gathered(model):  # a collective: FSDP2 swaps the whole tensors in
        if rank == 0:
            tensors = trainable_tensors(model)
            (out / "artifact").mkdir(parents=True, exist_ok=True)
            esft.save(model, out / "artifact", cfg)
    if rank == 0:
        save_file(tensors, str(out / "trainable.safetensors"))
        write_state(out, "optimizer", state)
        plain = [n for n, p in model.named_parameters() if p.requires_grad and not hasattr(p, "full_tensor")]
        (out / "report.json").write_text(json.dumps({
            "world": world, "frozen_with_grad": frozen_with_grad, "round_trip": round_trip,
            "optimizer_state_tensors": sorted(state["state"]), "unsharded_trainable": plain}))


if __name__ == "__main__":
    dist.init_process_group("gloo")
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    run(out_dir, sys.argv[2], dist.get_rank(), int(os.environ["WORLD_SIZE"]), bf16=sys.argv[3:] == ["bf16"])
    dist.destroy_process_group()
