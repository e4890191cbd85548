"""Router statistics and ESFT scores against an independent float64 re-computation (eq. 2, 5, 6)."""

import pytest
import torch

from moecraft.esft.stats import ExpertScores, collect_router_stats
from moecraft.families import moe_layers, reference_route, router_bias_tensors, routing_spec
from moecraft.models import tiny_model

ALL_FAMILIES = ["deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "gpt_oss"]
NORMALISED = {"deepseek_v3", "qwen3_moe", "mixtral", "gpt_oss"}  # top-k weights sum to 1 (after scaling)


def _sequences(vocab: int, lengths, seed=0):
    """Sequences of different lengths (so batches get padding) with a partial count mask."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab - 3, (n,), generator=gen).tolist()
        mask = [int(j >= n // 3) for j in range(n)]  # count only the last two thirds ("response")
        out.append((ids, mask))
    return out


def _reference(model, sequences):
    """Plain float64 re-computation: capture router inputs per sequence, route by the spec, sum by hand."""
    layers = moe_layers(model)
    spec = routing_spec(model)
    gate = torch.zeros(len(layers), spec.num_experts, dtype=torch.float64)
    count = torch.zeros_like(gate)
    n_tokens = 0
    captured = {}
    hooks = [layer.router.register_forward_pre_hook(lambda m, a, r=r: captured.__setitem__(r, a[0]))
             for r, layer in enumerate(layers)]
    with torch.no_grad():
        for ids, mask in sequences:  # one at a time, no padding at all
            model(torch.tensor([ids]))
            valid = torch.tensor(mask, dtype=torch.bool)
            n_tokens += int(valid.sum())
            for r, layer in enumerate(layers):
                w, idx = reference_route(captured[r], layer.router.weight, spec,
                                         *router_bias_tensors(layer.router, spec))
                w, idx = w[valid] / spec.scaling_factor, idx[valid]
                for t in range(idx.shape[0]):
                    for j in range(spec.top_k):
                        gate[r, idx[t, j]] += w[t, j]
                        count[r, idx[t, j]] += 1
    for h in hooks:
        h.remove()
    return gate, count, n_tokens


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_scores_match_float64_reference(name):
    model = tiny_model(name, seed=1)
    seqs = _sequences(model.config.vocab_size, [40, 17, 33, 8])
    stats = collect_router_stats(model, seqs, batch_size=3, pad_token_id=model.config.pad_token_id, progress=False)
    gate, count, n_tokens = _reference(model, seqs)

    assert stats.n_tokens == n_tokens == sum(sum(m) for _, m in seqs)
    assert stats.layers == [layer.index for layer in moe_layers(model)]
    assert torch.equal(stats.token_count, count)
    torch.testing.assert_close(stats.gate_sum, gate, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(stats.gate_scores(), gate / n_tokens, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(stats.token_scores(), count / (n_tokens * stats.top_k), rtol=0, atol=1e-15)

    # eq. 6 ratios are shares of the N*K top-k slots: they sum to 1 in every layer
    torch.testing.assert_close(stats.token_scores().sum(1), torch.ones(len(stats.layers), dtype=torch.float64))
    layer_mass = stats.gate_scores().sum(1)
    if name in NORMALISED:
        torch.testing.assert_close(layer_mass, torch.ones_like(layer_mass), rtol=1e-6, atol=1e-6)
    else:  # raw softmax values of the top-k: strictly less than 1
        assert bool((layer_mass < 1).all())


def test_padding_and_batching_do_not_change_statistics():
    model = tiny_model("qwen2_moe", seed=2)
    seqs = _sequences(model.config.vocab_size, [30, 5, 22, 12, 27])
    one = collect_router_stats(model, seqs, batch_size=1, progress=False)
    many = collect_router_stats(model, seqs, batch_size=5, pad_token_id=0, progress=False)
    assert one.n_tokens == many.n_tokens
    assert torch.equal(one.token_count, many.token_count)
    torch.testing.assert_close(one.gate_sum, many.gate_sum, rtol=1e-6, atol=1e-9)


def test_accumulator_size_does_not_grow_with_tokens():
    model = tiny_model("mixtral")
    short = collect_router_stats(model, _sequences(model.config.vocab_size, [10]), progress=False)
    long = collect_router_stats(model, _sequences(model.config.vocab_size, [60] * 6), progress=False)
    assert short.gate_sum.shape == long.gate_sum.shape == (2, 8)
    assert long.n_tokens > 20 * short.n_tokens


def test_scores_file_round_trip_is_bit_exact(tmp_path):
    model = tiny_model("olmoe")
    stats = collect_router_stats(model, _sequences(model.config.vocab_size, [25, 19]), progress=False)
    stats.meta = {"data": "x"}
    back = ExpertScores.load(stats.save(tmp_path / "s.json"))
    assert torch.equal(back.gate_sum, stats.gate_sum) and torch.equal(back.token_count, stats.token_count)
    assert torch.equal(back.gate_scores(), stats.gate_scores())
    assert (back.layers, back.n_tokens, back.top_k, back.family) == (stats.layers, stats.n_tokens, 2, "olmoe")


def test_bad_scores_file_is_a_clear_error(tmp_path):
    from moecraft.errors import MoecraftError

    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(MoecraftError, match="not a moecraft scores file"):
        ExpertScores.load(tmp_path / "bad.json")
    with pytest.raises(MoecraftError, match="not found"):
        ExpertScores.load(tmp_path / "missing.json")


def test_sample_seed_changes_the_sample_not_the_model(tmp_path):
    """The seed shuffles the data only: with a single record every seed gives the same sample, so the
    statistics can only differ if the model did (tiny:<family> models must not depend on it)."""
    from moecraft.esft.stats import ScoreConfig, score_experts

    data = tmp_path / "one.jsonl"
    data.write_text('{"text": "the same single record for every seed"}\n')
    a, b = (score_experts(ScoreConfig(model="tiny:mixtral", data=str(data), n_sequences=1, seq_len=64, seed=s,
                                      out="")) for s in (0, 1))
    assert torch.equal(a.gate_sum, b.gate_sum) and torch.equal(a.token_count, b.token_count)
