"""Family layer: every supported family is found, laid out and routed as the real transformers class does."""

import pytest
import torch

from moecraft.errors import UnsupportedModelError
from moecraft.families import (
    FAMILIES,
    get_family,
    moe_layers,
    reference_route,
    router_bias_tensors,
    routing_spec,
)
from moecraft.models import tiny_model

ALL_FAMILIES = ["deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "gpt_oss"]


def test_registry_lists_required_families():
    assert sorted(FAMILIES) == sorted(ALL_FAMILIES)


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_layout_and_reference_routing(name):
    model = tiny_model(name, seed=3)
    family = get_family(model)
    assert family.name == name
    layers = moe_layers(model)
    spec = routing_spec(model)
    n_layers = model.config.num_hidden_layers
    dense_first = getattr(model.config, "first_k_dense_replace", 0) or 0
    assert [layer.index for layer in layers] == list(range(dense_first, n_layers))
    for layer in layers:
        assert layer.experts.gate_up_proj.shape[0] == spec.num_experts
        assert dict(model.named_modules())[layer.block_path] is layer.block
        assert all(m is getattr(layer.block, a) for a, m in layer.shared)
    if name in ("deepseek_v2", "deepseek_v3"):
        assert [a for a, _ in layers[0].shared] == ["shared_experts"]
    if name == "qwen2_moe":
        assert [a for a, _ in layers[0].shared] == ["shared_expert", "shared_expert_gate"]

    captured = {}
    hooks = [
        layer.router.register_forward_hook(lambda m, a, o, i=layer.index: captured.__setitem__(i, (a[0], o)))
        for layer in layers
    ]
    ids = torch.randint(0, model.config.vocab_size - 3, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for layer in layers:
        hidden, (_, weights, indices) = captured[layer.index]
        ref_w, ref_i = reference_route(hidden, layer.router.weight, spec, *router_bias_tensors(layer.router, spec))
        order, ref_order = indices.argsort(-1), ref_i.argsort(-1)
        assert torch.equal(indices.gather(1, order), ref_i.gather(1, ref_order))
        torch.testing.assert_close(
            weights.gather(1, order).double(), ref_w.gather(1, ref_order), rtol=1e-5, atol=1e-6
        )


def test_group_limited_deepseek_v2_routing():
    """DeepSeek-V2's group_limited_greedy variant (used by the full V2) follows the spec too."""
    from transformers import AutoModelForCausalLM

    from moecraft.families.deepseek_v2 import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config(topk_method="group_limited_greedy", n_group=4, topk_group=2)
    ).eval()
    layer = moe_layers(model)[0]
    with torch.no_grad():
        layer.router.weight.normal_()
    spec = routing_spec(model)
    assert spec.group_limited and spec.group_score == "max"
    x = torch.randn(50, model.config.hidden_size)
    _, w, i = layer.router(x)
    ref_w, ref_i = reference_route(x, layer.router.weight, spec)
    assert torch.equal(i.sort(-1).values, ref_i.sort(-1).values)
    # each token's experts come from at most topk_group groups
    per_token_groups = [len(set((row // (spec.num_experts // spec.n_group)).tolist())) for row in ref_i]
    assert max(per_token_groups) <= spec.topk_group


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_dense_model_is_a_clear_error(kind):
    model = tiny_model(kind)
    with pytest.raises(UnsupportedModelError, match="not a supported MoE family.*deepseek_v2.*PESC"):
        get_family(model)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="supported: deepseek_v2, deepseek_v3"):
        get_family("switch_transformers")
