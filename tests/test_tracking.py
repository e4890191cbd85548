"""Experiment tracking (``train --report-to``): what the trackers hold equals metrics.jsonl, step for step."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from moecraft.cli import main
from moecraft.config import ConfigError
from moecraft.train import TrainConfig, train
from moecraft.train.tracking import hyperparameters

RUN = ["--model", "tiny:deepseek_v2", "--data", "builtin:intent", "--method", "lora", "--seq-len", "128",
       "--max-steps", "4", "--eval-every", "2", "--eval-sequences", "2", "--lr", "1e-3", "--progress", "false"]


def _metrics(out: Path) -> dict[tuple[str, int], float]:
    """{(name, step): value} of every number in metrics.jsonl (None and the final flag left out)."""
    found = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                assert (key, record["step"]) not in found, (key, record["step"])
                found[key, record["step"]] = value
    return found


def _tensorboard(logdir: Path) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of the scalars TensorBoard shows for ``logdir`` (purged events hidden); a tag
    logged twice at one step is an error."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    found = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            assert (tag, event.step) not in found, (tag, event.step)
            found[tag, event.step] = event.value
    return found


def _same(tracked: dict, metrics: dict) -> None:
    assert tracked.keys() == metrics.keys()
    for key, value in metrics.items():  # TensorBoard stores float32
        assert tracked[key] == pytest.approx(float(np.float32(value)), rel=1e-6, abs=0), key


def _hparams_sessions(logdir: Path) -> list[Path]:
    """The sub-folders of ``logdir`` holding an HParams session (one per start of a tracking run)."""
    return [p for p in logdir.iterdir() if p.is_dir() and any(p.glob("events.out.tfevents.*"))]


def _hparams(logdir: Path) -> dict:
    """The hyper-parameters of the TensorBoard run under ``logdir`` (the HParams plugin's session start)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    sessions = _hparams_sessions(logdir)
    assert len(sessions) == 1, sessions
    acc = EventAccumulator(str(sessions[0]))
    acc.Reload()
    data = plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    values = {}
    for name, value in data.session_start_info.hparams.items():
        values[name] = getattr(value, value.WhichOneof("kind"))
    return values


def test_tensorboard_holds_the_metrics_lines_and_the_config(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *RUN, "--out", str(out), "--report-to", "tensorboard"]) == 0
    metrics = _metrics(out)
    assert {k for k, _ in metrics} >= {"loss", "lr", "grad_norm", "tokens_per_s", "eval_loss"}
    assert all(metrics["loss", s] > 0 for s in range(1, 5))
    assert ("eval_loss", 2) in metrics and ("eval_loss", 4) in metrics  # a mid-run eval and the final one
    logdir = out / "tracking" / "moecraft"
    _same(_tensorboard(logdir), metrics)
    cfg = TrainConfig(**yaml.safe_load((out / "train_config.yaml").read_text()))
    # TensorBoard skips None and stores a bool as the number it is
    expected = {k: float(v) if isinstance(v, bool) else v for k, v in hyperparameters(cfg).items() if v is not None}
    assert _hparams(logdir) == pytest.approx(expected)
    assert expected["report_to"] == '["tensorboard"]' and expected["max_steps"] == 4 and expected["lr"] == 1e-3


def test_resumed_run_continues_the_same_tensorboard_run_without_repeated_steps(tmp_path):
    out = tmp_path / "run"
    options = dict(model="tiny:deepseek_v2", data="builtin:intent", method="lora", seq_len=128, max_steps=5,
                   eval_sequences=2, lr=1e-3, progress=False, save_every=2, report_to=["tensorboard"], out=str(out))
    assert train(TrainConfig(**options), stop_after=3)["stopped"]  # "killed" after step 3; checkpoint at 2
    logdir = out / "tracking" / "moecraft"
    assert {s for (tag, s) in _tensorboard(logdir) if tag == "loss"} == {1, 2, 3}
    train(TrainConfig(**options, resume=True))
    metrics = _metrics(out)
    assert sorted(s for (k, s) in metrics if k == "loss") == [1, 2, 3, 4, 5]
    _same(_tensorboard(logdir), metrics)  # step 3 of the killed run hidden, logged again by the resumed one
    assert len(_hparams_sessions(logdir)) == 1  # the config once per tracking run


def test_none_writes_no_tracking(tmp_path, monkeypatch):
    import accelerate

    made = []
    real = accelerate.Accelerator.__init__

    def spy(self, *args, **kwargs):
        made.append(kwargs)
        real(self, *args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "__init__", spy)
    out = tmp_path / "run"
    assert main(["train", *RUN, "--max-steps", "1", "--out", str(out)]) == 0
    assert not (out / "tracking").exists()
    assert made and all(k.get("log_with") is None for k in made)
    assert yaml.safe_load((out / "train_config.yaml").read_text())["report_to"] == ["none"]


@pytest.mark.parametrize(("value", "message"), [
    (["none", "tensorboard"], "'none' cannot be combined"),
    (["mlflow", "mlflow"], "names 'mlflow' more than once"),
    ([], "may not be an empty list"),
    (["comet"], "must be one of"),
])
def test_bad_report_to(value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(model="m", data="d", out="o", report_to=value)


def test_report_to_from_the_command_line_and_yaml(tmp_path, capsys):
    assert main(["train", "--model", "m", "--data", "d", "--out", "o", "--report-to", "tensorboard,mlflow",
                 "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["report_to"] == ["tensorboard", "mlflow"]
    config = tmp_path / "train.yaml"
    config.write_text("model: m\ndata: d\nout: o\nreport_to: [wandb]\n")
    assert main(["train", "--config", str(config), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["report_to"] == ["wandb"]


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed (pip install mlflow)")
def test_mlflow_local_store_holds_the_metrics_lines_and_the_config(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    assert main(["train", *RUN, "--out", str(out), "--report-to", "mlflow"]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'tracking' / 'mlflow.db').resolve()}")
    (run,) = client.search_runs([client.get_experiment_by_name("moecraft").experiment_id])
    tracked = {(k, m.step): m.value for k in run.data.metrics for m in client.get_metric_history(run.info.run_id, k)}
    metrics = _metrics(out)
    assert tracked.keys() == metrics.keys()
    assert all(tracked[k] == pytest.approx(v, rel=1e-12) for k, v in metrics.items())
    assert run.data.params["max_steps"] == "4" and run.data.params["method"] == "lora"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_wandb_runs_offline_under_the_run_folder(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    assert main(["train", *RUN, "--max-steps", "2", "--out", str(out), "--report-to", "wandb"]) == 0
    runs = list((out / "tracking" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb")), runs
