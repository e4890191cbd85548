"""Every `moecraft ...` command of the README's ```bash blocks runs, in README order, on tiny models.

Commands run through ``moecraft.cli.main`` in one temporary folder, so outputs of earlier commands (scores,
expert configs, runs, crafted artifacts) feed later ones, as in the README. What a command names that does not
exist offline is replaced (``SUBSTITUTE``: hub ids -> ``tiny:<kind>``, the GGUF file -> ``tiny:llama``), data
files it names are written from the built-in intent task, and size options are added to keep it fast
(``FAST``). Optional parts in ``[...]`` are left out; ``a|b`` choices take ``a``.

A new README command that cannot run fails with the README line and the command; make it runnable by adding a
substitution (or a file in ``FILES``) here. Re-run after editing the README with:
``python -m pytest tests/test_readme_commands.py -q``.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from moecraft.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"

# names in README commands that cannot be used offline -> what stands in for them
SUBSTITUTE = {
    "deepseek-ai/DeepSeek-V2-Lite": "tiny:deepseek_v2",
    "meta-llama/Llama-2-7b-hf": "tiny:llama",
    "M": "tiny:deepseek_v2",
    "SmolLM2-135M-Instruct.Q4_1.gguf": "tiny:llama",  # the real file is tested in tests/test_real_models.py
    "Qwen/Qwen3-30B-A3B": "tiny:qwen3_moe",
}
# files the README's commands read but no README command writes: target -> an earlier output it copies
FILES = {"s1.json": "scores.json", "s2.json": "scores.json", "base.json": "scores.json", "tuned.json": "scores.json"}
# added to every call of a command (after the README's options, so they win): small and fast
FAST = {
    "score": ["--seq-len", "64", "--n-sequences", "2"],
    "train": ["--seq-len", "256", "--max-steps", "2", "--eval-sequences", "1", "--progress", "false"],
    "eval": ["--limit", "2", "--max-new-tokens", "4", "--seq-len", "64"],
    "generate": ["--max-new-tokens", "4"],
    "demo": ["--steps", "2", "--eval-limit", "2", "--max-new-tokens", "4", "--seq-len", "64"],
}


def readme_commands(text: str) -> list[tuple[int, str]]:
    """(README line, command) of every `moecraft ...` command in a ```bash block, continuation lines joined."""
    out, in_bash, pending, start = [], False, "", 0
    for no, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_bash = not in_bash and stripped[3:].strip() in ("bash", "sh", "shell", "console")
            pending = ""
            continue
        if not in_bash:
            continue
        if not pending:
            start = no
        pending += " " + stripped.removesuffix("\\").strip() if pending else stripped.removesuffix("\\").strip()
        if stripped.endswith("\\"):
            continue
        command, pending = pending.strip(), ""
        command = command.removeprefix("$ ")
        if command.startswith("moecraft "):
            out.append((start, command))
    return out


def runnable(command: str) -> list[str]:
    """argv (without `moecraft`) of a README command: comments, ``[...]`` and ``a|b`` resolved, names substituted."""
    command = re.sub(r"\[[^\]]*\]", " ", command)  # optional parts
    argv = shlex.split(command, comments=True)[1:]
    argv = [SUBSTITUTE.get(a, a) for a in argv]
    argv = [a.split("|")[0] if "|" in a and not a.startswith("-") else a for a in argv]
    return argv + FAST.get(argv[0], []) if argv else argv


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


def _data_file(path: Path) -> None:
    from moecraft.data import load_records

    records = load_records("builtin:intent", 24)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), str(path))
        return
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


def test_readme_has_the_commands_of_each_section():
    names = [runnable(c)[0] for _, c in COMMANDS]
    for name in ("score", "select", "train", "merge", "craft", "generate", "export", "eval", "analyze", "convert"):
        assert name in names, f"no `moecraft {name}` in the README's bash blocks"


@pytest.mark.parametrize("line,command", COMMANDS, ids=[f"README:{n}" for n, _ in COMMANDS])
def test_readme_command_runs(line, command, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    argv = runnable(command)
    for arg in argv:
        for part in arg.replace("=", ",").split(","):
            if part.endswith((".jsonl", ".parquet")) and not Path(part).exists():
                _data_file(Path(part))
            if part in FILES and not Path(part).exists() and Path(FILES[part]).exists():
                shutil.copy(FILES[part], part)
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse: unknown option or bad choice
        rc = exc.code
    captured = capsys.readouterr()
    assert rc == 0, (f"README.md line {line}: `{command}` failed (exit {rc}) as `moecraft {shlex.join(argv)}` "
                     f"in {workdir}:\n{captured.err[-1500:]}\nMake it runnable, or map what it names in "
                     f"tests/test_readme_commands.py (SUBSTITUTE / FILES).")
