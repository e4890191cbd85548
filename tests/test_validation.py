"""Every option and file checked when it is read (docs/errors.md, section 12).

Options: every numeric option of every command has a range, checked when the config is built, from Python,
YAML and the command line alike; YAML values of the wrong type are errors (never stringified); YAML alias
bombs are refused. Files: expert-config layer keys and expert ids, artifact expert rows. Prompts longer
than the model's context: an error in ``generate`` and ``eval`` alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from moecraft import cli
from moecraft.artifacts import TENSORS
from moecraft.cli import _command_modules, main
from moecraft.config import MAX_YAML_BYTES, ConfigError, _unwrap_optional, from_dict
from moecraft.errors import MoecraftError
from moecraft.esft.selection import ExpertConfig, SelectConfig
from moecraft.models import byte_tokenizer, tiny_config
from moecraft.pesc.config import CraftConfig
from moecraft.train.config import TrainConfig

COMMANDS = dict(_command_modules())
# the required options of each command (values that pass), so that one bad option is the only error
REQUIRED = {
    "train": ["--model", "tiny:qwen3_moe", "--data", "builtin:intent", "--out", "run"],
    "merge": ["--artifact", "run", "--out", "merged"],
    "export": ["--artifact", "run", "--output", "exported"],
    "generate": ["--prompt", "hi"],
    "data": ["--data", "builtin:intent"],
    "import-esft": ["--adapter", "a", "--base", "tiny:deepseek_v2", "--out", "imported"],
    "convert": ["--model", "tiny:llama", "--out", "converted"],
}


_PARSER: dict = {}


@pytest.fixture(autouse=True)
def one_parser(monkeypatch):
    """Build the CLI parser once for this module (argparse parsers are reusable); main() itself runs as is."""
    if "parser" not in _PARSER:
        _PARSER["parser"] = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: _PARSER["parser"])


def fails(capsys, *argv) -> str:
    """Run the CLI, assert exit 2 and exactly one line ``moecraft <command>: error: ...``; return the message."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, f"exit code {rc}; stderr: {err[-500:]}"
    lines = [line for line in err.splitlines() if line.startswith("moecraft ")]  # not progress bars
    assert "Traceback" not in err
    prefix = f"moecraft {argv[0]}: error: "
    assert len(lines) == 1 and lines[0].startswith(prefix), err[-500:]
    return lines[0][len(prefix):]


