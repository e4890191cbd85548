"""A run never loses work: kill -9 at random moments then --resume, corrupted checkpoints, NaN, OOM, empty batches."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from moecraft.errors import MoecraftError
from moecraft.methods import ExtraLoss, get_method
from moecraft.models import byte_tokenizer
from moecraft.train import TrainConfig, train
from moecraft.train.checkpoint import CorruptCheckpointError, find_checkpoint, verify
from moecraft.train.loop import _micro_batch, build_data

SAVE_EVERY = 2


def _experts(tmp_path) -> str:
    path = tmp_path / "experts.json"
    path.write_text(json.dumps({"format": "moecraft.expert_config/1", "family": "deepseek_v2",
                                "experts": {"1": [3, 7], "2": [0, 5, 9]}}))
    return str(path)


def _options(tmp_path, max_steps: int) -> dict:
    return dict(model="tiny:deepseek_v2", data="builtin:intent", method="esft", experts=_experts(tmp_path),
                seq_len=128, batch_size=2, max_steps=max_steps, eval_sequences=2, lr=1e-3, warmup_steps=2,
                save_every=SAVE_EVERY, progress=False)


def _cli(options: dict, out) -> list[str]:
    args = [sys.executable, "-m", "moecraft", "train", "--out", str(out)]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def _steps_logged(out) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _checkpoint_step(out) -> int:
    ckpt = find_checkpoint(out)
    return verify(ckpt)["step"] if ckpt else 0


def _run_and_kill(cmd: list[str], out, after_steps: int, rng: random.Random) -> int:
    """Start ``cmd``, SIGKILL it a random moment after ``after_steps`` steps were logged; the last step logged."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while _steps_logged(out) < after_steps and proc.poll() is None:
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.05))  # anywhere in the next few steps (~15 ms each), checkpoint writes included
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    return _steps_logged(out)


