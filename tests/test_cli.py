"""CLI and YAML configs: the same options from Python, the command line and a file."""

import json

import pytest
import yaml

from moecraft.cli import build_parser, main
from moecraft.config import ConfigError, dump_yaml, from_dict, load_yaml
from moecraft.esft.selection import ExpertConfig, SelectConfig
from moecraft.esft.stats import ScoreConfig


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"score", "select"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "--print-config" in capsys.readouterr().out


def test_yaml_and_cli_round_trip(tmp_path, capsys):
    cfg_file = tmp_path / "score.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": "tiny:mixtral", "n_sequences": 3, "seq_len": 64}))
    assert main(["score", "--config", str(cfg_file), "--seq-len", "32", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"] == "tiny:mixtral" and printed["n_sequences"] == 3 and printed["seq_len"] == 32
    again = from_dict(ScoreConfig, printed)
    assert dump_yaml(again) == dump_yaml(from_dict(ScoreConfig, printed))
    (tmp_path / "again.yaml").write_text(dump_yaml(again))
    assert load_yaml(ScoreConfig, tmp_path / "again.yaml") == again


def test_unknown_or_mistyped_yaml_option_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny:mixtral\nseqlen: 5\n")
    assert main(["score", "--config", str(bad)]) == 2
    assert "unknown option(s) ['seqlen']" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'n_sequences' expects int"):
        from_dict(ScoreConfig, {"n_sequences": "many"})


def test_score_then_select_end_to_end(tmp_path, capsys):
    scores, experts = tmp_path / "scores.json", tmp_path / "experts.json"
    assert main(["score", "--model", "tiny:qwen3_moe", "--data", "builtin:arithmetic", "--n-sequences", "2",
                 "--seq-len", "64", "--out", str(scores)]) == 0
    meta = json.loads(scores.read_text())["meta"]
    assert meta["config"]["seq_len"] == 64 and "torch" in meta["versions"]
    assert main(["select", "--scores", str(scores), "--score", "gate", "--p", "0.3", "--out", str(experts)]) == 0
    out = capsys.readouterr().out
    assert "gate score, p=0.3" in out and "selected" in out
    cfg = ExpertConfig.load(experts)
    assert cfg.p == 0.3 and set(cfg.experts) == {0, 1}
    # the Python API gives the same result as the CLI
    from moecraft.esft.selection import select_experts

    assert select_experts(SelectConfig(scores=scores, score="gate", p=0.3, out="")).experts == cfg.experts


def test_bad_input_from_cli_is_one_clear_line(tmp_path, capsys):
    assert main(["score", "--model", "tiny:llama", "--out", str(tmp_path / "s.json")]) == 2
    assert "not a supported MoE family" in capsys.readouterr().err
    assert main(["select", "--scores", str(tmp_path / "none.json")]) == 2
    assert "scores file not found" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["score", "--data", str(empty), "--out", str(tmp_path / "s.json")]) == 2
    assert "empty" in capsys.readouterr().err


def test_shipped_yaml_configs_parse_with_their_command(capsys):
    """Every config in configs/esft and configs/pesc names its command in line 1 and parses with it."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    files = sorted([*root.glob("esft/*.yaml"), *root.glob("pesc/*.yaml")])
    assert files
    for path in files:
        command = re.match(r"# moecraft (\w+) --config", path.read_text()).group(1)
        assert main([command, "--config", str(path), "--print-config"]) == 0, path
        assert yaml.safe_load(capsys.readouterr().out)  # resolved options come back
