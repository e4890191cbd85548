"""Experiment tracking (``train --report-to``): accelerate's trackers, fed exactly what ``metrics.jsonl`` gets.

TensorBoard, Weights & Biases and MLflow run through ``Accelerator(log_with=...)`` and its
``init_trackers`` / ``log``; only the main process logs (accelerate starts the trackers there only). Each
writes under ``<out>/tracking`` unless the tool's own environment variable says otherwise: wandb runs
offline unless ``WANDB_MODE`` is set (and writes under ``WANDB_DIR`` if set), MLflow uses a local SQLite
file (``tracking/mlflow.db``, artifacts in ``tracking/mlartifacts``) unless ``MLFLOW_TRACKING_URI`` is set:
MLflow 3 refuses its old ``mlruns/`` folder store unless told to allow it.

A resumed run (``--resume``) continues the tracking run of its checkpoint: TensorBoard hides the events
the killed run wrote after the checkpoint's step (``purge_step``) and gets them again; wandb and MLflow
reopen the run whose id the checkpoint recorded, and MLflow skips the steps it already holds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from moecraft.errors import MoecraftError

TRACKERS = ("tensorboard", "wandb", "mlflow")
PROJECT = "moecraft"  # accelerate's project name: wandb project, MLflow experiment, TensorBoard sub-folder
FOLDER = "tracking"  # under --out


def tracker_available(name: str) -> bool:
    """Whether accelerate finds the package of tracker ``name`` (accelerate silently drops one it does not)."""
    from accelerate import utils

    if name == "sqlalchemy":  # MLflow's local store
        return importlib.util.find_spec("sqlalchemy") is not None
    return bool(getattr(utils, f"is_{name}_available")())


def check_trackers(names: Iterable[str]) -> None:
    """Refuse a ``--report-to`` tracker whose package is not installed, naming the pip command."""
    for name in names:
        if name in TRACKERS and not tracker_available(name):
            raise MoecraftError(f"--report-to {name} needs the {name} package, which is not installed: "
                                f"pip install {name} (or pip install 'moecraft[track]' for all trackers)")
        if name == "mlflow" and "MLFLOW_TRACKING_URI" not in os.environ and not tracker_available("sqlalchemy"):
            raise MoecraftError("--report-to mlflow keeps its runs in a local SQLite file, which needs sqlalchemy "
                                "(mlflow-skinny lacks it): pip install mlflow, or set MLFLOW_TRACKING_URI")


def wanted(names: Iterable[str]) -> list[str]:
    """The trackers asked for (``none`` asks for none)."""
    return [n for n in names if n in TRACKERS]


def hyperparameters(cfg: Any) -> dict[str, str | int | float | bool | None]:
    """The run config as a flat dict of plain values (lists and mappings as JSON text, paths as text)."""

    def plain(value: Any) -> str | int | float | bool | None:
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        return json.dumps(value, sort_keys=True, default=str)

    return {f.name: plain(getattr(cfg, f.name)) for f in fields(cfg)}


def accelerator_options(names: Iterable[str], out: Path) -> dict[str, Any]:
    """``Accelerator`` keyword arguments for the trackers asked for (none: no arguments at all)."""
    names = wanted(names)
    return {"log_with": names, "project_dir": str(Path(out) / FOLDER)} if names else {}


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for the block, unless the user set it."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


class Tracking:
    """The run's trackers on the main process: started once the run folder exists, fed every metrics line.

    ``resumed`` is the ``tracking`` entry of the checkpoint the run resumes from (the wandb / MLflow run ids),
    ``step`` the step it resumes at. :meth:`state` is what the next checkpoint records.
    """

    def __init__(self, accelerator, names: Iterable[str], out: Path, step: int, resumed: dict | None,
                 resuming: bool):
        self.accelerator, self.names, self.out = accelerator, wanted(names), Path(out)
        self.step, self.resumed, self.resuming = step, dict(resumed or {}), resuming
        self.ids: dict[str, str] = {}
        self.mlflow_through = 0  # MLflow already holds this run's steps up to here (a resumed run)
        self._stack = contextlib.ExitStack()
        self.active = bool(self.names) and accelerator.is_main_process
        self.started = False

    def start(self, config: dict) -> None:
        """Start (or reopen) each tracker's run and log ``config`` as its hyper-parameters once per run."""
        if not self.active:
            return
        folder = self.out / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, dict] = {}
        if "tensorboard" in self.names and self.resuming:  # hide what a killed run logged after the checkpoint
            kwargs["tensorboard"] = {"purge_step": self.step + 1}
        if "wandb" in self.names:
            self.ids["wandb"] = self.resumed.get("wandb") or secrets.token_hex(4)
            kwargs["wandb"] = {"name": self.out.name, "id": self.ids["wandb"], "resume": "allow",
                               **({} if "WANDB_DIR" in os.environ else {"dir": str(folder)}),
                               **({} if "WANDB_MODE" in os.environ else {"mode": "offline"})}
        if "mlflow" in self.names:
            kwargs["mlflow"] = {"run_name": self.out.name, "run_id": self.resumed.get("mlflow")}
            if "MLFLOW_TRACKING_URI" not in os.environ:  # a local store, its artifacts beside it
                self._stack.enter_context(_env("MLFLOW_TRACKING_URI", f"sqlite:///{(folder / 'mlflow.db').resolve()}"))
                kwargs["mlflow"]["logging_dir"] = (folder / "mlartifacts").resolve().as_uri()
        self.accelerator.init_trackers(PROJECT, init_kwargs=kwargs)
        self.started = True
        if "mlflow" in self.names:
            self.ids["mlflow"] = self.accelerator.get_tracker("mlflow", unwrap=True).info.run_id
            if self.ids["mlflow"] == self.resumed.get("mlflow"):
                self.mlflow_through = _mlflow_last_step(self.ids["mlflow"])
        for tracker in self.accelerator.trackers:
            reopened = tracker.name in ("wandb", "mlflow") and self.ids.get(tracker.name) == self.resumed.get(tracker.name)
            if not (reopened or (tracker.name == "tensorboard" and self.resumed.get("tensorboard"))):
                tracker.store_init_configuration(config)  # MLflow refuses a parameter logged twice with new values

    def log(self, line: dict) -> None:
        """Log one ``metrics.jsonl`` line: its numbers at its ``step`` (None and flags such as ``final`` left out)."""
        if not self.active:
            return
        step = line["step"]
        values = {k: v for k, v in line.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not values:
            return
        if step > self.mlflow_through:
            self.accelerator.log(values, step=step)
            return
        for tracker in self.accelerator.trackers:
            if tracker.name != "mlflow":
                tracker.log(values, step=step)

    def state(self) -> dict:
        """What a checkpoint records to continue these tracking runs on --resume."""
        started = {"tensorboard": "started"} if self.started and "tensorboard" in self.names else {}
        return {**self.resumed, **self.ids, **started}

    def finish(self) -> None:
        """Close every tracker (flush files, end the runs). Not ``accelerator.end_training()``: that also
        destroys the process group, which the caller of :func:`moecraft.train.train` may still use."""
        if not self.active:
            return
        self.active = False
        try:
            for tracker in self.accelerator.trackers:
                tracker.finish()
        finally:
            self._stack.close()


def _mlflow_last_step(run_id: str) -> int:
    """The highest step of any metric MLflow holds for ``run_id``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    keys = client.get_run(run_id).data.metrics
    return max((m.step for k in keys for m in client.get_metric_history(run_id, k)), default=0)
