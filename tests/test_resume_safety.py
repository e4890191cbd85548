"""--resume runs no code and trusts contents, not paths; training stops cleanly (issue 13, classes 2 and 5).

A checkpoint is JSON + safetensors only, and a pickle planted in one is refused without being run. The
checkpoint records the expert selection, the data files and the base model by content: a change is refused
by name, a moved file is not a change. Non-finite eval loss or weights stop before the artifact; SIGINT and
SIGTERM stop at a step boundary with one line and status 130/143; a cut-off last metrics line is dropped.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_bad_inputs import fails, save_tiny

from moecraft.data import load_records
from moecraft.errors import DataError, MoecraftError
from moecraft.methods import get_method
from moecraft.train import TrainConfig, train
from moecraft.train.checkpoint import (
    CorruptCheckpointError,
    read_state,
    verify,
    write_manifest,
    write_state,
)
from moecraft.train.stopping import interrupted

EXPERTS = {"1": [3, 7], "2": [0, 5, 9]}


def _write_experts(path: Path, experts: dict) -> str:
    path.write_text(json.dumps({"format": "moecraft.expert_config/1", "family": "deepseek_v2", "experts": experts}))
    return str(path)


def _argv(options: dict, out) -> list[str]:
    args = ["train", "--out", str(out)]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def _same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """An ESFT run on a local model folder and a JSONL data file, stopped after step 3 with its step-2
    checkpoint, and the trained tensors of the same run uninterrupted."""
    root = tmp_path_factory.mktemp("resume")
    model = save_tiny(root / "base", "deepseek_v2")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in load_records("builtin:intent")[:200]))
    options = dict(model=str(model), data=str(data), eval_data="builtin:intent:eval", method="esft",
                   experts=_write_experts(root / "experts.json", EXPERTS), seq_len=128, batch_size=2, max_steps=4,
                   eval_sequences=2, lr=1e-3, warmup_steps=2, save_every=2, progress=False)
    train(TrainConfig(out=str(root / "reference"), **options))
    train(TrainConfig(out=str(root / "stopped"), **options), stop_after=3)
    return root, options, load_file(root / "reference" / "trained.safetensors")


def _copy(root: Path, name: str) -> Path:
    shutil.copytree(root / "stopped", root / name)
    return root / name


# ----------------------------------------------------------------------------- no pickles
def test_checkpoint_is_json_and_safetensors_and_resumes_without_unpickling(stopped, monkeypatch):
    root, options, reference = stopped
    ckpt = root / "stopped" / "checkpoint"
    for path in ckpt.iterdir():
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert path.suffix == ".safetensors", path.name
            load_file(path)
    out = _copy(root, "no_unpickling")

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(target, name, refuse)
    train(TrainConfig(out=str(out), resume=True, **options))
    monkeypatch.undo()
    _same_tensors(load_file(out / "trained.safetensors"), reference)  # bit-identical to the uninterrupted run


class _Payload:
    """Pickles to a call of ``Path.touch(marker)``: unpickling it runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(str(self.marker)),))


@pytest.mark.parametrize("where", ["state.pt", "optimizer.safetensors"])
def test_checkpoint_holding_a_code_running_pickle_is_refused_and_the_code_never_runs(stopped, capsys, where):
    root, options, _ = stopped
    out = _copy(root, f"malicious_{where}")
    ckpt, marker = out / "checkpoint", root / f"pwned_{where}"
    evil = pickle.dumps({"state": _Payload(marker)})
    if where == "state.pt":  # an old-format (pickle) checkpoint
        (ckpt / "state.json").unlink()
        (ckpt / "state.pt").write_bytes(evil)
        expected = "written by an older moecraft, in pickle files (state.pt)"
    else:  # the optimiser state swapped for a pickle
        (ckpt / where).write_bytes(evil)
        expected = "optimizer.safetensors: unreadable"
    write_manifest(ckpt, verify_step(ckpt))  # as an attacker would: the manifest's hashes are recomputable
    verify(ckpt)
    msg = fails(capsys, *_argv({**options, "resume": True}, out))
    assert expected in msg
    assert not marker.exists()  # the payload did not run
    pickle.loads(evil)  # ... and it would have: the test's payload is real
    assert marker.exists()
    assert not (out / "artifact.json").exists()


def verify_step(ckpt: Path) -> int:
    return json.loads((ckpt / "manifest.json").read_text())["step"]


