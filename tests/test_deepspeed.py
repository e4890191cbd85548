"""DeepSpeed ZeRO-2 and ZeRO-3 for real: two CPU processes (gloo) started by ``accelerate launch`` with the ready
configs in configs/accelerate/, running ``moecraft train`` (tests/deepspeed_worker.py runs the command line
and reports what the engine holds at the end).

Two processes with ``--grad-accum 2`` must train exactly like one plain process with 4 (the same sequences,
the same averaged gradient; the data layout is the loop's, see docs/distributed.md); frozen experts must end
bit-identical to the base and never reach DeepSpeed's optimiser; the ZeRO-3 checkpoint must load on one
device and ``--resume`` must continue from it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from launchers import run_launcher
from safetensors.torch import load_file

from moecraft.artifacts import load_artifact
from moecraft.methods import get_method
from moecraft.models import load_model, tiny_model
from moecraft.train import TrainConfig, train

# imported only by the processes that use it, so the rest of the suite runs without DeepSpeed loaded
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="DeepSpeed is not installed (make install, or pip install -e '.[deepspeed]')")

ROOT = Path(__file__).parents[1]
WORKER = Path(__file__).with_name("deepspeed_worker.py")
EXPERTS = {"1": [3, 7], "2": [0, 5, 9]}
# the engines reduce gradients in another order than one process sums its micro-batches (measured: at most
# 6e-8 off on weights of ~0.09 after 3 steps); Adam's m/sqrt(v) can scale such rounding up on near-zero
# gradients, so the DDP test's 1e-5 is kept. Not running the accumulation right is 4e-3 off.
TOL = dict(rtol=1e-5, atol=1e-5)
LAUNCH_TIMEOUT = 240  # s; one launch takes ~12 s on 2 cores, so this only fires on a hang
ARGS = ["--model", "tiny:deepseek_v2", "--data", "builtin:intent", "--method", "esft", "--seq-len", "128",
        "--max-steps", "3", "--eval-sequences", "2", "--lr", "1e-3", "--save-every", "2", "--progress", "false",
        "--grad-accum", "2"]


def _launch(config: str, report: Path, *args: str) -> str:
    """``accelerate launch`` the worker on 2 processes; the whole process group is killed on a hang."""
    cmd = ["-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / config), "--num_processes", "2", "--mixed_precision", "no",
           "--gradient_accumulation_steps", "2", "--main_process_port", "0", str(WORKER), str(report), *args]
    return run_launcher(cmd, LAUNCH_TIMEOUT, what=f"accelerate launch with {config}")


def _assert_close(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TOL, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("deepspeed")
    experts = tmp / "experts.json"
    experts.write_text(json.dumps({"format": "moecraft.expert_config/1", "family": "deepseek_v2",
                                   "experts": EXPERTS}))
    common = [*ARGS, "--experts", str(experts)]
    cfg = TrainConfig(model="tiny:deepseek_v2", data="builtin:intent", method="esft", experts=str(experts),
                      seq_len=128, max_steps=3, eval_sequences=2, lr=1e-3, save_every=2, progress=False,
                      out=str(tmp / "one"), grad_accum=4)
    one = train(cfg)
    for stage in (2, 3):
        _launch(f"zero{stage}.yaml", tmp / f"report{stage}", *common, "--out", str(tmp / f"zero{stage}"))
    return {"tmp": tmp, "cfg": cfg, "common": common, "one": one}


@pytest.mark.parametrize("stage", [2, 3])
def test_two_zero_processes_train_like_one_with_twice_the_accumulation(runs, stage):
    tmp, out = runs["tmp"], runs["tmp"] / f"zero{stage}"
    manifest = json.loads((out / "artifact.json").read_text())
    assert (manifest["processes"], manifest["engine"]) == (2, "DEEPSPEED")
    report = json.loads((tmp / f"report{stage}" / "rank-0.json").read_text())
    assert (report["world"], report["zero_stage"]) == (2, stage)
    _assert_close(load_file(out / "trained.safetensors"), load_file(tmp / "one" / "trained.safetensors"))
    _assert_close(load_file(out / "checkpoint" / "trainable.safetensors"),  # the step-2 checkpoint, whole tensors
                  load_file(tmp / "one" / "checkpoint" / "trainable.safetensors"))
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (tmp / "one" / "metrics.jsonl").read_text().splitlines()]
    for got, want in zip(metrics[:3], reference[:3], strict=True):  # loss, lr and the engine's gradient norm
        assert got["lr"] == want["lr"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    assert metrics[-1]["eval_loss"] == pytest.approx(runs["one"]["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_frozen_experts_stay_frozen_and_only_trainable_tensors_reach_the_optimizer(runs, stage):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tmp = runs["tmp"]
    base, _ = load_model("tiny:deepseek_v2", dtype=torch.float32)
    base = get_method("esft").prepare(base, runs["cfg"])
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in base.named_parameters() if not p.requires_grad}
    assert any(".experts.frozen." in n for n in frozen)
    held = load_file(tmp / f"report{stage}" / "frozen.safetensors")  # as the engine held them after training
    assert sorted(held) == sorted(frozen)
    for name, t in held.items():
        assert torch.equal(t, frozen[name]), name
    n_trainable = sum(p.numel() for p in base.parameters() if p.requires_grad)
    reports = [json.loads((tmp / f"report{stage}" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert sorted(report["optimizer_parameters"]) == sorted(trainable)
        assert report["frozen_with_grad"] == []
        assert report["master_elements"] == n_trainable // 2  # fp32 master weights and Adam state are split
    # the engine's own checkpoint holds the trainable tensors only, and they are the checkpoint's
    ckpt = tmp / f"zero{stage}" / "checkpoint"
    engine = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "deepspeed"), tag="engine",
                                                      exclude_frozen_parameters=True)
    assert sorted(engine) == sorted(trainable)
    for name, t in load_file(ckpt / "trainable.safetensors").items():
        assert torch.equal(engine[name].detach(), t), name


def test_zero3_checkpoint_loads_on_one_device_and_resumes(runs):
    tmp, zero3 = runs["tmp"], runs["tmp"] / "zero3"
    ids = torch.arange(5, 60).unsqueeze(0)
    with torch.no_grad():  # the artifact of the sharded run, on one process
        logits = load_artifact(tiny_model("deepseek_v2"), zero3)(ids).logits
        reference = load_artifact(tiny_model("deepseek_v2"), tmp / "one")(ids).logits
    torch.testing.assert_close(logits, reference, **TOL)

    # the step-2 checkpoint alone, in a new folder: --resume redoes step 3 exactly
    resumed = tmp / "resumed"
    shutil.copytree(zero3 / "checkpoint", resumed / "checkpoint")
    out = _launch("zero3.yaml", tmp / "report-resumed", *runs["common"], "--out", str(resumed), "--resume")
    assert f"resuming from {resumed / 'checkpoint'} at step 2" in out
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 3]  # step 3 and the final eval: nothing before the checkpoint was redone
    uninterrupted = load_file(zero3 / "trained.safetensors")
    for name, t in load_file(resumed / "trained.safetensors").items():
        assert torch.equal(t, uninterrupted[name]), name
