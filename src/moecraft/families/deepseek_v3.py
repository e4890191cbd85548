"""DeepSeek-V3 / R1 / Kimi-K2 layout: sigmoid gate, bias-corrected group-limited top-k, renormalised, scaled."""

from transformers import DeepseekV3Config

from moecraft.families.base import MoEFamily, RoutingSpec


def routing(c: DeepseekV3Config) -> RoutingSpec:
    return RoutingSpec(
        num_experts=c.n_routed_experts,
        top_k=c.num_experts_per_tok,
        scoring="sigmoid",
        norm_topk_prob=bool(c.norm_topk_prob),
        scaling_factor=float(c.routed_scaling_factor),
        n_group=c.n_group,
        topk_group=c.topk_group,
        group_score="top2_sum",
        correction_bias=True,
    )


def tiny_config(vocab_size: int = 320, **overrides) -> DeepseekV3Config:
    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1, n_group=4, topk_group=2,
        kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_position_embeddings=4096, routed_scaling_factor=2.5, norm_topk_prob=True,
    )
    kw.update(overrides)
    return DeepseekV3Config(**kw)


FAMILY = MoEFamily(
    name="deepseek_v3",
    model_types=("deepseek_v3", "kimi_k2"),
    routing=routing,
    tiny_config=tiny_config,
    example_checkpoint="deepseek-ai/DeepSeek-V3",
    shared_attrs=("shared_experts",),
    notes="routing weights include routed_scaling_factor; moecraft's gate score divides it out",
)
