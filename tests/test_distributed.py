"""Several processes on CPU (gloo), through the code paths that run on GPUs: DDP via accelerate, FSDP2 shards.

Two processes with gradient accumulation g must train exactly like one process with 2g (same sequences,
same averaged gradient), checkpoints must hold whole tensors by name whatever wrote them, and resuming
must need the same number of processes.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from launchers import torchrun
from safetensors.torch import load_file

from moecraft.artifacts import load_artifact
from moecraft.errors import MoecraftError
from moecraft.models import tiny_model
from moecraft.train import TrainConfig, train
from moecraft.train.checkpoint import read_state

EXPERTS = {"1": [3, 7], "2": [0, 5, 9]}
# the all-reduce sums in another order than one process does; Adam's m/sqrt(v) scales that rounding up on
# near-zero gradients to ~1e-6 of a weight after a few steps
TOL = dict(rtol=1e-5, atol=1e-5)


def _expert_config(tmp_path: Path) -> str:
    path = tmp_path / "experts.json"
    path.write_text(json.dumps({"format": "moecraft.expert_config/1", "family": "deepseek_v2", "experts": EXPERTS}))
    return str(path)


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TOL, msg=name)


def test_two_processes_train_like_one_with_twice_the_accumulation(tmp_path):
    experts = _expert_config(tmp_path)
    common = dict(model="tiny:deepseek_v2", data="builtin:intent", method="esft", experts=experts, seq_len=128,
                  max_steps=3, eval_sequences=2, lr=1e-3, save_every=2, progress=False)
    one = train(TrainConfig(out=str(tmp_path / "one"), grad_accum=2, **common))
    two = tmp_path / "two"
    cli = ["-m", "moecraft", "train", "--model", "tiny:deepseek_v2", "--data", "builtin:intent", "--out", str(two),
           "--method", "esft", "--experts", experts, "--seq-len", "128", "--max-steps", "3", "--eval-sequences", "2",
           "--lr", "1e-3", "--save-every", "2", "--progress", "false"]
    torchrun(*cli)

    manifest = json.loads((two / "artifact.json").read_text())
    assert (manifest["processes"], manifest["engine"]) == (2, "MULTI_CPU")
    _assert_same_tensors(load_file(two / "trained.safetensors"), load_file(tmp_path / "one" / "trained.safetensors"))
    # the step-2 checkpoints: whole tensors and optimiser state by name, loadable on one device
    ck1, ck2 = tmp_path / "one" / "checkpoint", two / "checkpoint"
    _assert_same_tensors(load_file(ck2 / "trainable.safetensors"), load_file(ck1 / "trainable.safetensors"))
    opt1, opt2 = (read_state(p, "optimizer")["state"] for p in (ck1, ck2))
    assert sorted(opt2) == sorted(opt1) and all(".trainable." in name for name in opt2)
    for name in opt1:
        _assert_same_tensors(opt2[name], opt1[name])
    eval_two = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()][-1]["eval_loss"]
    assert eval_two == pytest.approx(one["eval_loss"], rel=1e-5)
    ids = torch.arange(5, 60).unsqueeze(0)
    with torch.no_grad():
        logits = load_artifact(tiny_model("deepseek_v2"), two)(ids).logits
        reference = load_artifact(tiny_model("deepseek_v2"), tmp_path / "one")(ids).logits
    torch.testing.assert_close(logits, reference, **TOL)

    # resuming from the step-2 checkpoint on two processes redoes step 3 exactly
    first = load_file(two / "trained.safetensors")
    torchrun(*cli, "--resume")
    for name, t in load_file(two / "trained.safetensors").items():
        assert torch.equal(t, first[name]), name
    # ... and needs two processes
    with pytest.raises(MoecraftError, match="written by 2 process"):
        train(TrainConfig(out=str(two), resume=True, **common))


def _fsdp2_worker():
    spec = importlib.util.spec_from_file_location("fsdp2_worker", Path(__file__).with_name("fsdp2_worker.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fsdp2_shards_train_like_one_process_and_save_whole_tensors(tmp_path):
    # accelerate runs FSDP only on accelerators; the worker drives torch's fully_shard with the loop's pieces
    experts = _expert_config(tmp_path)
    torchrun(str(Path(__file__).with_name("fsdp2_worker.py")), str(tmp_path / "two"), experts)
    _fsdp2_worker().run(tmp_path / "one", experts)

    two = json.loads((tmp_path / "two" / "report.json").read_text())
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert two["world"] == 2 and two["unsharded_trainable"] == []  # every trainable tensor was an FSDP2 shard
    assert two["frozen_with_grad"] == [] and two["round_trip"]
    assert two["optimizer_state_tensors"] == one["optimizer_state_tensors"]
    assert all(".trainable." in name for name in two["optimizer_state_tensors"])  # frozen experts hold no state
    for name in ("trainable.safetensors", "artifact/trained.safetensors"):
        _assert_same_tensors(load_file(tmp_path / "two" / name), load_file(tmp_path / "one" / name))
    opt1, opt2 = (read_state(tmp_path / d, "optimizer")["state"] for d in ("one", "two"))
    for name in opt1:
        _assert_same_tensors(opt2[name], opt1[name])


def test_fsdp2_bf16_shards_keep_fp32_masters_through_a_state_round_trip(tmp_path):
    """bf16 trainable experts under FSDP2: the loop's AdamWMaster keeps (sharded) fp32 masters; the full
    optimiser state gathers them and reloads them as fp32 (not cast to the parameters' bf16)."""
    experts = _expert_config(tmp_path)
    torchrun(str(Path(__file__).with_name("fsdp2_worker.py")), str(tmp_path / "two"), experts, "bf16")
    _fsdp2_worker().run(tmp_path / "one", experts, bf16=True)
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["round_trip"] and two["unsharded_trainable"] == [] and two["frozen_with_grad"] == []
    opt1, opt2 = (read_state(tmp_path / d, "optimizer")["state"] for d in ("one", "two"))
    assert sorted(opt1) == sorted(opt2) and opt1
    for name in opt1:
        master1, master2 = opt1[name]["master"], opt2[name]["master"]
        assert master1.dtype == master2.dtype == torch.float32
        # bf16 gradients, reduced in another order, flip the sign of Adam's step on near-zero ones: each run
        # moves a weight at most lr per step, so the two runs agree to 2 * lr * steps
        torch.testing.assert_close(master2, master1, rtol=0, atol=2 * 1e-3 * 3)
        # the bf16 weight the model computes with is its master rounded
        torch.testing.assert_close(load_file(tmp_path / "two" / "trainable.safetensors")[name], master2.bfloat16(),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("name, engine, detail", [("ddp", "MULTI_GPU", None), ("fsdp2", "FSDP", 2),
                                                  ("zero2", "DEEPSPEED", 2), ("zero3", "DEEPSPEED", 3)])
def test_ready_accelerate_configs_load_and_are_documented(name, engine, detail):
    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).parents[1]
    config = load_config_from_file(str(root / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == engine
    if engine == "FSDP":
        assert config.fsdp_config["fsdp_version"] == detail
    if engine == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == detail
    assert f"accelerate launch --config_file configs/accelerate/{name}.yaml -m moecraft train" in \
        (root / "docs" / "distributed.md").read_text()


def test_zero3_leaf_modules_are_the_moe_blocks():
    from moecraft.families import moe_layers
    from moecraft.pesc import CraftConfig, craft_model
    from moecraft.pesc.layer import PescMoE
    from moecraft.train.distributed import moe_block_classes

    for kind in ("deepseek_v2", "qwen3_moe", "mixtral", "gpt_oss"):
        model = tiny_model(kind)
        assert moe_block_classes(model) == [type(moe_layers(model)[0].block)]
    crafted = craft_model(tiny_model("llama"), CraftConfig(num_experts=2, top_k=1, adapter_dim=4))
    assert moe_block_classes(crafted) == [PescMoE]
    assert moe_block_classes(tiny_model("llama")) == []
