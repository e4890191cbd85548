"""Run untrusted, model-written Python inside an OS-level sandbox built with bubblewrap (``bwrap``).

A Python-level guard cannot contain code that runs in the same interpreter, so the containment here is the
kernel's. What the sandbox guarantees (``sandbox_status()`` says which sandbox this machine has):

- **network**: a new network namespace holding only its own loopback; no host port (127.0.0.1 included),
  no outside address, no abstract unix socket of the host is reachable;
- **files**: the program sees only a read-only view of ``/usr``, ``/etc``, the Python installation and its
  own read-only program folder; ``/home``, ``/root``, ``/tmp``, ``/run`` (sockets) and the rest of the host
  do not exist for it. Its only writable place is a private, size-capped ``/tmp`` (tmpfs, the working
  folder), thrown away afterwards: renames, hard links, symlinks or ``dir_fd`` writes cannot reach the host;
- **user**: run as root (CI), the program runs as uid/gid 65534 (nobody), with no capabilities and
  ``no_new_privs``, so files readable only by root stay unreadable. Run as another user, it keeps that
  user's uid (mapped to 65534 inside a user namespace, which cannot nest further) and sees the same view;
- **processes**: a new pid namespace. When the program ends, or at the wall-clock deadline, the namespace
  is killed as a whole (children in their own session included), also if the evaluator itself dies;
- **rlimits**: CPU seconds, address space, file size, open files, processes (a fork bomb stops there),
  no core files;
- **output**: stdout/stderr are drained as they come and only the last ``max_output_chars`` are kept,
  so the evaluator's memory stays bounded whatever the program prints;
- **pass**: only when the harness, after the program's last statement ran, copies a per-run random token
  from a private pipe to another one. The exit status, printed text, ``os._exit(0)``, ``sys.exit(0)``,
  a crash or a kill never count as a pass. (In-process code can always game its own tests, e.g. by
  digging that token out of its process or by returning objects equal to everything; the token stops the
  cheap ways to fake a pass, not deliberate test tampering.)

Without bubblewrap, ``run_python`` refuses (``MoecraftError``) unless called with ``unsafe=True``
(``moecraft eval --unsafe-code-exec``): then the program runs on the host with only the rlimits, the
process-group kill, the output cap and the pass token, and can read, write and connect like the user.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

from moecraft.errors import MoecraftError

Status = Literal["passed", "failed", "timeout", "memory"]
SANDBOX_UID = 65534  # nobody/nogroup on Debian; also the uid a user namespace maps the caller to
WORK_MB = 64  # size of the private /tmp, and the largest file the program may write
MAX_PROCS = 64  # processes + threads of the program (uid-wide when run as root: keep it small)
MAX_OPEN_FILES = 256

# Runs first inside the sandbox (trusted): lower the rlimits (hard = soft, so the program cannot raise
# them), run the program in a fresh __main__ namespace, and only if its last statement was reached, fetch
# the pass token from one pipe and write it to the other. The token is not in this process before that.
_RUNNER = r'''
import os, resource, sys
_prog, _tok_in, _tok_out, _cpu, _mem, _fsize, _nofile, _nproc = sys.argv[1:9]
for _res, _n in ((resource.RLIMIT_CPU, int(_cpu)), (resource.RLIMIT_AS, int(_mem)),
                 (resource.RLIMIT_FSIZE, int(_fsize)), (resource.RLIMIT_NOFILE, int(_nofile)),
                 (resource.RLIMIT_NPROC, int(_nproc)), (resource.RLIMIT_CORE, 0)):
    if _n >= 0:
        resource.setrlimit(_res, (_n, _n))
with open(_prog, encoding="utf-8") as _f:
    _code = compile(_f.read(), "program.py", "exec")
sys.argv = ["program.py"]
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
for _s in (sys.stdout, sys.stderr):
    try:
        _s.flush()
    except (OSError, ValueError):
        pass
os.write(int(_tok_out), os.read(int(_tok_in), 64))
os._exit(0)
'''


@dataclass
class ExecResult:
    status: Status
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str
    output_truncated: bool = False

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class _Sandbox:
    bwrap: str
    setpriv: str | None  # set when the evaluator is root: drop to SANDBOX_UID inside the namespaces
    description: str


def sandbox_status() -> str:
    """One line on the code sandbox: e.g. ``bubblewrap 0.8.0 (mount+pid+net+ipc+uts namespaces, uid 65534,
    ...)`` or ``none: bwrap not found ...``. Never raises."""
    return _sandbox()[1]


def _sandbox() -> tuple[_Sandbox | None, str]:
    try:
        return _detect(shutil.which("bwrap"), os.geteuid())
    except Exception as e:  # noqa: BLE001 - a status line must not fail the command that prints it
        return None, f"none: sandbox check failed: {type(e).__name__}: {e}"


def require_sandbox() -> None:
    """Raise ``MoecraftError`` when no working sandbox is available (model code must not run unsandboxed)."""
    status = sandbox_status()
    if status.startswith("none"):
        raise MoecraftError(
            f"code_pass@1 runs model-written code and needs a sandbox, but there is {status}; install "
            "bubblewrap (Debian: apt-get install bubblewrap) or pass --unsafe-code-exec to run it unsandboxed")


@functools.cache
def _detect(bwrap: str | None, euid: int) -> tuple[_Sandbox | None, str]:
    """The sandbox (if any) and its status line, checked once per bwrap path and uid by a real probe run."""
    if bwrap is None:
        return None, "none: bwrap not found (Debian: apt-get install bubblewrap)"
    setpriv = None
    if euid == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            return None, "none: running as root needs setpriv (util-linux) to drop to uid 65534"
    out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=30)
    version = out.stdout.strip() or "bubblewrap (unknown version)"
    if euid == 0:
        how = f"mount+pid+net+ipc+uts namespaces, uid {SANDBOX_UID}, no capabilities"
    else:
        how = f"user+mount+pid+net+ipc+uts namespaces, your uid {euid} mapped to {SANDBOX_UID}"
    box = _Sandbox(bwrap, setpriv, f"{version} ({how}, rlimits)")
    # A probe: bwrap may exist yet fail here (no user namespaces, seccomp-filtered container, ...).
    probe = _run(f"import os, sys\nassert os.getuid() == {SANDBOX_UID}\nassert sys.prefix == {sys.prefix!r}\n",
                 box, 30.0, 256, 2000)
    if not probe.passed:
        why = (probe.stderr.strip().splitlines() or [f"status {probe.status}, exit {probe.returncode}"])[-1]
        return None, f"none: {version} cannot start a sandbox here: {why}"
    return box, box.description


def run_python(
    program: str,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_output_chars: int = 4000,
    unsafe: bool = False,
) -> ExecResult:
    """Run ``program`` in the sandbox; ``passed`` iff its last statement ran within ``timeout`` seconds.

    Without a sandbox this raises ``MoecraftError``, unless ``unsafe`` (then the program runs on the host).
    """
    box = _sandbox()[0]
    if box is None and not unsafe:
        require_sandbox()
    return _run(program, box, timeout, memory_mb, max_output_chars)


def _python_paths() -> list[str]:
    """Folders the sandboxed interpreter needs beyond /usr: its prefixes (a venv and the Python it came from)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))}
    paths |= {os.path.realpath(p) for p in paths}
    return sorted(p for p in paths if p and os.path.isdir(p) and not _under(p, ("/usr", "/etc", "/proc", "/dev")))