def test_state_codec_round_trips_optimiser_state_bit_exactly(tmp_path):
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3, dtype=torch.bfloat16),
                           "master": torch.randn(2, 3)}, 7: {"step": 2.5}},
             "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999), "eps": float("nan"), "params": [0, 7],
                               "foreach": None, "maximize": False, "name": "a/b"}]}
    write_state(tmp_path, "optimizer", state)
    back = read_state(tmp_path, "optimizer")
    assert sorted(back["state"]) == [0, 7] and back["state"][7] == {"step": 2.5}
    for key, value in state["state"][0].items():
        assert back["state"][0][key].dtype == value.dtype and torch.equal(back["state"][0][key], value)
    group, want = back["param_groups"][0], state["param_groups"][0]
    assert group["betas"] == (0.9, 0.999) and isinstance(group["betas"], tuple) and group["lr"] == 1e-5
    assert group["eps"] != group["eps"] and {k: v for k, v in group.items() if k != "eps"} == \
        {k: v for k, v in want.items() if k != "eps"}


# ----------------------------------------------------------------------------- contents, not paths
def test_resume_after_the_expert_ids_in_the_same_file_changed_is_refused(stopped, capsys):
    root, options, _ = stopped
    out = _copy(root, "experts_changed")
    experts = _write_experts(root / "experts_same_name.json", EXPERTS)
    options = {**options, "experts": experts}
    # the path changed but not the content: accepted up to the point of checking the checkpoint's data
    _write_experts(Path(experts), {"1": [3, 8], "2": [0, 5, 9]})  # same count: shapes alone would not tell
    before = sorted((p.name, p.stat().st_size) for p in (out / "checkpoint").iterdir())
    msg = fails(capsys, *_argv({**options, "resume": True}, out))
    assert msg.startswith("--resume: the expert config changed since the checkpoint")
    assert "(layer 1: [3, 7] -> [3, 8])" in msg
    assert sorted((p.name, p.stat().st_size) for p in (out / "checkpoint").iterdir()) == before
    assert not (out / "artifact.json").exists()


def test_resume_after_the_data_file_changed_is_refused_and_a_moved_copy_is_accepted(stopped, capsys):
    root, options, reference = stopped
    out = _copy(root, "data_changed")
    edited = root / "edited.jsonl"
    lines = Path(options["data"]).read_text().splitlines()
    record = json.loads(lines[5])
    record["messages"][-1]["content"] += " "
    edited.write_text("\n".join([*lines[:5], json.dumps(record), *lines[6:]]) + "\n")
    msg = fails(capsys, *_argv({**options, "data": str(edited), "resume": True}, out))
    assert msg.startswith("--resume: the training data (--data) changed since the checkpoint")
    assert "sha256 " in msg and "->" in msg
    assert not (out / "artifact.json").exists()

    moved = root / "moved" / "renamed.jsonl"  # same bytes elsewhere: the same input
    moved.parent.mkdir()
    shutil.copyfile(options["data"], moved)
    train(TrainConfig(out=str(out), resume=True, **{**options, "data": str(moved)}))
    _same_tensors(load_file(out / "trained.safetensors"), reference)


def test_resume_on_a_base_with_other_weights_is_refused(stopped, capsys):
    root, options, _ = stopped
    out = _copy(root, "base_changed")
    original = Path(options["model"])
    shutil.move(original, root / "base_saved")
    try:
        save_tiny(original, "deepseek_v2", seed=1)  # the same config, other weights, at the run's path
        msg = fails(capsys, *_argv({**options, "resume": True}, out))
    finally:
        shutil.rmtree(original, ignore_errors=True)
        shutil.move(root / "base_saved", original)
    assert msg.startswith("--resume: the base model's weights changed since the checkpoint"), msg
    assert not (out / "artifact.json").exists()


# ----------------------------------------------------------------------------- non-finite values stop
def test_non_finite_eval_loss_stops_before_the_artifact(stopped, monkeypatch):
    root, options, _ = stopped
    out = _copy(root, "nan_eval")
    esft = type(get_method("esft"))
    prepare = esft.prepare

    def nan_when_evaluating(self, model, cfg):  # the model's own eval forward gives NaN logits
        model = prepare(self, model, cfg)
        model.lm_head.register_forward_hook(lambda m, i, o: o if m.training else o * float("nan"))
        return model

    monkeypatch.setattr(esft, "prepare", nan_when_evaluating)
    with pytest.raises(MoecraftError, match=r"the eval loss is nan after step 4; stopped before writing the "
                                            r"artifact, the last good checkpoint is kept in .*checkpoint"):
        train(TrainConfig(out=str(out), resume=True, **options))
    assert verify(out / "checkpoint")["step"] == 2 and not (out / "artifact.json").exists()
    assert not (out / "trained.safetensors").exists()


