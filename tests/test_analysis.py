"""Routing analysis numbers by hand, and the plots + HTML report of `moecraft analyze`."""

import base64
import json
import re

import pytest
import torch

from moecraft.analysis.routing import concentration, jaccard_selected, shared_top_k, top_k_sets
from moecraft.esft.stats import ExpertScores

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scores(counts, top_k=2, model="tiny"):
    counts = torch.tensor(counts, dtype=torch.float64)
    n_tokens = int(counts[0].sum()) // top_k
    return ExpertScores(model=model, family="deepseek_v2", layers=list(range(1, counts.shape[0] + 1)),
                        num_experts=counts.shape[1], top_k=top_k, n_tokens=n_tokens,
                        gate_sum=counts / 4, token_count=counts)


def test_concentration_hand_worked():
    s = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    # layer 0: 0.5 -> 1 expert; 0.8 -> 0.5+0.3 -> 2; 0.9 -> 3.  layer 1 (uniform): 2, 4, 4
    assert concentration(s, [0.5, 0.8, 0.9]).tolist() == [[1, 2, 3], [2, 4, 4]]
    # row-normalised: scaling a layer does not change it
    assert concentration(s * 7, [0.5, 0.8, 0.9]).tolist() == [[1, 2, 3], [2, 4, 4]]


def test_overlaps_hand_worked():
    a = torch.tensor([[4, 3, 2, 1], [1, 2, 3, 4]], dtype=torch.float64)
    b = torch.tensor([[4, 1, 3, 2], [4, 3, 2, 1]], dtype=torch.float64)
    assert top_k_sets(a, 2) == [{0, 1}, {2, 3}]
    # layer 0: {0,1} & {0,2} = 1 shared; layer 1: {2,3} & {0,1} = 0 -> mean 0.5
    assert shared_top_k(a, b, 2) == pytest.approx(0.5)
    assert shared_top_k(a, a, 2) == pytest.approx(2.0)
    # eq. 8 at p=0.5 on raw scores (rows sum to 10): a -> {0,1},{3,2}; b -> {0,2},{0,1}
    # Jaccard: layer 0 |{0}|/|{0,1,2}| = 1/3, layer 1 0/4 = 0 -> mean 1/6
    assert jaccard_selected(a / 10, b / 10, 0.5) == pytest.approx(1 / 6)


def test_analyze_writes_pngs_and_self_contained_report(tmp_path):
    from moecraft.cli import main

    a = _scores([[8, 6, 4, 2, 0, 0], [0, 2, 2, 4, 6, 6]])
    a2 = _scores([[7, 7, 3, 2, 1, 0], [0, 1, 3, 4, 6, 6]])
    b = _scores([[0, 1, 2, 3, 6, 8], [6, 6, 4, 2, 1, 1]])
    for name, s in [("a", a), ("a2", a2), ("b", b)]:
        s.save(tmp_path / f"{name}.json")
    out = tmp_path / "an"
    rc = main(["analyze", "--scores", f"intent={tmp_path / 'a.json'},intent-2={tmp_path / 'a2.json'},"
               f"math={tmp_path / 'b.json'}", "--before", str(tmp_path / "a.json"), "--after", str(tmp_path / "b.json"),
               "--out", str(out)])
    assert rc == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["before_after.png", "concentration.png", "overlap_jaccard.png", "overlap_shared_topk.png",
                    "usage_heatmaps.png"]
    for p in out.glob("*.png"):
        assert p.read_bytes().startswith(PNG_MAGIC)
    nums = json.loads((out / "analysis.json").read_text())
    # two samples of one task share more top-2 experts than different tasks
    shared = nums["shared_top_k"]
    assert shared[0][1] > shared[0][2]
    assert shared[0][1] == pytest.approx(shared_top_k(a.token_scores(), a2.token_scores(), 2))
    html = (out / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 5 and all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
    assert "<img" in html and "src=\"http" not in html and "file:" not in html  # nothing external
    assert f"{shared[0][1]:.4g}" in html  # the numbers are in the page too
    assert (out / "run_info.json").is_file()


def test_analyze_errors(tmp_path):
    from moecraft.cli import main

    _scores([[1, 1, 2, 0]]).save(tmp_path / "x.json")
    _scores([[1, 1, 2, 0, 0, 0]]).save(tmp_path / "y.json")
    assert main(["analyze", "--out", str(tmp_path / "o")]) == 2
    assert main(["analyze", "--scores", f"{tmp_path / 'x.json'},{tmp_path / 'y.json'}", "--out", str(tmp_path)]) == 2
    assert main(["analyze", "--scores", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
    assert main(["analyze", "--before", str(tmp_path / "x.json"), "--out", str(tmp_path)]) == 2
