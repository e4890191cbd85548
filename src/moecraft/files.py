"""File helpers: JSON for score, expert-config and artifact files; file hashes; and the one mechanism every
command that writes uses to claim its output, so that no output ever loses work.

The output rules (README "Output folders and files"):

* an existing output is refused unless ``--overwrite`` (``train`` also continues in it with ``--resume``);
* an output that equals, contains or lies inside an input (model folder, data file, artifact, ...) is refused;
* a lock file beside the output (``.<name>.moecraft-lock``, ``flock``) makes a second concurrent run into
  the same output fail at once with ``another moecraft run is writing to X (pid N)``;
* a folder is written into a temporary sibling (``.<name>.moecraft-tmp-<pid>``) and renamed into place
  when complete; a file is written to a temporary file beside it, fsynced and ``os.replace``-d. On
  ``--overwrite`` the old output is replaced only once the new one is complete. ``train`` and ``demo``
  write in place (checkpoints, resumable) and hold the lock for the whole run;
* a folder being written holds the marker file ``.moecraft-incomplete``: every command refuses to read a
  folder that has it (a temporary sibling left by a killed run, or a ``train`` that has not finished),
  and the next run into the same output removes temporary siblings left by killed runs;
* written files get mode ``0o666 & ~umask`` and folders ``0o777 & ~umask`` (safetensors alone would write 0600).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from moecraft.errors import MoecraftError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no flock, runs are not guarded against each other
    fcntl = None

MARKER = ".moecraft-incomplete"
_TMP = ".moecraft-tmp-"
_OLD = ".moecraft-old-"
_LOCK = ".moecraft-lock"

PathLike = str | Path


class _RepeatedKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object, refusing a key given twice (``json`` would keep the last one silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        repeated = sorted({k for k, _ in pairs if sum(1 for k2, _ in pairs if k2 == k) > 1})
        raise _RepeatedKey(f"key {repeated[0]!r} appears more than once")
    return out


def read_json(path: str | Path, what: str) -> dict:
    """The JSON object in ``path``; a missing file or bad JSON is a MoecraftError naming ``what`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise MoecraftError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError, _RepeatedKey) as exc:
        raise MoecraftError(f"{path}: not a valid JSON {what} ({exc})") from exc
    except RecursionError:
        raise MoecraftError(f"{path}: not a valid JSON {what} (nested too deeply)") from None
    if not isinstance(data, dict):
        raise MoecraftError(f"{path}: not a {what} (expected a JSON object)")
    return data


# ----------------------------------------------------------------------------- modes and atomic files
def _umask() -> int:
    try:  # Linux reports it without changing it (setting it, even briefly, races with other threads)
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


def fix_modes(path: PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes the umask asks for:
    files ``0o666 & ~umask``, folders ``0o777 & ~umask`` (safetensors and mkstemp write 0600, mkdtemp 0700)."""
    mask = _umask()
    path = Path(path)
    if not path.is_dir():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically: a temporary file beside ``path``, fsync, ``os.replace``. A full
    disk or a kill leaves the old file (or none), never half a file. Creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP}", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        fix_modes(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: PathLike, data: dict) -> Path:
    """Write ``data`` as readable UTF-8 JSON, atomically (:func:`write_text`). Floats keep their exact value."""
    return write_text(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- checks
def check_output_file(path: PathLike, option: str) -> None:
    """Fail before any work when an output file path is an existing folder (it could not be written later)."""
    if Path(path).is_dir():
        raise MoecraftError(f"{option} {path} is a folder; give a file path")


def check_output_folder(path: PathLike, option: str) -> None:
    """Fail before any work when an output folder path is an existing file."""
    if Path(path).exists() and not Path(path).is_dir():
        raise MoecraftError(f"{option} {path} is an existing file; give a folder path")


def check_not_input(out: PathLike, inputs: Iterable[PathLike | None], option: str) -> None:
    """Fail when ``out`` equals, contains or lies inside one of ``inputs`` (compared after resolving symlinks).

    Inputs that are not local paths (``tiny:...``, ``builtin:...``, hub ids) are skipped.
    """
    target = Path(out).expanduser().resolve()
    for item in inputs:
        if item is None or str(item) == "":
            continue
        p = Path(item).expanduser()
        if not p.exists():
            continue
        p = p.resolve()
        if p == target:
            where = "is"
        elif target in p.parents:
            where = "contains"
        elif p in target.parents:
            where = "is inside"
        else:
            continue
        raise MoecraftError(f"{option} {out} {where} the input {item}; write the output somewhere else")


def check_complete(folder: PathLike) -> None:
    """Fail when ``folder`` is an output still being written, or left behind by a killed run."""
    if (Path(folder) / MARKER).exists():
        raise MoecraftError(f"{folder} is an unfinished moecraft output ({MARKER} present: the run writing it was "
                            "stopped or is still running); use a finished output, or finish the run (train --resume)")


def _check_free(target: Path, option: str, allowed: bool, hint: str, shown: PathLike | None = None) -> None:
    if allowed:
        return
    shown = target if shown is None else shown
    if target.is_dir() and any(target.iterdir()):
        extra = " (an unfinished run)" if (target / MARKER).exists() else ""
        raise MoecraftError(f"{option} {shown} is not empty{extra}; {hint}")
    if target.is_file():
        raise MoecraftError(f"{option} {shown} exists; {hint}")


def _real(path: PathLike) -> Path:
    """Where an output really goes: ``.``, ``..`` and symlinks resolved, so that the lock, the temporary
    sibling and the rename all act beside the real folder (``--out .`` included)."""
    return Path(path).expanduser().resolve()


# ----------------------------------------------------------------------------- lock
@contextlib.contextmanager
def output_lock(target: PathLike, shown: PathLike | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``.<name>.moecraft-lock`` beside ``target``; a second holder fails at once.

    The lock file is removed on release. An acquirer checks that the file it locked is still the one at the
    path (the holder may have removed it in between) and retries if not, so two runs never both hold it.
    The kernel drops the lock when a process dies, so a killed run never leaves a stale lock.
    """
    target = _real(target)
    shown = target if shown is None else shown
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock = target.parent / f".{target.name}{_LOCK}"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise MoecraftError(f"another moecraft run is writing to {shown} (pid {pid}); wait for it to finish, "
                                "or write somewhere else") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing ancestors; returns those created, outermost first."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _remove_empty(created: list[Path]) -> None:
    for p in reversed(created):  # innermost first; stop at the first that something else now uses
        try:
            p.rmdir()
        except OSError:
            break


def _siblings(target: Path, tag: str) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}{tag}*"))


def _clean_stale(target: Path) -> None:
    """Under the lock: siblings of ``target`` left by killed runs. Temporary ones are removed; an old output
    moved aside for an ``--overwrite`` that was killed before the new one took its place is put back."""
    for tmp in _siblings(target, _TMP):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    for old in _siblings(target, _OLD):
        if not target.exists():
            os.replace(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _publish(tmp: Path, target: Path) -> None:
    """Rename the complete ``tmp`` folder to ``target``; an old ``target`` is removed only after that."""
    if target.is_dir() and any(target.iterdir()):
        old = target.parent / f".{target.name}{_OLD}{os.getpid()}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if target.is_dir():
            target.rmdir()
        os.replace(tmp, target)


# ----------------------------------------------------------------------------- the claims
@contextlib.contextmanager
def output_folder(path: PathLike, *, option: str = "--out", inputs: Iterable[PathLike | None] = (),
                  overwrite: bool = False) -> Iterator[Path]:
    """Claim the output folder ``path`` of a command; yields the temporary sibling to write into.

    Checks first (an existing file, an input inside/around it, a non-empty folder without ``overwrite``), then
    holds the lock while the body runs. When the body returns, the temporary folder gets the umask's modes
    and is renamed to ``path``; when it raises, it is removed and ``path`` stays as it was.
    """
    check_output_folder(path, option)
    check_not_input(path, inputs, option)
    target = _real(path)
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:  # the rename at the end would pull the folder from under the shell
        raise MoecraftError(f"{option} {path} is or contains the current working folder; give another folder")
    created = _make_parents(target.parent)
    done = False
    try:
        with output_lock(target, path):  # first, so that a run in progress is named as such
            _clean_stale(target)
            _check_free(target, option, overwrite, "use --overwrite to replace it", path)
            tmp = target.parent / f".{target.name}{_TMP}{os.getpid()}"
            tmp.mkdir()
            (tmp / MARKER).touch()
            try:
                yield tmp
                (tmp / MARKER).unlink()
                fix_modes(tmp)
                _publish(tmp, target)
                done = True
            finally:
                if not done:
                    shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if not done:
            _remove_empty(created)


@contextlib.contextmanager
def output_file(path: PathLike, *, option: str = "--out", inputs: Iterable[PathLike | None] = (),
                overwrite: bool = False, lock: bool = True) -> Iterator[Path]:
    """Claim the output file ``path`` of a command (checks, then the lock while the body runs); yields ``path``.

    Write it with :func:`write_json` / :func:`write_text` (atomic). ``lock=False`` only checks (the processes
    of a multi-process run that do not write).
    """
    check_output_file(path, option)
    check_not_input(path, inputs, option)
    target = _real(path)
    if not lock:
        _check_free(target, option, overwrite, "use --overwrite to replace it", path)
        yield Path(path)
        return
    created = _make_parents(target.parent)
    done = False
    try:
        with output_lock(target, path):
            _clean_stale(target)
            _check_free(target, option, overwrite, "use --overwrite to replace it", path)
            yield Path(path)
            done = True
    finally:
        if not done and not target.exists():
            _remove_empty(created)


class RunFolder:
    """An output folder written in place over a long run (``train``: checkpoints, ``--resume``; ``demo``).

    :meth:`start` creates it once the run's inputs have passed their checks (``--overwrite`` clears the old
    contents then) and puts the marker in it; :meth:`finish` sets the modes and removes the marker, so the
    folder is accepted by other commands only once the run has written everything.
    """

    def __init__(self, path: Path, overwrite: bool, writer: bool):
        self.path, self.overwrite, self.writer = path, overwrite, writer

    def start(self) -> Path:
        if self.writer:
            if self.overwrite and self.path.is_dir():
                for child in self.path.iterdir():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / MARKER).touch()
        return self.path

    def finish(self) -> None:
        if self.writer:
            fix_modes(self.path)
            (self.path / MARKER).unlink(missing_ok=True)


@contextlib.contextmanager
def run_folder(path: PathLike, *, option: str = "--out", inputs: Iterable[PathLike | None] = (),
               overwrite: bool = False, resume: bool | None = None, writer: bool = True) -> Iterator[RunFolder]:
    """Claim a long-lived output folder (see :class:`RunFolder`): refuse it when not empty unless ``resume``
    or ``overwrite``, refuse inputs inside or around it, and hold the lock for the whole run.

    ``resume=None``: the command has no ``--resume``. ``writer=False`` (the other processes of a
    multi-process run) only checks; the main process locks.
    """
    check_output_folder(path, option)
    check_not_input(path, inputs, option)
    target = _real(path)
    hint = ("use --resume to continue the run in it, or --overwrite to replace it" if resume is not None
            else "use --overwrite to replace it")
    folder = RunFolder(Path(path), bool(overwrite and not resume), writer)
    if not writer:
        _check_free(target, option, bool(resume or overwrite), hint, path)
        yield folder
        return
    created = _make_parents(target.parent)
    ok = False
    try:
        with output_lock(target, path):
            _check_free(target, option, bool(resume or overwrite), hint, path)
            yield folder
            ok = True
    finally:
        if not ok and not target.exists():
            _remove_empty(created)
