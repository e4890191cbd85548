"""`select --top-share` (MoE-Sieve's rule) against sort + ceil, and expert sets of several scores files
(union / intersection) against Python set operations; compatibility checks; the CLI into `train --method esft`."""

import json
import math
import random
from decimal import Decimal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from test_bad_inputs import fails

from moecraft.artifacts import read_tensors
from moecraft.cli import main
from moecraft.config import ConfigError
from moecraft.errors import MoecraftError
from moecraft.esft.selection import (
    ExpertConfig,
    SelectConfig,
    overlap_table,
    select_experts,
    select_layer,
    select_top_share,
    summary_table,
)
from moecraft.esft.stats import ExpertScores


def _reference_top_share(scores: list[float], share: float) -> list[int]:
    """Independent: rank by (score descending, index ascending), keep ceil(share * n) in exact decimals."""
    n = math.ceil(Decimal(repr(share)) * len(scores))
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n]


@pytest.mark.parametrize("seed", range(40))
def test_top_share_is_sort_and_ceil(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 20)
    scores = [rng.choice([0.0, 0.1, 0.25, rng.random()]) for _ in range(n)]  # ties and zeros on purpose
    share = rng.choice([0.1, 0.25, 0.3, 0.5, 0.7, 1.0, 1 / 3, rng.uniform(1e-6, 1.0)])
    chosen = select_top_share(torch.tensor(scores, dtype=torch.float64), share)
    assert chosen == _reference_top_share(scores, share)
    assert 1 <= len(chosen) <= n


def test_top_share_ties_keep_the_lower_index_and_exact_decimal_counts():
    s = torch.tensor([0.2, 0.3, 0.2, 0.3, 0.0], dtype=torch.float64)
    assert select_top_share(s, 0.4) == [1, 3]  # ceil(2.0)
    assert select_top_share(s, 0.5) == [1, 3, 0]  # ceil(2.5): of the tied 0.2s, expert 0 before 2
    assert select_top_share(s, 1.0) == [1, 3, 0, 2, 4]
    assert select_top_share(s, 0.5, max_experts=2) == [1, 3]
    # 0.3 * 10 is 3.0000000000000004 in binary; the count is ceil of the decimal 3, not 4
    assert len(select_top_share(torch.arange(10.0), 0.3)) == 3
    assert len(select_top_share(torch.arange(8.0), 0.25)) == 2
    with pytest.raises(MoecraftError, match=r"top_share must be in \(0, 1\]"):
        select_top_share(s, 0.0)


def _scores(seed: int, family="mixtral", layers=(0, 1, 3), num_experts=8, top_k=2, model="m") -> ExpertScores:
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 6, (len(layers), num_experts), generator=gen).double()  # small: many ties
    counts[:, 0] += 1  # no all-zero layer
    return ExpertScores(model=model, family=family, layers=list(layers), num_experts=num_experts, top_k=top_k,
                        n_tokens=int(counts.sum(1).max()), gate_sum=counts * 0.3, token_count=counts)


def test_top_share_config_records_the_rule_and_loads_back(tmp_path):
    sc = _scores(0)
    out = tmp_path / "experts.json"
    result = select_experts(SelectConfig(score="gate", top_share=0.25, out=out), sc)
    table = sc.gate_scores()
    for row, layer in enumerate(sc.layers):
        assert result.experts[layer] == _reference_top_share(table[row].tolist(), 0.25)
    raw = json.loads(out.read_text())
    assert raw["p"] is None and raw["top_share"] == 0.25 and raw["combine"] is None and raw["selections"] == {}
    back = ExpertConfig.load(out)
    assert back.experts == result.experts and back.top_share == 0.25 and back.p is None
    assert summary_table(back).splitlines()[0] == "gate score, top share 0.25 (2 of 8 experts per layer)"


