"""``moecraft train`` under DeepSpeed, run by tests/test_deepspeed.py through ``accelerate launch`` (gloo, CPU).

Runs the command line exactly as ``python -m moecraft train ARGS`` does, then writes to REPORT what a run's
outputs cannot show: the frozen tensors as the engine holds them at the end (gathered from ZeRO-3
partitions) and, per process, which parameters DeepSpeed's optimiser holds and how many fp32 master
elements this process keeps of them.

    accelerate launch --config_file configs/accelerate/zero3.yaml tests/deepspeed_worker.py REPORT ARGS...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
from safetensors.torch import save_file

import moecraft.train.loop as loop
from moecraft.cli import main


def _master_partitions(optimizer) -> tuple[list, list]:
    """(parameter groups, this process's fp32 master partitions) of a ZeRO-1/2 or ZeRO-3 optimiser."""
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return optimizer.fp16_groups, optimizer.fp32_partitioned_groups_flat
    return optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups


def run(report: Path, argv: list[str]) -> int:
    accelerators, summaries = [], []
    make, train = loop.make_accelerator, loop.train
    loop.make_accelerator = lambda **options: accelerators.append(make(**options)) or accelerators[-1]
    # `moecraft train` imports the loop's train when it runs, so the patched one is what it calls
    loop.train = lambda cfg: summaries.append(train(cfg)) or summaries[-1]
    code = main(["train", *argv])
    if code or not summaries:
        return code or 1
    accelerator, model = accelerators[0], summaries[0]["model"]
    engine = accelerator.deepspeed_engine_wrapped.engine
    names = {id(p): n for n, p in model.named_parameters()}
    groups, masters = _master_partitions(engine.optimizer)
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in frozen]):  # a no-op below ZeRO-3
        tensors = {n: p.detach().clone().contiguous() for n, p in frozen}
    rank = accelerator.process_index
    if rank == 0:
        save_file(tensors, str(report / "frozen.safetensors"))
    (report / f"rank-{rank}.json").write_text(json.dumps({
        "world": accelerator.num_processes,
        "zero_stage": engine.zero_optimization_stage(),
        "optimizer_parameters": sorted(names[id(p)] for g in groups for p in g),
        "master_elements": sum(m.numel() for m in masters),
        "frozen_with_grad": [n for n, p in frozen if p.grad is not None],
    }))
    return 0


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    sys.exit(run(out, sys.argv[2:]))