def _under(path: str, tops: tuple[str, ...]) -> bool:
    return any(path == t or path.startswith(t + "/") for t in tops)


def _ancestors(path: str) -> list[str]:
    """``/a/b/c`` -> ``["/a", "/a/b"]``."""
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _bwrap_argv(box: _Sandbox, folder: str) -> list[str]:
    argv = [box.bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if box.setpriv is None:  # not root: a user namespace, which the program may not nest
        argv += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--disable-userns"]
    argv += ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    size = str(WORK_MB * 2**20)
    # the private, size-capped writable folders come before the Python binds: a venv under /tmp stays visible
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", size, "--tmpfs", "/tmp",
             "--perms", "1777", "--size", size, "--tmpfs", "/dev/shm"]
    made = {"/tmp", "/dev", "/dev/shm"}  # already mounted: keep their modes
    for p in _python_paths():  # sorted: a parent is bound before what lies under it
        # bwrap would create the missing parents (e.g. /root of /root/.pyenv/...) as 0700 root: unreadable
        # for the sandbox's uid, so make them 0755 first
        parents = [d for d in _ancestors(p) if d not in made]
        for d in parents:
            argv += ["--perms", "0755", "--dir", d]
        made.update(parents)
        argv += ["--ro-bind", os.path.realpath(p), p]
        made.add(p)
    argv += ["--ro-bind", folder, "/moecraft", "--chdir", "/tmp"]
    if box.setpriv is not None:  # root: bwrap sets up the mounts, then setpriv becomes nobody for good
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--", box.setpriv,
                 "--reuid", str(SANDBOX_UID), "--regid", str(SANDBOX_UID), "--clear-groups",
                 "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
    return argv + ["--"]


