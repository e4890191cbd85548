"""Training that stops cleanly: on SIGINT/SIGTERM at a step boundary, and before writing non-finite weights.

A signal only sets a flag (:class:`StopSignals`); the loop reads it after the current step, when the
model, optimiser and data position agree, so a checkpoint written then resumes exactly. Whether one is
written (:func:`interrupted`): always with ``--save-on-interrupt always``; with ``auto`` (the default) when
the steps since the last checkpoint are half a ``--save-every`` interval or more (a checkpoint was due
soon), since a save can take long and a SIGTERM is usually followed by a SIGKILL. Either way the run ends
with one line that says what was kept and what is lost, and exit status 128 + the signal number.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moecraft.errors import MoecraftError, TrainingInterrupted
from moecraft.train.checkpoint import find_checkpoint, non_finite_trainable


def last_good(out: Path) -> str:
    """Where the last good checkpoint is, for error messages that stop a run."""
    ckpt = find_checkpoint(out)
    return f"the last good checkpoint is kept in {ckpt}" if ckpt else "no checkpoint was written (--save-every)"


def check_finite_weights(model, accelerator, step: int, out: Path, before: str) -> None:
    """Stop (every process) when a trainable tensor holds NaN or inf, before ``before`` is written."""
    bad = non_finite_trainable(accelerator.unwrap_model(model))
    count = len(bad)
    if accelerator.num_processes > 1:  # every process must stop, also those whose shard is finite
        count = int(accelerator.reduce(torch.tensor(count, device=accelerator.device), reduction="sum"))
    if count:
        names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "") if bad else "on another process"
        raise MoecraftError(f"trained weights are not finite (NaN or inf) after step {step}: {names}; stopped "
                            f"before writing {before}, {last_good(out)}. Lower --lr or keep --max-grad-norm on.")


def check_finite_eval(value: float, step: int, out: Path, before: str) -> None:
    if not math.isfinite(value):
        raise MoecraftError(f"the eval loss is {value} after step {step}; stopped before writing {before}, "
                            f"{last_good(out)}. Lower --lr, keep --max-grad-norm on, or check the eval data.")


REPEAT_WINDOW_S = 1.0


class StopSignals:
    """While inside, SIGINT/SIGTERM set :attr:`signum` for the loop to read after the current step; a second
    signal stops at once. Installed only in the main thread (Python's rule for signal handlers)."""

    def __init__(self):
        self.signum: int | None = None
        self.step = 0  # the loop's step count, for the messages
        self._first = 0.0  # when the first signal came (time.monotonic)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            # launchers forward a Ctrl-C their process group got too (torchrun: SIGINT or SIGTERM), so a
            # repeat within a second is the same request; a later one stops at once, safely: checkpoint
            # writes are atomic
            if time.monotonic() - self._first < REPEAT_WINDOW_S:
                return
            raise TrainingInterrupted(f"stopped at once by a second {name} during step {self.step + 1}; the steps "
                                      "since the last checkpoint are lost", signum)
        self.signum, self._first = signum, time.monotonic()
        if sys.stderr.isatty():  # someone at a terminal waits for the step to end; logs get only the final line
            print(f"\n{name}: stopping after step {self.step + 1} (send it again to stop at once)", file=sys.stderr)


def stop_requested(stop: StopSignals, accelerator) -> int | None:
    """The signal that asks every process to stop now, or None; processes agree (one may get it first)."""
    if accelerator.num_processes == 1:
        return stop.signum
    got = accelerator.reduce(torch.tensor(stop.signum or 0, device=accelerator.device), reduction="sum")
    return (stop.signum or int(signal.SIGTERM)) if int(got) else None


def interrupted(signum: int, step: int, saved_step: int | None, cfg, save: Callable[[], Path]) -> TrainingInterrupted:
    """Save a checkpoint (``save()``) if asked or due soon; the one-line error that says what was kept and lost."""
    name = signal.Signals(signum).name
    since = step - (saved_step or 0)
    due_soon = cfg.save_every and since * 2 >= cfg.save_every  # at least half an interval would be lost
    if since and (cfg.save_on_interrupt == "always" or (cfg.save_on_interrupt == "auto" and due_soon)):
        kept = f"saved a checkpoint at step {step} in {save()}: continue with --resume"
    elif saved_step is not None:
        lost = f"{since} step(s) since it are lost" if since else "nothing is lost"
        kept = f"the last checkpoint is at step {saved_step} ({lost}): continue with --resume"
    else:
        kept = (f"no checkpoint: the {step} step(s) done are lost (--save-every N saves one every N steps, "
                "--save-on-interrupt always saves one on a signal)")
    return TrainingInterrupted(f"interrupted by {name} after step {step} of {cfg.max_steps}; {kept}", signum)