def test_non_finite_weights_stop_before_the_checkpoint_and_the_artifact(stopped, monkeypatch):
    root, options, _ = stopped
    out = _copy(root, "inf_weights")
    step = torch.optim.AdamW.step

    def inf_after_step_4(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        if int(next(iter(self.state.values()))["step"]) == 4:  # an update that overflowed, on the last step
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", inf_after_step_4)
    with pytest.raises(MoecraftError, match=r"trained weights are not finite \(NaN or inf\) after step 4: "
                                            r"model\.layers\..*; stopped before writing the artifact, the last "
                                            r"good checkpoint is kept"):
        train(TrainConfig(out=str(out), resume=True, **options))
    assert verify(out / "checkpoint")["step"] == 2 and not (out / "artifact.json").exists()


# ----------------------------------------------------------------------------- metrics.jsonl cut short
def test_resume_after_a_truncated_last_metrics_line_drops_it_and_appends_cleanly(stopped):
    root, options, reference = stopped
    out = _copy(root, "truncated_metrics")
    metrics = out / "metrics.jsonl"
    with metrics.open("a") as fh:
        fh.write('{"step": 4, "loss": 1.2')  # a kill in mid-write
    train(TrainConfig(out=str(out), resume=True, **options))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line is whole JSON
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4] and rows[-1].get("final")
    _same_tensors(load_file(out / "trained.safetensors"), reference)


def test_a_damaged_metrics_line_before_the_last_is_an_error_naming_it(stopped):
    root, options, _ = stopped
    out = _copy(root, "damaged_metrics")
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], lines[1][:10], *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=rf"{metrics}:2: not valid JSON; fix or delete that line"):
        train(TrainConfig(out=str(out), resume=True, **options))


