"""Qwen3-MoE: softmax top-k with renormalisation, no shared experts."""

from transformers import Qwen3MoeConfig

from moecraft.families.base import MoEFamily, RoutingSpec


def routing(c: Qwen3MoeConfig) -> RoutingSpec:
    return RoutingSpec(num_experts=c.num_experts, top_k=c.num_experts_per_tok, norm_topk_prob=bool(c.norm_topk_prob))


def tiny_config(vocab_size: int = 320, **overrides) -> Qwen3MoeConfig:
    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=4096,
    )
    kw.update(overrides)
    return Qwen3MoeConfig(**kw)


FAMILY = MoEFamily(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    routing=routing,
    tiny_config=tiny_config,
    example_checkpoint="Qwen/Qwen3-30B-A3B",
)