@pytest.mark.parametrize("how", ["union", "intersection"])
@pytest.mark.parametrize("rule", [{"p": 0.4}, {"top_share": 0.25}, {"top_share": 0.5, "max_experts": 3}])
def test_combined_sets_are_python_set_operations(tmp_path, how, rule):
    files = [_scores(seed).save(tmp_path / f"s{seed}.json") for seed in (1, 2, 3)]
    single = [select_experts(SelectConfig(scores=f, score="token", out="", **rule)).experts for f in files]
    cfg = SelectConfig(scores=files, score="token", combine=how, out=tmp_path / "e.json", **rule)
    try:
        result = select_experts(cfg)
    except MoecraftError as exc:  # every layer's intersection empty: the one allowed failure, said as such
        assert how == "intersection" and all(not set.intersection(*(set(s[k]) for s in single)) for k in single[0])
        assert "no expert in common in any layer" in str(exc)
        return
    loaded = [ExpertScores.load(f) for f in files]
    mean = sum(s.token_scores() for s in loaded) / 3
    for row, layer in enumerate(loaded[0].layers):
        sets = [set(s[layer]) for s in single]
        want = set.union(*sets) if how == "union" else set.intersection(*sets)
        assert set(result.experts[layer]) == want
        # best first by the files' mean score, ties by lower id
        assert result.experts[layer] == sorted(want, key=lambda i: (-mean[row, i].item(), i))
        assert result.scores[layer] == mean[row].tolist()
    back = ExpertConfig.load(tmp_path / "e.json")
    assert back.combine == how and back.sources == [str(f) for f in files]
    assert back.selections == {str(f): s for f, s in zip(files, single, strict=True)}
    assert back.experts == result.experts


def test_overlap_table_counts_and_empty_layers(tmp_path):
    # 2 of 8 experts each; layer 0: a picks 0, 1 and b 0, 2; layer 1: a picks 3, 4 and b 5, 6 (none in common)
    a = torch.tensor([[6.0, 4.0, 0.0, 0.0, 0, 0, 0, 0], [0, 0, 0, 10.0, 8.0, 0, 0, 0]])
    b = torch.tensor([[6.0, 0.0, 4.0, 0.0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 10.0, 8.0, 0]])
    files = []
    for name, counts in (("a", a), ("b", b)):
        sc = ExpertScores(model="m", family="mixtral", layers=[0, 1], num_experts=8, top_k=1, n_tokens=10,
                          gate_sum=counts * 0.5, token_count=counts)
        files.append(sc.save(tmp_path / f"{name}.json"))
    result = select_experts(SelectConfig(scores=files, top_share=0.25, combine="intersection", out=""))
    assert result.experts == {0: [0], 1: []}
    table = overlap_table(result).splitlines()
    assert table[1:3] == [f"  [1] {files[0]}", f"  [2] {files[1]}"]
    layer0, layer1 = (line.split() for line in table[-2:])
    assert layer0 == ["0", "2", "2", "1", "3", "0.333"]
    assert layer1[:6] == ["1", "2", "2", "0", "4", "0.000"] and "this layer trains nothing" in table[-1]
    union = select_experts(SelectConfig(scores=files, top_share=0.25, combine="union", out=""))
    assert union.experts == {0: [0, 1, 2], 1: [3, 5, 4, 6]}  # best first by the mean, ties by id
    assert "trains nothing" not in overlap_table(union)
    # one more expert each: no layer shares one -> an error that names both files
    b[0] = torch.tensor([0, 0, 0, 0, 0, 0, 4.0, 6.0])
    files[1].unlink()
    ExpertScores(model="m", family="mixtral", layers=[0, 1], num_experts=8, top_k=1, n_tokens=10,
                 gate_sum=b * 0.5, token_count=b).save(files[1])
    with pytest.raises(MoecraftError, match="no expert in common in any layer") as exc:
        select_experts(SelectConfig(scores=files, top_share=0.25, combine="intersection", out=""))
    assert str(files[0]) in str(exc.value) and str(files[1]) in str(exc.value)


@pytest.mark.parametrize("change, what", [
    ({"family": "qwen3_moe"}, "family 'qwen3_moe', but 'mixtral'"),
    ({"num_experts": 6}, "routed experts per layer 6, but 8"),
    ({"layers": (0, 1, 2)}, "MoE layers [0, 1, 2], but [0, 1, 3]"),
    ({"top_k": 1}, "top_k 1, but 2"),
])
def test_incompatible_scores_files_name_the_file(capsys, tmp_path, change, what):
    good = _scores(1).save(tmp_path / "good.json")
    other = _scores(2, **change).save(tmp_path / "other.json")
    third = _scores(3).save(tmp_path / "third.json")
    out = tmp_path / "e.json"
    msg = fails(capsys, "select", "--scores", good, third, other, "--out", out)
    assert msg == f"{other}: {what} in {good}; scores files to combine must come from one model"
    assert not out.exists()