# ----------------------------------------------------------------------------- SIGINT / SIGTERM
def _signal_run(argv: list[str], out: Path, sig: int, after_steps: int) -> tuple[int, str]:
    """Run ``moecraft train`` in its own process group, send ``sig`` once ``after_steps`` steps are logged."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moecraft", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= after_steps:
                break
            time.sleep(0.002)
        assert proc.poll() is None, f"the run ended before the signal: {proc.stderr.read()[-2000:]}"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err


def _options(tmp_path: Path, **extra) -> dict:
    return dict(model="tiny:deepseek_v2", data="builtin:intent", method="esft",
                experts=_write_experts(tmp_path / "experts.json", EXPERTS), seq_len=128, batch_size=1,
                max_steps=40, eval_sequences=2, lr=1e-3, deterministic=True, progress=False, **extra)


def test_sigterm_saves_a_checkpoint_exits_143_with_one_line_and_resumes_exactly(tmp_path):
    options = _options(tmp_path, save_every=50, save_on_interrupt="always")
    out = tmp_path / "run"
    rc, err = _signal_run(_argv(options, out), out, signal.SIGTERM, after_steps=3)
    assert rc == 143, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moecraft train: error: interrupted by SIGTERM after step "), err
    step = int(lines[0].split("after step ")[1].split()[0])
    assert f"saved a checkpoint at step {step} in {out}/checkpoint: continue with --resume" in lines[0]
    assert verify(out / "checkpoint")["step"] == step < options["max_steps"]
    assert not (out / "artifact.json").exists()
    train(TrainConfig(out=str(out), resume=True, **options))
    reference = train(TrainConfig(out=str(tmp_path / "reference"), **options))["out"]
    _same_tensors(load_file(out / "trained.safetensors"), load_file(Path(reference) / "trained.safetensors"))


def test_sigint_without_a_due_checkpoint_says_what_is_lost_and_exits_130(tmp_path):
    options = _options(tmp_path, save_every=2, save_on_interrupt="never")
    out = tmp_path / "run"
    rc, err = _signal_run(_argv(options, out), out, signal.SIGINT, after_steps=5)
    assert rc == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moecraft train: error: interrupted by SIGINT after step "), err
    step = int(lines[0].split("after step ")[1].split()[0])
    saved = verify(out / "checkpoint")["step"]
    assert saved == step - step % 2  # the regular checkpoints only
    lost = f"{step - saved} step(s) since it are lost" if step - saved else "nothing is lost"
    assert f"the last checkpoint is at step {saved} ({lost}): continue with --resume" in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(("step", "saved_step", "save_every", "mode", "saves", "says"), [
    (7, 4, 4, "auto", True, "saved a checkpoint at step 7"),  # 3 of 4 steps would be lost: due soon
    (6, 4, 4, "auto", True, "saved a checkpoint at step 6"),  # half an interval
    (5, 4, 4, "auto", False, "the last checkpoint is at step 4 (1 step(s) since it are lost)"),
    (8, 8, 4, "always", False, "the last checkpoint is at step 8 (nothing is lost)"),
    (3, None, 0, "auto", False, "no checkpoint: the 3 step(s) done are lost"),
    (3, None, 0, "always", True, "saved a checkpoint at step 3"),
    (7, 4, 4, "never", False, "(3 step(s) since it are lost)"),
])
def test_when_a_signal_saves_a_checkpoint(step, saved_step, save_every, mode, saves, says):
    saved = []
    cfg = TrainConfig(model="m", data="d", out="o", max_steps=10, save_every=save_every, save_on_interrupt=mode)
    exc = interrupted(signal.SIGTERM, step, saved_step, cfg, lambda: saved.append(step) or Path("o/checkpoint"))
    assert bool(saved) == saves and says in str(exc) and exc.exit_status == 143


def test_old_checkpoint_state_without_inputs_is_not_resumed(stopped):
    root, options, _ = stopped
    out = _copy(root, "no_inputs")
    ckpt = out / "checkpoint"
    state = read_state(ckpt, "state")
    del state["state"]["inputs"]
    write_state(ckpt, "state", state)
    write_manifest(ckpt, 2)
    with pytest.raises(MoecraftError, match="no record of the run's inputs"):
        train(TrainConfig(out=str(out), resume=True, **options))
    with pytest.raises(CorruptCheckpointError):  # and a tampered file without a new manifest is caught first
        (ckpt / "state.json").write_text("{}")
        verify(ckpt)


def test_deepspeed_files_are_read_weights_only(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from moecraft.train.checkpoint import _deepspeed_weights_only

    marker, load = tmp_path / "pwned", torch.load
    torch.save({"zero_stage": ZeroStageEnum.weights, "exp_avg": torch.ones(3)}, tmp_path / "optim_states.pt")
    torch.save({"zero_stage": _Payload(marker)}, tmp_path / "evil.pt")
    with _deepspeed_weights_only():  # DeepSpeed's engine asks for weights_only=False; it gets True
        state = torch.load(tmp_path / "optim_states.pt", weights_only=False)
    assert state["zero_stage"] is ZeroStageEnum.weights and torch.equal(state["exp_avg"], torch.ones(3))
    with pytest.raises(MoecraftError, match=r"the DeepSpeed checkpoint holds more than tensors and known DeepSpeed "
                                            r"records \(Unsupported global: GLOBAL \S+.*\); --resume does not "
                                            r"unpickle it"), _deepspeed_weights_only():
        torch.load(tmp_path / "evil.pt", weights_only=False)
    assert not marker.exists() and torch.load is load


def test_a_repeated_signal_within_a_second_is_the_same_request_and_a_later_one_stops_at_once(monkeypatch):
    from moecraft.errors import TrainingInterrupted
    from moecraft.train import stopping

    now = [100.0]
    monkeypatch.setattr(stopping.time, "monotonic", lambda: now[0])
    with stopping.StopSignals() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        stop.step = 4
        stop._handle(signal.SIGINT, None)
        now[0] += 0.5
        stop._handle(signal.SIGTERM, None)  # torchrun forwarding the same Ctrl-C
        assert stop.signum == signal.SIGINT
        now[0] += 1.0
        with pytest.raises(TrainingInterrupted, match="stopped at once by a second SIGTERM during step 5") as info:
            stop._handle(signal.SIGTERM, None)
        assert info.value.exit_status == 143
    assert signal.getsignal(signal.SIGTERM) is not stop._handle  # restored on leaving


def test_resume_with_the_base_in_another_dtype_names_the_dtype(tmp_path):
    from moecraft.models import tiny_model
    from moecraft.train.checkpoint import base_identity, check_inputs

    model = tiny_model("deepseek_v2")
    fingerprint = {"config_hash": "c", "weights_hash": "w"}
    saved = {"expert_config": None, "data": {}, "base": base_identity(model, fingerprint)}
    now = {**saved, "base": base_identity(model.to(torch.bfloat16), fingerprint)}
    with pytest.raises(MoecraftError, match=r"the base model's dtype changed since the checkpoint ck \(float32 -> "
                                            r"bfloat16\)"):
        check_inputs(saved, now, Path("ck"))
    check_inputs(saved, saved, Path("ck"))  # unchanged: accepted
