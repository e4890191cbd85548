"""OLMoE: softmax top-8 of 64, no renormalisation, no shared experts."""

from transformers import OlmoeConfig

from moecraft.families.base import MoEFamily, RoutingSpec


def routing(c: OlmoeConfig) -> RoutingSpec:
    return RoutingSpec(num_experts=c.num_experts, top_k=c.num_experts_per_tok, norm_topk_prob=bool(c.norm_topk_prob))


def tiny_config(vocab_size: int = 320, **overrides) -> OlmoeConfig:
    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=4096, pad_token_id=None, eos_token_id=None,
    )
    kw.update(overrides)
    return OlmoeConfig(**kw)


FAMILY = MoEFamily(
    name="olmoe",
    model_types=("olmoe",),
    routing=routing,
    tiny_config=tiny_config,
    example_checkpoint="allenai/OLMoE-1B-7B-0924",
)
