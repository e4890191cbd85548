"""DeepSeek-V2 / V2-Lite (ESFT's own model): softmax gate, greedy or group-limited top-k, 2 shared experts."""

from transformers import DeepseekV2Config

from moecraft.families.base import MoEFamily, RoutingSpec


def routing(c: DeepseekV2Config) -> RoutingSpec:
    group_limited = c.topk_method == "group_limited_greedy"
    return RoutingSpec(
        num_experts=c.n_routed_experts,
        top_k=c.num_experts_per_tok,
        scoring="softmax",
        norm_topk_prob=False,  # the transformers 5 router never renormalises
        scaling_factor=float(c.routed_scaling_factor),
        n_group=c.n_group if group_limited else None,
        topk_group=c.topk_group if group_limited else None,
        group_score="max" if group_limited else None,
    )


def tiny_config(vocab_size: int = 320, **overrides) -> DeepseekV2Config:
    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
        n_shared_experts=2, num_experts_per_tok=4, first_k_dense_replace=1, kv_lora_rank=16,
        q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8,
        max_position_embeddings=4096, topk_method="greedy", norm_topk_prob=False,
    )
    kw.update(overrides)
    return DeepseekV2Config(**kw)


FAMILY = MoEFamily(
    name="deepseek_v2",
    model_types=("deepseek_v2",),
    routing=routing,
    tiny_config=tiny_config,
    example_checkpoint="deepseek-ai/DeepSeek-V2-Lite",
    shared_attrs=("shared_experts",),
    notes="first_k_dense_replace leading layers are dense and have no router",
)