def test_other_model_name_is_a_warning_and_a_repeated_file_an_error(capsys, tmp_path):
    a = _scores(1).save(tmp_path / "a.json")
    b = _scores(2, model="./local-copy").save(tmp_path / "b.json")
    result = select_experts(SelectConfig(scores=[a, b], out=""))
    assert any("scored model './local-copy'" in w for w in result.warnings)
    msg = fails(capsys, "select", "--scores", a, tmp_path / "." / "a.json", "--out", tmp_path / "e.json")
    assert msg == f"scores file {tmp_path / 'a.json'} given more than once (as {a} too)"


def test_p_and_top_share_together_are_an_error(capsys, tmp_path):
    scores = _scores(1).save(tmp_path / "s.json")
    out = tmp_path / "e.json"
    both = ("options 'p' (cumulative score threshold, eq. 8) and 'top_share' (share of the experts) are two "
            "selection rules; give one of them")
    assert fails(capsys, "select", "--scores", scores, "--p", "0.2", "--top-share", "0.25", "--out", out) == \
        f"command line: {both}"
    yaml_file = tmp_path / "select.yaml"
    yaml_file.write_text("p: 0.2\n")
    assert fails(capsys, "select", "--config", yaml_file, "--scores", scores, "--top-share", "0.25") == \
        f"command line: {both}"
    with pytest.raises(ConfigError, match="two selection rules"):
        SelectConfig(p=0.1, top_share=0.5)
    assert fails(capsys, "select", "--scores", scores, "--top-share", "0.25", "--normalize", "--out", out) == \
        ("command line: option 'normalize' changes what p means and has no effect with 'top_share' (the ranking "
         "is the same); drop one of them")
    for bad in ("0", "1.5"):
        assert fails(capsys, "select", "--scores", scores, "--top-share", bad) == \
            f"command line: option 'top_share' must be in (0, 1], got {float(bad)!r}"
    assert not out.exists()


