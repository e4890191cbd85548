"""Run ``moecraft`` command lines, skip the ones already done, log each with what it cost.

Every command runs with the output folder as working directory (so the logged line is short and can be
re-run there as it is) and is appended to ``commands.jsonl``: step id, command, exit status, wall time,
peak memory. A step whose output file exists is not run again, which is how repeated calls of at most
ten minutes finish the whole experiment.

Three modes with the same command lines: ``subprocess`` (the full run: one process per command, through
this file's harness, which calls ``moecraft``'s entry point and records the peak CUDA memory and RSS of
that process), ``inprocess`` (the CPU smoke test: ``moecraft.cli.main(args)`` in this interpreter,
since starting torch + transformers costs ~4-6 s a process on two cores) and ``hybrid`` (the CPU scale:
``train`` in its own process, whose peak memory the report compares, everything else in this one).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


class OutOfTime(Exception):
    """The time budget of this call is spent; the same call again continues where this one stopped."""


@dataclass
class Budget:
    seconds: float | None
    start: float = field(default_factory=time.monotonic)

    def remaining(self) -> float | None:
        return None if self.seconds is None else self.seconds - (time.monotonic() - self.start)

    def check(self, what: str) -> None:
        left = self.remaining()
        if left is not None and left < 5:
            raise OutOfTime(what)


@dataclass
class Runner:
    root: Path
    mode: str  # "subprocess" | "inprocess" | "hybrid"
    budget: Budget
    verbose: bool = True
    threads: int | None = None  # OMP_NUM_THREADS of subprocesses (None: inherited)

    def moecraft(self, step: str, args: list[str], done: Path | str) -> dict:
        """Run ``moecraft *args`` unless ``done`` (relative to the root) exists; returns the log record."""
        done = self.root / done
        if done.exists():
            return self.record(step) or {"step": step, "skipped": True}
        self.budget.check(step)
        command = "moecraft " + shlex.join(args)
        if self.verbose:
            print(f"[{step}] {command}", flush=True)
        log = self.root / "logs" / (step.replace("/", "__") + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        mode = self.mode if self.mode != "hybrid" else "subprocess" if args[0] == "train" else "inprocess"
        rec = self._subprocess(args, log, step) if mode == "subprocess" else self._inprocess(args, log)
        rec = {"step": step, "command": command, "mode": mode, "log": os.path.relpath(log, self.root),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": round(time.monotonic() - t0, 3), **rec}
        with (self.root / "commands.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if rec["rc"] != 0 or not done.exists():
            tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
            raise RuntimeError(f"step {step} failed (exit {rec['rc']}; {done} missing?): {command}\n{tail}")
        if self.verbose:
            print(f"    done in {rec['wall_s']:.1f}s", flush=True)
        return rec

    def _subprocess(self, args: list[str], log: Path, step: str) -> dict:
        record = log.with_suffix(".json")
        record.unlink(missing_ok=True)
        argv = [sys.executable, str(Path(__file__).resolve()), "--record", str(record), "--", *args]
        env = os.environ | ({"OMP_NUM_THREADS": str(self.threads)} if self.threads else {})
        with log.open("w") as out:
            proc = subprocess.Popen(argv, cwd=self.root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=env)
            try:
                proc.wait(timeout=self.budget.remaining())
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                raise OutOfTime(step) from None
        rec = json.loads(record.read_text()) if record.is_file() else {}
        return {"rc": proc.returncode, **rec, "argv": argv}

    def _inprocess(self, args: list[str], log: Path) -> dict:
        import contextlib

        import torch

        from moecraft.cli import main

        old_argv, old_cwd = sys.argv, os.getcwd()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            sys.argv = ["moecraft", *args]  # what moecraft records as the command in run_info.json
            os.chdir(self.root)
            with log.open("w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                rc = main(args)
        finally:
            sys.argv = old_argv
            os.chdir(old_cwd)
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        return {"rc": rc, "peak_gpu_bytes": peak, "peak_rss_bytes": None}  # RSS of a shared process means nothing

    def record(self, step: str) -> dict | None:
        """The last successful log record of ``step``."""
        return records(self.root).get(step)


def records(root: Path) -> dict[str, dict]:
    path = Path(root) / "commands.jsonl"
    out: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec.get("rc") == 0:
                out[rec["step"]] = rec
    return out


def peak_rss() -> int:
    """Peak resident memory of this process since its exec, in bytes.

    Linux's ru_maxrss is not that: a child inherits its parent's high-water mark at fork and keeps it across
    exec, so every command reported the driver's RSS (the same 2.86 GB for FFT and ESFT in a CPU run). VmHWM
    belongs to the address space that exec created.
    """
    import resource

    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _harness(argv: list[str]) -> int:
    """``runner.py --record FILE -- <moecraft args>``: run the CLI in this process, then write its costs."""
    import torch

    from moecraft.cli import main

    record, args = Path(argv[1]), argv[3:]
    sys.argv = ["moecraft", *args]
    t0 = time.monotonic()
    rc = main(args)
    rec = {"rc": rc, "process_wall_s": round(time.monotonic() - t0, 3),
           "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
           "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None,
           "peak_rss_bytes": peak_rss()}
    record.write_text(json.dumps(rec) + "\n")
    return rc


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] != "--record" or sys.argv[3] != "--":
        raise SystemExit("usage: runner.py --record FILE -- <moecraft arguments>")
    sys.exit(_harness(sys.argv[1:]))
