"""The code executor passes good code, fails wrong code, kills runaway code, and refuses to run unsandboxed.

These tests run everywhere: without bubblewrap they use the explicit unsafe mode (our own trusted test
programs). The sandbox's containment of hostile programs is tested in tests/test_code_sandbox.py.
"""

import functools
import os

import pytest

from moecraft.errors import MoecraftError
from moecraft.eval.code_exec import build_program, extract_code, run_python, sandbox_status

SANDBOXED = not sandbox_status().startswith("none")
run = functools.partial(run_python, unsafe=not SANDBOXED)


@pytest.mark.parametrize(
    ("program", "status"),
    [
        ("assert sum(range(4)) == 6", "passed"),
        ("assert 1 == 2", "failed"),
        ("raise SystemExit(3)", "failed"),
        ("open('scratch.txt', 'w').write('inside the work folder is fine')", "passed"),
        ("x = bytearray(8 * 1024**3)", "memory"),
        # only reaching the end counts: an early clean exit never passes
        ("import sys\nsys.exit(0)\nassert False", "failed"),
        ("import os\nos._exit(0)\nassert False", "failed"),
        ("raise SystemExit", "failed"),
    ],
)
def test_statuses(program, status):
    assert run(program, timeout=5).status == status


def test_environment_is_scrubbed():
    os.environ["MOECRAFT_SECRET_TEST"] = "x"
    try:
        assert run("import os\nassert 'MOECRAFT_SECRET_TEST' not in os.environ", timeout=5).passed
    finally:
        del os.environ["MOECRAFT_SECRET_TEST"]


@pytest.mark.parametrize("program", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_runaway_code_is_killed(program):
    r = run(program, timeout=1.0)
    assert r.status == "timeout"
    assert r.seconds < 4


def test_output_keeps_the_tail():
    r = run("import sys\nprint('a' * 10000)\nprint('the end')\nsys.stderr.write('e' * 9000 + 'tail')", timeout=5,
            max_output_chars=100)
    assert r.passed and r.output_truncated
    assert r.stdout == ("a" * 10000 + "\nthe end\n")[-100:]
    assert r.stderr == ("e" * 9000 + "tail")[-100:]
    small = run("print('hi')", timeout=5)
    assert small.stdout == "hi\n" and not small.output_truncated


def test_humaneval_and_mbpp_programs():
    he = {"prompt": "def add(a, b):\n", "entry_point": "add",
          "test": "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"}
    assert run(build_program(he, "    return a + b\n")).passed
    assert not run(build_program(he, "    return a - b\n")).passed
    # a full definition in a fenced block replaces the prompt
    assert run(build_program(he, "Sure:\n```python\ndef add(a, b):\n    return b + a\n```")).passed
    mbpp = {"prompt": "write sq", "test_list": ["assert sq(3) == 9", "assert sq(0) == 0"]}
    assert run(build_program(mbpp, "def sq(x):\n    return x * x")).passed
    assert not run(build_program(mbpp, "def sq(x):\n    return x + x")).passed
    assert extract_code("no fence") == "no fence"


def test_without_bwrap_status_says_none_and_run_python_refuses(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on the PATH
    assert sandbox_status() == "none: bwrap not found (Debian: apt-get install bubblewrap)"
    with pytest.raises(MoecraftError, match=r"needs a sandbox, but there is none: bwrap not found.*--unsafe-code-exec"):
        run_python("assert True")
    # the explicit opt-out runs it (on the host)
    assert run_python("assert True", unsafe=True).passed
    assert not run_python("assert False", unsafe=True).passed


@pytest.mark.skipif(not SANDBOXED, reason=f"no code sandbox here ({sandbox_status()})")
def test_status_names_bubblewrap_and_the_uid():
    status = sandbox_status()
    assert status.startswith("bubblewrap ") and "net" in status and "65534" in status, status
