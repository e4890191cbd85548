"""Expert selection (ESFT eq. 8) against a brute-force search, and the expert config file."""

import itertools
import math
import random

import pytest
import torch

from moecraft.errors import MoecraftError
from moecraft.esft.selection import ExpertConfig, SelectConfig, select_experts, select_layer
from moecraft.esft.stats import ExpertScores


def _brute_force_size(scores: list[float], p: float) -> int:
    """Size of the smallest subset whose scores sum to >= p (all experts if none does)."""
    for size in range(1, len(scores) + 1):
        if any(math.fsum(c) >= p - 1e-12 for c in itertools.combinations(scores, size)):
            return size
    return len(scores)


@pytest.mark.parametrize("seed", range(40))
def test_selection_is_smallest_top_prefix(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    raw = [rng.choice([0.0, 0.05, 0.1, rng.random()]) for _ in range(n)]  # ties and zeros on purpose
    total = sum(raw) or 1.0
    scores = [s / total for s in raw] if seed % 2 else raw
    p = rng.choice([0.05, 0.1, 0.2, 0.5, 0.9, 1.0, rng.uniform(0.01, 1.0)])
    chosen = select_layer(torch.tensor(scores, dtype=torch.float64), p)
    assert len(chosen) == _brute_force_size(scores, p)
    assert len(set(chosen)) == len(chosen)
    # the chosen experts are the highest-scoring ones (no left-out expert beats a chosen one)
    left_out = [scores[i] for i in range(n) if i not in chosen]
    if left_out:
        assert min(scores[i] for i in chosen) >= max(left_out)
    if math.fsum(scores) >= p:
        assert math.fsum(scores[i] for i in chosen) >= p - 1e-12


def test_ties_break_by_lower_index_and_order_is_best_first():
    s = torch.tensor([0.1, 0.3, 0.1, 0.3, 0.2], dtype=torch.float64)
    assert select_layer(s, 0.7) == [1, 3, 4]
    assert select_layer(s, 0.8) == [1, 3, 4]
    assert select_layer(s, 0.85) == [1, 3, 4, 0]


def test_exact_threshold_is_reached_despite_float_rounding():
    s = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64)
    assert select_layer(s, 0.9) == [2, 1]  # 0.7 + 0.2 is 0.8999999999999999 in binary
    assert select_layer(torch.tensor([0.1, 0.2]), 0.3) == [1, 0]


def test_normalize_and_cap():
    s = torch.tensor([0.02, 0.01, 0.005, 0.005], dtype=torch.float64)  # gate scores far below 1
    assert select_layer(s, 0.5) == [0, 1, 2, 3]  # unreachable p: every expert
    assert select_layer(s, 0.5, normalize=True) == [0]  # 0.02 / 0.04 = 0.5
    assert select_layer(s, 0.6, normalize=True) == [0, 1]
    assert select_layer(s, 0.6, normalize=True, max_experts=1) == [0]


@pytest.mark.parametrize("p", [0, -0.1, 1.0000001, 1.5, float("nan")])
def test_threshold_out_of_range_is_a_clear_error(p):
    with pytest.raises(MoecraftError, match=r"p must be in \(0, 1\]"):
        select_layer(torch.tensor([0.5, 0.5]), p)


def _fake_scores() -> ExpertScores:
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 50, (3, 8), generator=gen).double()
    n_tokens = int(counts.sum(1)[0])  # make row 0 consistent; other rows need not be for selection
    return ExpertScores(model="m", family="mixtral", layers=[0, 1, 3], num_experts=8, top_k=1,
                        n_tokens=n_tokens, gate_sum=counts * 0.4, token_count=counts)


def test_select_experts_writes_a_config_that_loads_back(tmp_path):
    scores = _fake_scores()
    cfg = SelectConfig(score="token", p=0.5, out=tmp_path / "experts.json", train_shared_experts=True)
    result = select_experts(cfg, scores)
    table = scores.token_scores()
    for row, layer in enumerate(scores.layers):
        assert result.experts[layer] == select_layer(table[row], 0.5)
    back = ExpertConfig.load(tmp_path / "experts.json")
    assert back.experts == result.experts and back.train_shared_experts
    assert back.selected_fraction == pytest.approx(sum(map(len, result.experts.values())) / (3 * 8))
    assert back.scores[3] == table[2].tolist()


def test_default_p_is_the_papers(tmp_path):
    scores = _fake_scores()
    assert select_experts(SelectConfig(score="gate", out=""), scores).p == 0.1
    assert select_experts(SelectConfig(score="token", out=""), scores).p == 0.2


def test_bad_expert_config_is_a_clear_error(tmp_path):
    path = tmp_path / "e.json"
    path.write_text('{"num_experts": 8, "experts": {"1": [0, 9]}}')
    with pytest.raises(MoecraftError, match=r"layer 1: expert ids \[9\] out of range"):
        ExpertConfig.load(path)
    path.write_text('{"num_experts": 8, "experts": {"1": [2, 2]}}')
    with pytest.raises(MoecraftError, match="repeated"):
        ExpertConfig.load(path)
