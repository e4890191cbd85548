"""Starting several training processes from a test: a hang fails the test and leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def run_launcher(args: list[str], timeout: float = 300, what: str = "the launch") -> str:
    """Run ``python <args>`` (torchrun, accelerate launch) in its own process group and return its output.

    On a timeout the whole group is killed (the launcher's workers too, which killing the launcher alone
    would leave running) and the test fails with the tail of the output; a non-zero exit fails it too.
    """
    proc = subprocess.Popen([sys.executable, *args], env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{what} hung for {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-6000:]
    return out


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> str:
    """``torchrun --standalone --nproc_per_node nproc <args>`` (gloo on CPU)."""
    return run_launcher(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args],
                        timeout, what="torchrun")