def test_yaml_list_of_scores_and_the_python_forms(capsys, tmp_path):
    files = [_scores(seed).save(tmp_path / f"s{seed}.json") for seed in (1, 2)]
    cfg_file = tmp_path / "select.yaml"
    out = tmp_path / "e.json"
    cfg_file.write_text(yaml.safe_dump({"scores": [str(f) for f in files], "top_share": 0.5,
                                        "combine": "intersection", "out": str(out)}))
    assert main(["select", "--config", str(cfg_file), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["scores"] == [str(f) for f in files] and printed["combine"] == "intersection"
    assert main(["select", "--config", str(cfg_file)]) == 0
    printed = capsys.readouterr().out
    assert "intersection of 2 scores files" in printed and "jaccard" in printed
    from_yaml = ExpertConfig.load(out)
    from_python = select_experts(SelectConfig(scores=files, top_share=0.5, combine="intersection", out=""))
    assert from_yaml.experts == from_python.experts
    # one file from Python as a path or a string, as before several were allowed
    assert SelectConfig(scores=files[0]).scores == [files[0]] == SelectConfig(scores=str(files[0])).scores
    cfg_file.write_text("scores: []\n")
    assert fails(capsys, "select", "--config", cfg_file) == \
        f"{cfg_file}: option 'scores' may not be an empty list"


def test_single_scores_file_output_is_unchanged(capsys, tmp_path):
    sc = _scores(4)
    f = sc.save(tmp_path / "s.json")
    out = tmp_path / "e.json"
    assert main(["select", "--scores", str(f), "--p", "0.3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "token score, p=0.3" and "jaccard" not in printed
    table = sc.token_scores()
    back = ExpertConfig.load(out)
    assert back.experts == {layer: select_layer(table[row], 0.3) for row, layer in enumerate(sc.layers)}
    assert back.sources == [str(f)] and back.combine is None and back.selections == {}


def _rows(run: Path) -> dict[int, list[int]]:
    """Layer -> expert rows trained, from the artifact's own tensor metadata."""
    _, rows = read_tensors(run / "trained.safetensors")
    layers: dict[int, list[int]] = {}
    for name, ids in rows.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        assert layers.setdefault(layer, ids) == ids  # gate_up and down rows agree
    return layers


TRAIN = ["train", "--method", "esft", "--model", "tiny:qwen3_moe", "--data", "builtin:intent", "--seq-len", "128",
         "--max-steps", "1", "--eval-sequences", "1", "--progress", "false"]


def test_cli_round_trip_score_select_combine_train(capsys, tmp_path):
    files = []
    for task in ("intent", "arithmetic"):
        files.append(tmp_path / f"{task}.json")
        assert main(["score", "--model", "tiny:qwen3_moe", "--data", f"builtin:{task}", "--n-sequences", "2",
                     "--seq-len", "64", "--out", str(files[-1])]) == 0
    combined = tmp_path / "union.json"
    assert main(["select", "--scores", *map(str, files), "--top-share", "0.5", "--combine", "union",
                 "--out", str(combined)]) == 0
    ec = ExpertConfig.load(combined)
    per_file = [select_experts(SelectConfig(scores=f, top_share=0.5, out="")).experts for f in files]
    assert ec.experts == {k: sorted(set(per_file[0][k]) | set(per_file[1][k]), key=lambda i: (-ec.scores[k][i], i))
                          for k in (0, 1)}
    assert any(len(ec.experts[k]) > 4 for k in (0, 1))  # the two tasks' sets differ: the union is larger
    assert main([*TRAIN, "--experts", str(combined), "--out", str(tmp_path / "run")]) == 0
    assert {k: sorted(v) for k, v in _rows(tmp_path / "run").items()} == {k: sorted(v) for k, v in ec.experts.items()}
    assert ExpertConfig.load(tmp_path / "run" / "expert_config.json").selections == ec.selections


def test_intersection_with_an_empty_layer_trains_only_the_others(capsys, tmp_path):
    # scores of tiny:qwen3_moe's shape (layers 0, 1; 8 experts; top-2) with no common expert in layer 0
    a = torch.tensor([[9.0, 7, 0, 0, 0, 0, 0, 0], [0, 0, 9, 7, 0, 0, 0, 0]])
    b = torch.tensor([[0.0, 0, 0, 0, 9, 7, 0, 0], [0, 0, 7, 0, 0, 0, 9, 0]])
    files = []
    for name, counts in (("a", a), ("b", b)):
        sc = ExpertScores(model="tiny:qwen3_moe", family="qwen3_moe", layers=[0, 1], num_experts=8, top_k=2,
                          n_tokens=8, gate_sum=counts * 0.5, token_count=counts)
        files.append(sc.save(tmp_path / f"{name}.json"))
    combined = tmp_path / "inter.json"
    assert main(["select", "--scores", *map(str, files), "--top-share", "0.25", "--combine", "intersection",
                 "--out", str(combined)]) == 0
    layer0 = capsys.readouterr().out.splitlines()[-3]  # the overlap table's last two rows, then "wrote ..."
    assert layer0.split()[:6] == ["0", "2", "2", "0", "4", "0.000"]
    assert layer0.endswith("empty: this layer trains nothing")
    assert ExpertConfig.load(combined).experts == {0: [], 1: [2]}
    assert main([*TRAIN, "--experts", str(combined), "--out", str(tmp_path / "run")]) == 0
    assert _rows(tmp_path / "run") == {1: [2]}
    # MoE-Sieve's pairing: LoRA on the selected experts only, from the same file
    assert main([*TRAIN, "--experts", str(combined), "--expert-adapter", "lora", "--lora-dropout", "0",
                 "--out", str(tmp_path / "lora")]) == 0
    with safe_open(str(tmp_path / "lora" / "expert_lora.safetensors"), framework="pt") as f:
        layers = json.loads(f.metadata()["layers"])
    assert {int(k.split(".layers.")[1].split(".")[0]): v["experts"] for k, v in layers.items()} == {1: [2]}
