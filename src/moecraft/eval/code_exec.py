"""Run untrusted, model-written Python in a subprocess with a time limit, resource limits and a guard.

Layers of protection (each cheap, together enough for benchmark code; not a security sandbox):
- a fresh ``python -I -B`` in a temporary working folder with a scrubbed environment (no proxies, no
  tokens, no PYTHONPATH), in its own process group that is killed as a whole at the wall-clock limit
  (catches ``while True`` and ``sleep`` alike);
- ``setrlimit`` caps on CPU seconds, address space, file size and open files;
- a ``sys.addaudithook`` guard, installed before the program runs and impossible to remove from Python:
  any socket, subprocess, fork/exec/spawn, signal to another process, ctypes load, or write/delete
  outside the working folder ends the process at once with status ``FORBIDDEN_EXIT`` (it does not raise,
  so a ``try/except`` in the program cannot swallow it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

FORBIDDEN_EXIT = 97
Status = Literal["passed", "failed", "timeout", "forbidden", "memory"]

_GUARD = r'''
import os as _os, sys as _sys, resource as _res
_res.setrlimit(_res.RLIMIT_CPU, ({cpu}, {cpu}))
_res.setrlimit(_res.RLIMIT_AS, ({mem}, {mem}))
_res.setrlimit(_res.RLIMIT_FSIZE, ({fsize}, {fsize}))
_res.setrlimit(_res.RLIMIT_CORE, (0, 0))
_ROOT = _os.path.realpath(_os.getcwd())
_BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
            "os.forkpty", "os.kill", "os.killpg", "ctypes.", "pty.", "webbrowser.", "urllib.",
            "http.", "ftplib.", "smtplib.", "os.setuid", "os.setgid")
# numpy dlopens its own libraries at import; calling any foreign function (dlsym, call) stays blocked.
_ALLOWED = ("socket.gethostname", "ctypes.dlopen")
_WRITE_EVENTS = ("os.remove", "os.rmdir", "os.rename", "os.replace", "os.truncate", "os.mkdir",
                 "os.chmod", "os.chown", "os.link", "os.symlink", "shutil.rmtree", "shutil.move")
_write = _sys.stderr.write
_exit = _os._exit
_real = _os.path.realpath
_O_W = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_APPEND | _os.O_TRUNC

def _outside(path):
    if isinstance(path, int):
        return False
    try:
        p = _real(_os.fsdecode(path))
    except Exception:
        return True
    return not (p == _ROOT or p.startswith(_ROOT + _os.sep))

def _deny(event):
    _write("moecraft-guard: forbidden: %s\n" % event)
    _sys.stderr.flush()
    _exit({forbidden})

def _hook(event, args):
    if event.startswith(_BLOCKED) and event not in _ALLOWED:
        _deny(event)
    if event == "open" and len(args) >= 3:
        path, mode, flags = args[0], args[1], args[2]
        writes = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & _O_W)
        if writes and _outside(path):
            _deny("write outside the work folder: %r" % (path,))
    elif event in _WRITE_EVENTS and args and _outside(args[0]):
        _deny("%s outside the work folder" % event)

_sys.addaudithook(_hook)
del _hook
'''


@dataclass
class ExecResult:
    status: Status
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_python(
    program: str,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_output_chars: int = 4000,
) -> ExecResult:
    """Run ``program`` under the guard; ``passed`` iff it exits with status 0 within ``timeout`` seconds."""
    guard = _GUARD.format(
        cpu=max(1, int(timeout) + 1), mem=memory_mb * 2**20, fsize=64 * 2**20, forbidden=FORBIDDEN_EXIT
    )
    with tempfile.TemporaryDirectory(prefix="moecraft-exec-") as work:
        with open(os.path.join(work, "program.py"), "w") as f:
            f.write(program)
        # The guard runs first, then the program in a fresh __main__-like namespace.
        launcher = guard + (
            "\n_src = open('program.py').read()\n"
            "exec(compile(_src, 'program.py', 'exec'), {'__name__': '__main__', '__builtins__': __builtins__})\n"
        )
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8"}
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", launcher], cwd=work, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, text=True, errors="replace",
        )
        try:
            out, err = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            timed_out = True
        finally:
            _kill_group(proc)  # stray children of a program that escaped the guard
        seconds = time.monotonic() - start
    rc = proc.returncode
    if timed_out or rc == -signal.SIGXCPU or rc == -signal.SIGKILL:
        status: Status = "timeout"
    elif rc == FORBIDDEN_EXIT and "moecraft-guard: forbidden" in err:
        status = "forbidden"
    elif rc != 0 and "MemoryError" in err:
        status = "memory"
    else:
        status = "passed" if rc == 0 else "failed"
    return ExecResult(status, rc, seconds, out[-max_output_chars:], err[-max_output_chars:])


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def extract_code(text: str) -> str:
    """The code in a model answer: the first fenced block (```python ... ```), else the text itself."""
    import re

    m = re.search(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|$)", text, flags=re.DOTALL)
    return m.group(1) if m else text


def build_program(record: dict, prediction: str) -> str:
    """Program to execute for a code task row.

    HumanEval style rows (``entry_point``, ``test``): prompt + completion + test + ``check(entry_point)``;
    a completion that already defines the function replaces the prompt.
    MBPP style rows (``test`` or ``tests``/``test_list``): extracted code + the test statements.
    """
    code = extract_code(prediction)
    tests = record.get("test")
    if tests is None:
        tests = "\n".join(record.get("tests") or record.get("test_list") or [])
    if not tests:
        from moecraft.errors import DataError

        raise DataError("code task row has no 'test', 'tests' or 'test_list' field")
    setup = record.get("test_setup_code", "")
    entry = record.get("entry_point")
    if entry:
        body = code if f"def {entry}" in code else record.get("prompt", "") + code
        return f"{setup}\n{body}\n\n{tests}\n\ncheck({entry})\n"
    return f"{setup}\n{code}\n\n{tests}\n"
