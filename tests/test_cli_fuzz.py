"""Fuzz test of the option parser: any argv and any YAML config end in success or one error line, exit 2.

For every command, hypothesis draws argument lists from the command's own option names (``--opt value``,
``--opt=value``, a bare ``--opt``, unknown options) with odd values (nan, inf, huge, negative, empty, unicode,
lists, line breaks, NUL), optionally a ``--config`` YAML file of random shape, and ``--print-config``.
Each command's ``run`` is replaced by a no-op that re-checks the config it gets, so nothing heavy runs: what
is tested is parse + resolve + check. The property: ``moecraft.cli.main`` returns 0 or exits with 2, never
raises; on 2, stderr is exactly one line ``moecraft <command>: error: ...``; printed configs load back.
Derandomized and bounded (a few seconds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecraft import cli
from moecraft.cli import _command_modules, main
from moecraft.config import check_config, from_dict

COMMANDS = dict(_command_modules())

ODD_VALUES = [
    "0", "1", "-1", "1.5", "-0.5", "2", "64", "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e999", "-1e999",
    "1e-400", str(2**63), str(2**64), str(-(2**63) - 1), "", " ", "  3", "abc", "１", "٣", "²", "1_000", "0x10",
    "0b1", "1e1", "true", "false", "maybe", "yes", "null", "~", "a,b", ",", ",,", "1,,2", "[1]", "{a: 1}",
    "🙂", "x" * 300, "a\nb", "\r", "-", "--", "a\x00b", "\udcff", "auto", "cpu", "cuda:99", "bf16", "fp8",
    "tiny:llama", "builtin:intent", "gate", "token", "esft", "median", "/", ".", "..", "~/x",
]
YAML_TEXTS = [
    "", "- a\n- b\n", "a: [\n", ": :\n", "!!python/object:os.system x\n", "a: &x 1\nb: *x\n", "x: *nope\n",
    "lr: .nan\n", "seq_len: 1.0e+400\n", "stop: &s [*s]\n", "limit: 1\nlimit: 2\n", "? [a]\n: 1\n",
    "\ufeffmodel: m\n", "%YAML 1.1\n---\nseed: 1\n...\n---\nseed: 2\n", "'unterminated\n", "\t- tab\n",
    "stop: " + "[" * 200 + "]" * 200 + "\n",
    "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
    "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nh: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\ni: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n",
]

values = st.one_of(
    st.sampled_from(ODD_VALUES),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)
yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([10**400, -(10**400), 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(ODD_VALUES),
)
yaml_values = st.recursive(yaml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8)


def _names(cmd: str) -> list[str]:
    return [f.name for f in dataclasses.fields(COMMANDS[cmd].CONFIG)]


@st.composite
def invocations(draw, cmd: str) -> tuple[list[str], str | None]:
    """(argv after the command name, YAML text or None)."""
    names = _names(cmd)
    argv: list[str] = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.one_of(st.sampled_from(names), st.sampled_from(["bogus", "config", "l", "p"])))
        flag = "--" + name.replace("_", "-")
        form = draw(st.sampled_from(["separate", "equals", "bare"]))
        value = draw(values)
        argv += [flag, value] if form == "separate" else [f"{flag}={value}"] if form == "equals" else [flag]
    if draw(st.booleans()):
        argv.append("--print-config")
    text = None
    if draw(st.integers(0, 2)) == 0:
        if draw(st.booleans()):
            text = draw(st.sampled_from(YAML_TEXTS))
        else:
            keys = st.one_of(st.sampled_from(names), st.sampled_from(names), st.text(max_size=6),
                             st.integers(-3, 3), st.none(), st.booleans())
            text = yaml.safe_dump(draw(st.dictionaries(keys, yaml_values, max_size=5)), allow_unicode=True)
    return argv, text


@pytest.fixture(scope="module")
def quiet_commands(tmp_path_factory):
    """Every command's run() replaced by a no-op that re-checks its config; one parser for all examples."""
    seen = []
    saved = {name: module.run for name, module in COMMANDS.items()}

    def no_op(cfg):
        check_config(cfg)  # what reached run() is a valid config
        seen.append(type(cfg))
        return 0

    parser = cli.build_parser()
    original_build = cli.build_parser
    cli.build_parser = lambda: parser
    for module in COMMANDS.values():
        module.run = no_op
    try:
        yield tmp_path_factory.mktemp("fuzz"), seen
    finally:
        cli.build_parser = original_build
        for name, module in COMMANDS.items():
            module.run = saved[name]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_any_options_end_in_success_or_one_error_line(quiet_commands, cmd):
    folder, seen = quiet_commands
    config = Path(folder) / f"{cmd}.yaml"

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(invocations(cmd))
    def check(invocation):
        args, text = invocation
        argv = [cmd, *args]
        if text is not None:
            config.write_text(text, encoding="utf-8", errors="surrogatepass")
            argv += ["--config", str(config)]
        rc, out, err = _run(argv)
        assert rc in (0, 2), (argv, rc, err)
        if rc == 2:
            lines = err.splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"moecraft {cmd}: error: "), (argv, err)
            return
        assert err == "", (argv, err)
        out.encode("utf-8")  # what a real (UTF-8) stdout can print
        if "--print-config" in argv:  # the printed config is a valid config file of the command
            assert from_dict(COMMANDS[cmd].CONFIG, yaml.safe_load(out) or {}) is not None

    check()
    required = [f for f in dataclasses.fields(COMMANDS[cmd].CONFIG) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    assert required or COMMANDS[cmd].CONFIG in seen, f"no {cmd} example ever reached run()"