def test_kill_9_at_random_moments_then_resume_ends_equal_to_an_uninterrupted_run(tmp_path, capsys):
    # deterministic: two CPU threads may otherwise sum in another order from one run to the next
    options = {**_options(tmp_path, max_steps=16), "deterministic": True}
    reference = load_file(train(TrainConfig(out=str(tmp_path / "reference"), **options))["out"]
                          + "/trained.safetensors")
    for seed in range(3):
        rng = random.Random(seed)
        out = tmp_path / f"killed{seed}"
        cmd = _cli(options, out)
        done = 0
        for _ in range(1 + seed % 2):  # seed 1 is killed twice, the second time while resuming
            # a killed run's folder is not empty, so a new run into it needs --resume even before a checkpoint
            logged = _run_and_kill(cmd + ["--resume", "true"] if out.exists() else cmd, out, rng.randint(done + 1, 11),
                                   rng)
            saved = _checkpoint_step(out)
            assert logged - saved <= SAVE_EVERY, (logged, saved)  # at most one save interval is lost
            done = saved
        capsys.readouterr()
        train(TrainConfig(out=str(out), resume=True, **options))
        assert (f"resuming from {out}/checkpoint at step {done}" in capsys.readouterr().out) == (done > 0)
        for name, tensor in load_file(out / "trained.safetensors").items():
            assert torch.equal(tensor, reference[name]), (seed, name)
        steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps[:-1] == list(range(1, 17))  # one line per step, nothing lost or doubled, then the final eval


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A run stopped after step 3 whose last checkpoint is step 2, and its uninterrupted twin."""
    root = tmp_path_factory.mktemp("ckpt")
    options = _options(root, max_steps=4)
    reference = train(TrainConfig(out=str(root / "reference"), **options))
    train(TrainConfig(out=str(root / "stopped"), **options), stop_after=3)
    return root, options, load_file(root / "reference" / "trained.safetensors"), reference


def _copy(root, name):
    shutil.copytree(root / "stopped", root / name)
    return root / name


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "no_manifest", "extra_file", "bad_manifest"])
def test_damaged_checkpoint_is_reported_and_kept(checkpointed, damage):
    root, options, _, _ = checkpointed
    out = _copy(root, f"damaged_{damage}")
    ckpt = out / "checkpoint"
    if damage == "flip_byte":
        data = bytearray((ckpt / "trainable.safetensors").read_bytes())
        data[-5] ^= 0x01
        (ckpt / "trainable.safetensors").write_bytes(bytes(data))
        match = "trainable.safetensors does not match its sha256"
    elif damage == "truncate":
        data = (ckpt / "optimizer.safetensors").read_bytes()
        (ckpt / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
        match = "optimizer.safetensors does not match its sha256"
    elif damage == "no_manifest":
        (ckpt / "manifest.json").unlink()
        match = "partial checkpoint"
    elif damage == "extra_file":
        (ckpt / "stray.bin").write_bytes(b"x")
        match = "unexpected stray.bin"
    else:
        (ckpt / "manifest.json").write_text("{not json")
        match = "manifest.json is unreadable"
    before = sorted((p.name, p.stat().st_size) for p in ckpt.iterdir())
    with pytest.raises(CorruptCheckpointError, match=match):
        train(TrainConfig(out=str(out), resume=True, **options))
    assert sorted((p.name, p.stat().st_size) for p in ckpt.iterdir()) == before  # reported, not deleted
    assert not (out / "artifact.json").exists()


def test_resume_with_other_settings_is_refused(checkpointed):
    root, options, _, _ = checkpointed
    out = _copy(root, "changed")
    with pytest.raises(MoecraftError, match=r"other settings \(lr\)"):
        train(TrainConfig(out=str(out), resume=True, **{**options, "lr": 2e-3}))


def test_nan_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(checkpointed, monkeypatch):
    root, options, reference, _ = checkpointed
    out = root / "nan"
    esft = type(get_method("esft"))
    calls = {"n": 0}

    def nan_on_step_3(self, model):
        calls["n"] += 1
        return ExtraLoss(torch.tensor(float("nan")) if calls["n"] == 3 else None, {})

    monkeypatch.setattr(esft, "extra_loss", nan_on_step_3)
    with pytest.raises(MoecraftError, match=r"training loss is nan at step 3.*last good checkpoint is kept in"):
        train(TrainConfig(out=str(out), **options))
    assert verify(out / "checkpoint")["step"] == 2 and not (out / "artifact.json").exists()
    monkeypatch.undo()
    train(TrainConfig(out=str(out), resume=True, **options))  # the kept checkpoint finishes the run exactly
    for name, tensor in load_file(out / "trained.safetensors").items():
        assert torch.equal(tensor, reference[name]), name


def test_out_of_memory_gives_advice(tmp_path, monkeypatch):
    def oom(self, model):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(type(get_method("esft")), "extra_loss", oom)
    with pytest.raises(MoecraftError, match="out of memory at step 1") as info:
        train(TrainConfig(out=str(tmp_path / "oom"), **_options(tmp_path, max_steps=2)))
    for advice in ("--batch-size (now 2)", "--grad-accum", "--seq-len (now 128)", "--gradient-checkpointing"):
        assert advice in str(info.value)


def test_micro_batches_without_target_tokens_count_as_zero_not_nan(tmp_path):
    # long prompts cut into 32-token sequences: most sequences hold no response token at all
    data = tmp_path / "long_prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i} " * 12, "response": "ok"}) + "\n"
                            for i in range(12)))
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text(json.dumps({"prompt": "q", "response": "a short answer"}) + "\n")
    cfg = TrainConfig(model="tiny:qwen3_moe", data=str(data), eval_data=str(held_out), method="fft",
                      out=str(tmp_path / "run"), seq_len=32, max_steps=6, eval_sequences=2, progress=False, lr=1e-4)
    train_seqs, _ = build_data(cfg, byte_tokenizer())
    empty = [s for s in range(cfg.max_steps) if not any(sum(m[1:]) for _, m in _micro_batch(train_seqs, cfg, s, 0, 0, 1))]
    assert empty, "the data must give at least one micro-batch without targets"
    train(cfg)
    losses = {json.loads(x)["step"]: json.loads(x).get("loss") for x in (tmp_path / "run" / "metrics.jsonl")
              .read_text().splitlines() if "loss" in json.loads(x)}
    assert all(losses[s + 1] == 0.0 for s in empty)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