def _run(program: str, box: _Sandbox | None, timeout: float, memory_mb: int, max_output_chars: int) -> ExecResult:
    token = secrets.token_hex(16).encode()
    with tempfile.TemporaryDirectory(prefix="moecraft-exec-") as folder:
        os.chmod(folder, 0o755)  # the sandbox's uid must read it (bound read-only)
        for name, text in (("program.py", program), ("runner.py", _RUNNER)):
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                f.write(text)
        if box is not None:
            work, inside = None, "/moecraft"
            prefix = _bwrap_argv(box, folder)
        else:  # unsafe: on the host, in a throwaway folder
            work = tempfile.mkdtemp(prefix="moecraft-work-")
            inside, prefix = folder, []
        tok_r, tok_w = os.pipe()  # token in: the runner reads it only after the program's last statement
        res_r, res_w = os.pipe()  # token out
        os.write(tok_w, token)
        os.close(tok_w)
        cpu = math.ceil(timeout) + 1
        argv = prefix + [
            sys.executable, "-I", "-B", f"{inside}/runner.py", f"{inside}/program.py", str(tok_r), str(res_w),
            str(cpu), str(memory_mb * 2**20), str(WORK_MB * 2**20), str(MAX_OPEN_FILES),
            # unsafe mode: RLIMIT_NPROC would count every process of the user, not only the program's
            str(MAX_PROCS if box is not None else -1)]
        home = "/tmp" if box is not None else work
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        start = time.monotonic()
        try:
            proc = subprocess.Popen(argv, cwd=work or folder, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(tok_r, res_w),
                                    start_new_session=True)
        except BaseException:
            os.close(res_r)
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            os.close(tok_r)
            os.close(res_w)
        try:
            out, err, truncated, timed_out = _collect(proc, start + timeout, 4 * max_output_chars)
            seconds = time.monotonic() - start
            os.set_blocking(res_r, False)
            try:
                got = os.read(res_r, len(token) + 1)
            except BlockingIOError:
                got = b""
        finally:
            os.close(res_r)
            _kill_group(proc)
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
    rc = proc.returncode
    if rc is not None and rc > 128 and box is not None:  # bwrap reports death by signal N as 128 + N
        rc = -(rc - 128)
    if timed_out or rc == -signal.SIGXCPU:
        status: Status = "timeout"
    elif got == token and rc == 0:
        status = "passed"
    elif b"MemoryError" in err:
        status = "memory"
    else:
        status = "failed"
    text = lambda b: b.decode("utf-8", errors="replace")[-max_output_chars:]  # noqa: E731
    return ExecResult(status, rc, seconds, text(out), text(err), truncated)


def _collect(proc: subprocess.Popen, deadline: float, keep: int) -> tuple[bytes, bytes, bool, bool]:
    """Drain stdout and stderr until both close, keeping the last ``keep`` bytes of each; kill at ``deadline``.

    Returns (stdout, stderr, truncated, timed_out). Waits on the process, not on the pipes: once the
    program has ended (or was killed), a pipe still held open by an escaped child (only possible in unsafe
    mode) is given up after a short grace period.
    """
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    truncated = timed_out = False
    give_up = None
    while sel.get_map():
        now = time.monotonic()
        if give_up is None and (proc.poll() is not None or now >= deadline):
            if proc.poll() is None:
                timed_out = True
            _kill_group(proc)
            give_up = now + 2.0
        if give_up is not None and now >= give_up:
            break
        wait = (give_up if give_up is not None else min(deadline, now + 0.1)) - now
        for key, _ in sel.select(max(wait, 0.0)):
            chunk = os.read(key.fd, 1 << 16)
            if not chunk:
                sel.unregister(key.fd)
                continue
            buf = bufs[key.fd]
            buf += chunk
            if len(buf) > 2 * keep:  # trim now and then: memory stays O(keep) however much is printed
                del buf[:-keep]
                truncated = True
    sel.close()
    if proc.poll() is None:
        if time.monotonic() >= deadline:
            timed_out = True
        _kill_group(proc)
    proc.wait()
    out, err = (bytes(b[-keep:]) for b in bufs.values())
    truncated = truncated or any(len(b) > keep for b in bufs.values())
    proc.stdout.close()
    proc.stderr.close()
    return out, err, truncated, timed_out


def _kill_group(proc: subprocess.Popen) -> None:
    # bwrap leads the group; its death takes the pid namespace with it (--die-with-parent)
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
