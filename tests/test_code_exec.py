"""The guarded executor passes good code, fails wrong code, and kills runaway or forbidden code."""

import os

import pytest

from moecraft.eval.code_exec import build_program, extract_code, run_python


@pytest.mark.parametrize(
    ("program", "status"),
    [
        ("assert sum(range(4)) == 6", "passed"),
        ("assert 1 == 2", "failed"),
        ("raise SystemExit(3)", "failed"),
        ("open('scratch.txt', 'w').write('inside the work folder is fine')", "passed"),
        ("import socket\nsocket.create_connection(('127.0.0.1', 80))", "forbidden"),
        ("import urllib.request\nurllib.request.urlopen('http://example.com')", "forbidden"),
        ("import subprocess\nsubprocess.run(['true'])", "forbidden"),
        ("import os\nos.fork()", "forbidden"),
        # a try/except in the program cannot swallow the guard
        ("import os\ntry:\n    os.system('true')\nexcept BaseException:\n    pass", "forbidden"),
        ("import ctypes\nctypes.CDLL(None).system(b'true')", "forbidden"),
        ("import os, signal\nos.kill(1, signal.SIGTERM)", "forbidden"),
        ("x = bytearray(8 * 1024**3)", "memory"),
    ],
)
def test_statuses(program, status):
    assert run_python(program, timeout=5).status == status


def test_writes_outside_the_work_folder_are_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    r = run_python(f"open({str(target)!r}, 'w').write('x')", timeout=5)
    assert r.status == "forbidden"
    assert not target.exists()


def test_environment_is_scrubbed():
    os.environ["MOECRAFT_SECRET_TEST"] = "x"
    try:
        assert run_python("import os\nassert 'MOECRAFT_SECRET_TEST' not in os.environ", timeout=5).passed
    finally:
        del os.environ["MOECRAFT_SECRET_TEST"]


@pytest.mark.parametrize("program", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_runaway_code_is_killed(program):
    r = run_python(program, timeout=1.0)
    assert r.status == "timeout"
    assert r.seconds < 10


def test_humaneval_and_mbpp_programs():
    he = {"prompt": "def add(a, b):\n", "entry_point": "add",
          "test": "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"}
    assert run_python(build_program(he, "    return a + b\n")).passed
    assert not run_python(build_program(he, "    return a - b\n")).passed
    # a full definition in a fenced block replaces the prompt
    assert run_python(build_program(he, "Sure:\n```python\ndef add(a, b):\n    return b + a\n```")).passed
    mbpp = {"prompt": "write sq", "test_list": ["assert sq(3) == 9", "assert sq(0) == 0"]}
    assert run_python(build_program(mbpp, "def sq(x):\n    return x * x")).passed
    assert not run_python(build_program(mbpp, "def sq(x):\n    return x + x")).passed
    assert extract_code("no fence") == "no fence"
