"""GPT-OSS: biased linear router, top-k of the logits, softmax over the k; experts transposed, interleaved, biased."""

from transformers import GptOssConfig

from moecraft.families.base import MoEFamily, RoutingSpec


def routing(c: GptOssConfig) -> RoutingSpec:
    return RoutingSpec(
        num_experts=c.num_local_experts, top_k=c.num_experts_per_tok, scoring="topk_softmax", router_bias=True
    )


def tiny_config(vocab_size: int = 320, **overrides) -> GptOssConfig:
    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=32, num_hidden_layers=2, head_dim=16,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=4096, sliding_window=128, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    kw.update(overrides)
    return GptOssConfig(**kw)


FAMILY = MoEFamily(
    name="gpt_oss",
    model_types=("gpt_oss",),
    routing=routing,
    tiny_config=tiny_config,
    example_checkpoint="openai/gpt-oss-20b",
    router_attr="router",
    notes="gate scores are softmax over the top-k logits only, so they always sum to 1 per token",
)
