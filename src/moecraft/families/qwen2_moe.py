"""Qwen1.5-MoE / Qwen2-MoE: softmax top-k, optional renormalisation, one gated shared expert."""

from transformers import Qwen2MoeConfig

from moecraft.families.base import MoEFamily, RoutingSpec


def routing(c: Qwen2MoeConfig) -> RoutingSpec:
    return RoutingSpec(num_experts=c.num_experts, top_k=c.num_experts_per_tok, norm_topk_prob=bool(c.norm_topk_prob))


def tiny_config(vocab_size: int = 320, **overrides) -> Qwen2MoeConfig:
    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, max_position_embeddings=4096,
    )
    kw.update(overrides)
    return Qwen2MoeConfig(**kw)


FAMILY = MoEFamily(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    routing=routing,
    tiny_config=tiny_config,
    example_checkpoint="Qwen/Qwen1.5-MoE-A2.7B",
    shared_attrs=("shared_expert", "shared_expert_gate"),
)
