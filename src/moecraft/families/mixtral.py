"""Mixtral: softmax top-2 of 8, always renormalised, no shared experts."""

from transformers import MixtralConfig

from moecraft.families.base import MoEFamily, RoutingSpec


def routing(c: MixtralConfig) -> RoutingSpec:
    return RoutingSpec(num_experts=c.num_local_experts, top_k=c.num_experts_per_tok, norm_topk_prob=True)


def tiny_config(vocab_size: int = 320, **overrides) -> MixtralConfig:
    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=4096,
    )
    kw.update(overrides)
    return MixtralConfig(**kw)


FAMILY = MoEFamily(
    name="mixtral",
    model_types=("mixtral",),
    routing=routing,
    tiny_config=tiny_config,
    example_checkpoint="mistralai/Mixtral-8x7B-v0.1",
)