def printed_config(capsys, *argv) -> dict:
    assert main([str(a) for a in argv] + ["--print-config"]) == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def numeric_fields(cls) -> list[tuple[str, type]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        base, _ = _unwrap_optional(hints[f.name])
        if typing.get_origin(base) in (list, tuple):
            base = typing.get_args(base)[0]
        if base in (int, float):
            out.append((f.name, base))
    return out


# ----------------------------------------------------------------------------- every numeric option has a range
def test_every_numeric_option_of_every_command_has_an_explicit_rule():
    """A numeric option added without a rule would get the fallback (finite, >= 0): name its range instead."""
    for name, module in COMMANDS.items():
        cls = module.CONFIG
        rules = getattr(cls, "__moecraft_rules__", None)
        assert rules is not None, f"{cls.__name__} ({name}) is not decorated with moecraft.config.checked"
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(rules) <= fields, f"{cls.__name__}: rules for unknown fields {sorted(set(rules) - fields)}"
        missing = [f for f, _ in numeric_fields(cls) if f not in rules]
        assert not missing, f"{cls.__name__} ({name}): numeric options without a rule: {missing}"


def _outside(rule: str, kind: type) -> list[str]:
    """Values just outside a range rule, as command-line text."""
    step = 1 if kind is int else 0.5
    rule = rule.strip()
    if rule[0] in "<>":
        op, bound = rule.split()
        b = float(bound)
        return [str(kind(b - step) if op in (">", ">=") else kind(b + step))] if op[-1] == "=" else [str(kind(b))]
    lo, hi = (float(x.replace("2**63", str(2.0**63))) for x in rule[1:-1].split(","))
    vals = [lo - step if rule[0] == "[" else lo, hi + step if rule[-1] == "]" else hi]
    return [str(int(v)) if kind is int else repr(v) for v in vals if v < 2**63 - 1]


CASES = [(cmd, field, kind, getattr(mod.CONFIG, "__moecraft_rules__", {}).get(field))
         for cmd, mod in COMMANDS.items() for field, kind in numeric_fields(mod.CONFIG)]


@pytest.mark.parametrize("cmd, field, kind, rule", CASES, ids=[f"{c}-{f}" for c, f, _, _ in CASES])
def test_every_numeric_option_refuses_out_of_range_nan_inf_and_bad_text(capsys, cmd, field, kind, rule):
    flag = "--" + field.replace("_", "-")
    base = [cmd, *REQUIRED.get(cmd, [])]
    for text in _outside(rule, kind):
        msg = fails(capsys, *base, f"{flag}={text}", "--print-config")
        shown = rule if rule[0] in "<>" else f"in {rule}"
        assert msg.startswith(f"command line: option '{field}' must be {shown}, got "), msg
    for text in ("nan", "inf", "-inf", "1e999"):
        msg = fails(capsys, *base, f"{flag}={text}", "--print-config")
        assert msg.startswith(f"command line: option '{field}' " +
                              ("must be a finite number" if kind is float else "expects int")), msg
    is_list = typing.get_origin(_unwrap_optional(typing.get_type_hints(COMMANDS[cmd].CONFIG)[field])[0]) is list
    for text in ("abc", "1_0", "0x10", "３", " 1", "[1]", *([] if is_list else [""])):
        msg = fails(capsys, *base, f"{flag}={text}", "--print-config")
        assert msg == f"command line: option '{field}' expects {kind.__name__}, got {text!r}", msg
    if is_list:  # '--layers=' is an empty list, never 'craft no layer'
        assert fails(capsys, *base, f"{flag}=", "--print-config") == \
            f"command line: option '{field}' may not be an empty list"
    if kind is int:
        assert "expects int, got '1.5'" in fails(capsys, *base, f"{flag}=1.5", "--print-config")
        assert "is too large" in fails(capsys, *base, f"{flag}={2**63}", "--print-config")


@pytest.mark.parametrize("argv, message", [
    (["train", "--lr", "-1"], "option 'lr' must be > 0, got -1.0"),
    (["train", "--lr", "0"], "option 'lr' must be > 0, got 0.0"),
    (["train", "--adam-beta1", "1"], "option 'adam_beta1' must be in [0, 1), got 1.0"),
    (["train", "--adam-beta2", "-0.1"], "option 'adam_beta2' must be in [0, 1), got -0.1"),
    (["train", "--weight-decay", "-0.01"], "option 'weight_decay' must be >= 0, got -0.01"),
    (["train", "--min-lr-ratio", "1.5"], "option 'min_lr_ratio' must be in [0, 1], got 1.5"),
    (["train", "--log-every", "0"], "option 'log_every' must be >= 1, got 0"),
    (["train", "--eval-every", "-1"], "option 'eval_every' must be >= 0, got -1"),
    (["train", "--save-every", "-1"], "option 'save_every' must be >= 0, got -1"),
    (["train", "--eval-fraction", "1"], "option 'eval_fraction' must be in (0, 1), got 1.0"),
    (["train", "--eval-fraction", "0"], "option 'eval_fraction' must be in (0, 1), got 0.0"),
    (["train", "--seed", "-3"], "option 'seed' must be in [0, 2**63), got -3"),
    (["eval", "--max-new-tokens", "0"], "option 'max_new_tokens' must be >= 1, got 0"),
    (["generate", "--max-new-tokens", "0"], "option 'max_new_tokens' must be >= 1, got 0"),
    (["generate", "--temperature", "-1"], "option 'temperature' must be >= 0, got -1.0"),
    (["generate", "--temperature", "nan"], "option 'temperature' must be a finite number, got nan"),
    (["eval", "--temperature=-inf"], "option 'temperature' must be a finite number, got -inf"),
    (["train", "--lr="], "option 'lr' expects float, got ''"),
    (["train", "--dtype", "fp8"], "option 'dtype' must be one of ['bf16', 'bfloat16', 'float16', 'float32', "
                                  "'float64', 'fp16', 'fp32'] or 'auto', got 'fp8'"),
    (["score", "--device", "gpu"], "option 'device' must be 'auto' or a torch device such as cpu, cuda, cuda:1, "
                                   "got 'gpu'"),
    (["train", "--model="], "option 'model' may not be empty"),
    (["craft", "--top-k", "3", "--num-experts", "2"], "option 'top_k' (3) must be <= num_experts (2)"),
    (["train", "--pesc-top-k", "9"], "option 'pesc_top_k' (9) must be <= pesc_num_experts (8)"),
    (["demo", "--methods", "esft,dpo"], "option 'methods' must be one of ['esft', 'fft', 'lora', 'pesc'], got 'dpo'"),
    (["demo", "--score", "median"], "option 'score' must be one of ['gate', 'token'], got 'median'"),
    (["analyze", "--ps", "0.5,1.5"], "option 'ps' must be in (0, 1], got 1.5"),
    (["eval", "--tasks="], "nothing to evaluate: give --tasks, --perplexity-data or --lm-eval-tasks"),
])
def test_options_out_of_range_are_one_line_errors_naming_the_option(capsys, argv, message):
    cmd, *rest = argv
    argv = [cmd, *REQUIRED.get(cmd, []), *rest]
    assert fails(capsys, *argv, "--print-config") == f"command line: {message}"


def test_valid_edges_are_accepted(capsys):
    cfg = printed_config(capsys, "train", *REQUIRED["train"], "--eval-every", "0", "--save-every",
                         "0", "--min-lr-ratio", "1", "--adam-beta1", "0", "--lr", "1e-5", "--seed", str(2**63 - 1))
    assert (cfg["eval_every"], cfg["min_lr_ratio"], cfg["adam_beta1"], cfg["lr"]) == (0, 1.0, 0.0, 1e-5)
    assert cfg["seed"] == 2**63 - 1
    assert printed_config(capsys, "select", "--p", "1")["p"] == 1.0
    assert printed_config(capsys, "generate", "--prompt", "hi", "--temperature", "0")["temperature"] == 0.0


def test_python_api_is_checked_like_the_cli():
    with pytest.raises(ConfigError, match=r"^option 'lr' must be > 0, got -1$"):
        TrainConfig(model="m", data="d", out="o", lr=-1)
    cfg = TrainConfig(model="m", data="d", out="o")
    with pytest.raises(ConfigError, match=r"^option 'adam_beta2' must be in \[0, 1\), got 1.0$"):
        dataclasses.replace(cfg, adam_beta2=1.0)
    with pytest.raises(ConfigError, match=r"^option 'max_steps' expects int, got True$"):
        TrainConfig(model="m", data="d", out="o", max_steps=True)
    with pytest.raises(ConfigError, match=r"^option 'model' expects str, got \[1\]$"):
        TrainConfig(model=[1], data="d", out="o")
    with pytest.raises(ConfigError, match=r"^option 'scaling' must be > 0, got 0.0$"):
        CraftConfig(scaling=0.0)
    with pytest.raises(ConfigError, match=r"^pesc options: option 'top_k' \(9\) must be <= num_experts \(8\)$"):
        from_dict(CraftConfig, {"top_k": 9}, source="pesc options")
    # Python keeps its conveniences: paths as Path or str, an empty --out meaning "do not write"
    assert SelectConfig(out="").out == "" and TrainConfig(model="m", data="d", out=Path("o")).out == Path("o")


# ----------------------------------------------------------------------------- YAML: types, sources, bombs
@pytest.mark.parametrize("text, message", [
    ("lr: [1]\n", "option 'lr' expects float, got [1]"),
    ("seq_len: abc\n", "option 'seq_len' expects int, got 'abc'"),
    ("seq_len: 3.5\n", "option 'seq_len' expects int, got 3.5"),
    ("seq_len: true\n", "option 'seq_len' expects int, got True"),
    ("model: {a: 1}\n", "option 'model' expects str, got {'a': 1}"),
    ("model: [tiny:llama]\n", "option 'model' expects str, got ['tiny:llama']"),
    ("data: 123\n", "option 'data' expects str, got 123"),
    ("dtype: no\n", "option 'dtype' expects str, got False"),
    ("seed: 2024-01-01\n", "option 'seed' expects int, got datetime.date(2024, 1, 1)"),
    ("lr: .nan\n", "option 'lr' must be a finite number, got nan"),
    ("lr: -.inf\n", "option 'lr' must be a finite number, got -inf"),
    ("lr: 1.0e+400\n", "option 'lr' must be a finite number, got inf"),
    ("max_steps: 1.0e+30\n", "option 'max_steps' is too large: 1000000000000000019884624838656"),
    ("lr: -1.0e-5\n", "option 'lr' must be > 0, got -1e-05"),
    ("pesc_layers: [1, true]\n", "option 'pesc_layers' expects int, got True"),
    ("pesc_layers: [1, -2]\n", "option 'pesc_layers' must be >= 0, got -2"),
    ("method: 1\n", "option 'method' must be one of ['esft', 'fft', 'lora', 'pesc', 'router'], got 1"),
    ("progress: 1\n", "option 'progress' expects bool, got 1"),
    ("experts: \"a\\0b\"\n", "option 'experts' contains a NUL character: 'a\\x00b'"),
    ("1: 2\n", "unknown option(s) [1]; known: ["),
])
def test_yaml_values_of_the_wrong_type_or_range_name_the_file(capsys, tmp_path, text, message):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    msg = fails(capsys, "train", *REQUIRED["train"], "--config", path, "--print-config")
    assert msg.startswith(f"{path}: {message}"), msg


def test_yaml_numbers_in_yaml_1_1_spelling_are_read(capsys, tmp_path):
    """PyYAML reads `1e-5` (no dot) as a string: it is a number for a float option, still an error for a str."""
    path = tmp_path / "train.yaml"
    path.write_text("lr: 1e-5\nseq_len: '64'\nmodel: m\ndata: d\nout: o\n")
    cfg = printed_config(capsys, "train", "--config", path)
    assert cfg["lr"] == 1e-5 and cfg["seq_len"] == 64


def test_the_source_of_a_bad_value_is_named(capsys, tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("model: m\ndata: d\nout: o\nmax_steps: 0\n")
    assert fails(capsys, "train", "--config", path, "--print-config") == \
        f"{path}: option 'max_steps' must be >= 1, got 0"
    path.write_text("model: m\ndata: d\nout: o\n")
    assert fails(capsys, "train", "--config", path, "--max-steps", "0", "--print-config") == \
        "command line: option 'max_steps' must be >= 1, got 0"
    # the file is checked on its own, before the command line goes on top
    path.write_text("model: m\ndata: d\nout: o\nmax_steps: 0\n")
    assert fails(capsys, "train", "--config", path, "--max-steps", "3", "--print-config") == \
        f"{path}: option 'max_steps' must be >= 1, got 0"


# the classic "billion laughs" in YAML: 9 aliases of 9 aliases ... (9**9 strings once expanded)
BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


@pytest.mark.parametrize("text, message", [
    (BILLION_LAUGHS, "refused YAML: more than 64 aliases (*name)"),
    # the same bomb under a real list option, so that nothing else stops it first
    ("tasks:\n" + "".join(f"  - {line.split(': ', 1)[1]}\n" for line in BILLION_LAUGHS.splitlines()),
     "refused YAML: more than 64 aliases (*name)"),
    # few aliases, each doubling: 2**14 strings
    ("x0: &x0 [lol, lol]\n" + "".join(f"x{i}: &x{i} [*x{i - 1}, *x{i - 1}]\n" for i in range(1, 14)),
     "refused YAML: more than 5000 values once aliases are expanded"),
    ("stop: &a [*a]\n", "refused YAML: a structure that contains itself (recursive alias)"),
    ("limit: 1\nlimit: 2\n", "refused YAML: key 'limit' appears more than once"),
    ("stop: " + "[" * 100_000 + "]" * 100_000 + "\n", "refused YAML: nested more than 32 levels deep"),
    ("stop: [" + "x, " * 6000 + "]\n", "refused YAML: more than 5000 values"),
])
def test_yaml_alias_bombs_and_other_hostile_documents_are_refused(capsys, tmp_path, text, message):
    path = tmp_path / "eval.yaml"
    path.write_text(text)
    assert fails(capsys, "eval", "--config", path, "--print-config") == f"{path}: {message}"


def test_yaml_anchors_within_the_budget_still_work(capsys, tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("tasks: &t [builtin:intent, builtin:arithmetic]\nlm_eval_tasks: *t\n")
    cfg = printed_config(capsys, "eval", "--config", path)
    assert cfg["tasks"] == cfg["lm_eval_tasks"] == ["builtin:intent", "builtin:arithmetic"]


def test_yaml_file_over_the_size_limit(capsys, tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * MAX_YAML_BYTES + "\n")
    assert fails(capsys, "select", "--config", path).startswith(f"{path}: config file too large (")


# ----------------------------------------------------------------------------- CLI: one line, always
def test_usage_errors_and_values_with_line_breaks_stay_one_line(capsys):
    assert fails(capsys, "select", "--bogus", "x") == \
        "unrecognized arguments: --bogus x (see moecraft select --help)"
    assert fails(capsys, "select", "--p") == "argument --p: expected one argument (see moecraft select --help)"
    assert fails(capsys, "select", "--scores", "a\nb") == "scores file not found: a\\nb"


# ----------------------------------------------------------------------------- expert config
TRAIN_ESFT = ["train", "--method", "esft", "--model", "tiny:deepseek_v2", "--data", "builtin:intent",
              "--seq-len", "64", "--max-steps", "1", "--eval-sequences", "1", "--progress", "false"]


@pytest.mark.parametrize("config, message", [
    ({"experts": {"03": [1], "3": [2]}}, "layer keys '03' and '3' in 'experts' name the same layer"),
    ({"experts": {"1e1": [1]}}, "layer index '1e1' is not a non-negative integer (plain decimal digits, in 'experts')"),
    ({"experts": {" 3": [1]}}, "layer index ' 3' is not a non-negative integer"),
    ({"experts": {"-1": [1]}}, "layer index '-1' is not a non-negative integer"),
    ({"experts": {"３": [1]}}, "layer index '３' is not a non-negative integer"),
    ({"experts": {"²": [1]}}, "layer index '²' is not a non-negative integer"),
    ({"experts": {"1": [True]}}, "layer 1: expert ids must be integers, got [True]"),
    ({"experts": {"1": [1.0]}}, "layer 1: expert ids must be integers, got [1.0]"),
    ({"experts": {"1": [1]}, "num_experts": -4}, "'num_experts' must be a non-negative integer, got -4"),
    ({"experts": {"1": [1]}, "shared_experts": "false"}, "'shared_experts' must be true or false, got 'false'"),
    ({"experts": {"1": [1]}, "family": ["x"]}, "'family' must be a string, got ['x']"),
    ({"experts": {"1": [1]}, "scores": {"1": ["a"]}}, "scores of layer 1 must be a list of finite numbers"),
    ({"experts": {"1": [3]}, "scores": {"1": [0.5, 0.5]}}, "scores of layer 1 must be a list of finite numbers"),
    ({"experts": {"1": [1]}, "warnings": "none"}, "'warnings' must be a list of strings"),
])
def test_bad_expert_config_fields(tmp_path, config, message):
    path = tmp_path / "experts.json"
    path.write_text(json.dumps(config, ensure_ascii=False))
    with pytest.raises(MoecraftError) as exc:
        ExpertConfig.load(path)
    assert str(exc.value).startswith(f"{path}: ") and message in str(exc.value)


def test_expert_config_with_a_repeated_json_key(tmp_path):
    path = tmp_path / "experts.json"
    path.write_text('{"experts": {"1": [1], "1": [2]}}')
    with pytest.raises(MoecraftError, match="key '1' appears more than once"):
        ExpertConfig.load(path)


def test_expert_config_layer_keys_through_training(capsys, tmp_path):
    path = tmp_path / "experts.json"
    path.write_text(json.dumps({"experts": {"01": [1], "1": [2]}}))
    msg = fails(capsys, *TRAIN_ESFT, "--experts", path, "--out", tmp_path / "run")
    assert msg == f"{path}: layer keys '01' and '1' in 'experts' name the same layer"
    assert not (tmp_path / "run" / "artifact.json").exists()
    # a leading zero alone is the same layer, read as such
    path.write_text(json.dumps({"experts": {"01": [1]}}))
    assert ExpertConfig.load(path).experts == {1: [1]}


# ----------------------------------------------------------------------------- artifact expert rows
def _with_rows(run: Path, tmp_path: Path, rows) -> Path:
    """A copy of ``run`` whose trained.safetensors carries ``rows`` as its expert_rows metadata."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    tensors = load_file(str(run / TENSORS))
    save_file(tensors, str(copy / TENSORS),
              metadata={"format": "moecraft.artifact/1", "expert_rows": rows if isinstance(rows, str) else json.dumps(rows)})
    return copy


def test_artifact_rows_round_trip_as_written(capsys, tmp_path, esft_run):
    from moecraft.artifacts import read_tensors

    tensors, rows = read_tensors(esft_run / TENSORS)
    assert rows and all(ids == [3, 7] and tensors[name].shape[0] == 2 for name, ids in rows.items())


@pytest.mark.parametrize("change, message", [
    (lambda ids: [-1, 7], "expert rows of '{name}' must be non-negative integers, got [-1, 7]"),
    (lambda ids: [3, 3], "expert rows of '{name}' repeat an expert: [3, 3]"),
    (lambda ids: [3, True], "expert rows of '{name}' must be non-negative integers, got [3, True]"),
    (lambda ids: [3, 7.0], "expert rows of '{name}' must be non-negative integers, got [3, 7.0]"),
    (lambda ids: ["3", 7], "expert rows of '{name}' must be non-negative integers, got ['3', 7]"),
    (lambda ids: [3], "'{name}' of shape (2, "),
    (lambda ids: 3, "expert rows of '{name}' must be non-negative integers, got 3"),
])
def test_bad_artifact_rows_name_the_file(capsys, tmp_path, esft_run, change, message):
    from moecraft.artifacts import read_tensors

    _, rows = read_tensors(esft_run / TENSORS)
    name = next(iter(rows))
    run = _with_rows(esft_run, tmp_path, {**rows, name: change(rows[name])})
    out = tmp_path / "merged"
    msg = fails(capsys, "merge", "--artifact", run, "--out", out)
    assert msg.startswith(f"{run / TENSORS}: {message.format(name=name)}"), msg
    assert not out.exists()


def test_artifact_rows_naming_missing_tensors_or_out_of_range(capsys, tmp_path, esft_run):
    from moecraft.artifacts import read_tensors

    _, rows = read_tensors(esft_run / TENSORS)
    run = _with_rows(esft_run, tmp_path / "a", {**rows, "model.nope": [1]})
    assert fails(capsys, "merge", "--artifact", run, "--out", tmp_path / "m") == \
        f"{run / TENSORS}: 'expert_rows' names tensor 'model.nope', which the file does not hold"
    run = _with_rows(esft_run, tmp_path / "b", "[1, 2]")
    assert fails(capsys, "merge", "--artifact", run, "--out", tmp_path / "m").startswith(
        f"{run / TENSORS}: damaged 'expert_rows' metadata (expected tensor name -> expert ids, got list)")
    name = next(iter(rows))
    run = _with_rows(esft_run, tmp_path / "c", {**rows, name: [3, 16]})
    assert "(experts [3, 16]) does not fit the base tensor of shape (16, " in \
        fails(capsys, "merge", "--artifact", run, "--out", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_artifact_manifest_field_types(capsys, tmp_path, esft_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(esft_run, run)
    manifest = json.loads((run / "artifact.json").read_text())
    (run / "artifact.json").write_text(json.dumps({**manifest, "base": ["tiny:deepseek_v2"]}))
    assert fails(capsys, "merge", "--artifact", run, "--out", tmp_path / "m") == \
        f"{run / 'artifact.json'}: incomplete artifact manifest (missing or malformed: ['base'])"


# ----------------------------------------------------------------------------- prompts longer than the context
@pytest.fixture(scope="module")
def short_llama(tmp_path_factory) -> Path:
    """tiny:llama saved with max_position_embeddings = 48."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("short") / "llama"
    tok = byte_tokenizer()
    config = tiny_config("llama", vocab_size=len(tok))
    config.max_position_embeddings = 48
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_generate_prompt_longer_than_the_context(capsys, short_llama):
    base = ["generate", "--model", short_llama, "--chat", "false"]
    msg = fails(capsys, *base, "--prompt", "x" * 40, "--max-new-tokens", "9")
    assert msg.startswith("the prompt is 40 tokens; with max_new_tokens 9 that makes 49, more than the model's "
                          "max_position_embeddings 48 (")
    assert msg.endswith("shorten the prompt or lower --max-new-tokens (prompts are not truncated)")
    assert main([*map(str, base), "--prompt", "x" * 40, "--max-new-tokens", "8"]) == 0  # exactly fits
    assert "error" not in capsys.readouterr().err


def test_eval_prompt_longer_than_the_context_fails_before_any_generation(capsys, tmp_path, short_llama):
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompt": "ok", "answer": "a"}) + "\n" +
                    json.dumps({"prompt": "y" * 45, "answer": "b"}) + "\n")
    out = tmp_path / "ev"
    msg = fails(capsys, "eval", "--model", short_llama, "--tasks", task, "--max-new-tokens", "4", "--out", out)
    assert msg.startswith(f"{task}: the prompt of row 2 is 45 tokens; with max_new_tokens 4 that makes 49, more "
                          "than the model's max_position_embeddings 48 (")
    assert not out.exists()


def test_generate_texts_checks_prompts_from_python(short_llama):
    from moecraft.eval.generation import generate_texts
    from moecraft.models import load_model as load

    model, tok = load(str(short_llama))
    with pytest.raises(MoecraftError, match=r"^generate: prompt 2 is 47 tokens; with max_new_tokens 2 that makes 49"):
        generate_texts(model, tok, ["a", "z" * 47], max_new_tokens=2, progress=False)
    assert len(generate_texts(model, tok, ["a", "z" * 46], max_new_tokens=2, progress=False)) == 2


def test_analyze_k_over_the_experts(capsys, tmp_path):
    from moecraft.esft.stats import ExpertScores

    counts = torch.tensor([[5.0, 3.0, 1.0, 1.0]])
    scores = ExpertScores(model="m", family="mixtral", layers=[0], num_experts=4, top_k=1, n_tokens=10,
                          gate_sum=counts * 0.5, token_count=counts).save(tmp_path / "s.json")
    out = tmp_path / "analysis"
    assert fails(capsys, "analyze", "--scores", scores, "--k", "5", "--out", out) == \
        "--k 5 is more than the 4 experts per layer of the scores"
    assert not out.exists()


@pytest.mark.parametrize("change, message", [
    ({"gate_sum": [[float("nan"), 1.0]]}, "gate_sum and token_count must be finite and >= 0"),
    ({"token_count": [[-1, 3]]}, "gate_sum and token_count must be finite and >= 0"),
    ({"token_count": [[1.5, 3]]}, "token_count whole numbers"),
    ({"layers": [1.5]}, "'layers' must be distinct non-negative integers"),
    ({"layers": [True]}, "'layers' must be distinct non-negative integers"),
    ({"num_experts": 2.0}, "'num_experts' must be a non-negative integer, got 2.0"),
    ({"top_k": 3}, "top_k in [1, num_experts]"),
    ({"family": ["mixtral"]}, "'family' and 'model' must be strings"),
])
def test_damaged_scores_files(capsys, tmp_path, change, message):
    from moecraft.esft.stats import ExpertScores

    counts = torch.tensor([[3.0, 1.0]])
    path = ExpertScores(model="m", family="mixtral", layers=[0], num_experts=2, top_k=1, n_tokens=4,
                        gate_sum=counts * 0.5, token_count=counts).save(tmp_path / "s.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    msg = fails(capsys, "select", "--scores", path, "--out", tmp_path / "e.json")
    assert msg.startswith(f"{path}: damaged scores file (") and message in msg, msg


def test_device_that_is_not_there(capsys, tmp_path):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert fails(capsys, "score", "--device", "cuda:7", "--out", tmp_path / "s.json").startswith(
        "device 'cuda:7' is not available here (")


def test_finite_rule_and_fallback_rule_on_an_unchecked_config():
    """A config class without @checked still gets the generic checks through from_dict."""

    @dataclasses.dataclass
    class Plain:
        rate: float = 0.5
        name: str = "x"

    assert from_dict(Plain, {"rate": "0.25"}) == Plain(rate=0.25)
    with pytest.raises(ConfigError, match=r"^config: option 'rate' must be a finite number, got nan$"):
        from_dict(Plain, {"rate": "nan"})
    with pytest.raises(ConfigError, match=r"^config: option 'rate' must be >= 0, got -1.0$"):
        from_dict(Plain, {"rate": -1})
    assert math.isclose(from_dict(Plain, {"rate": 1}).rate, 1.0)
