"""Runs under transformers 4.57 (``PYTHONPATH`` = a ``pip install --target`` folder), for tests/test_cross_version.py.

    python transformers4_worker.py bases OUT          # tiny hub-style bases, as transformers 4.x saves them
    python transformers4_worker.py logits IDS OUT MODEL...  # load each MODEL with 4.x: logits of IDS, what it read

The bases are what a user downloads from the hub today: ``config.json`` in the 4.x form (``rope_theta``,
``rope_scaling``, ``torch_dtype``, ``num_experts``), per-expert weight keys, a tokenizer saved by 4.x.
DeepSeek-V2 carries YaRN rope scaling, as DeepSeek-V2-Lite does. This file imports nothing of moecraft.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

VOCAB = 320
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, max_position_embeddings=4096)
CONFIGS = {
    "deepseek_v2": ("DeepseekV2Config", dict(
        intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3, num_key_value_heads=4,
        n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4, first_k_dense_replace=1, kv_lora_rank=16,
        q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, topk_method="greedy",
        norm_topk_prob=False,
        # YaRN as DeepSeek-V2-Lite has it, with a factor that fits the tiny context and without its
        # ``mscale_all_dim``: 4.57's own DeepseekV2 omits the softmax scale that key sets (5.x applies it, as
        # DeepSeek's code does), so with it the two versions differ on the base itself, merge or not
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 32.0,
                      "beta_slow": 1.0})),
    "deepseek_v3": ("DeepseekV3Config", dict(
        intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3, num_key_value_heads=4,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1, n_group=4,
        topk_group=2, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        routed_scaling_factor=2.5, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", dict(
        intermediate_size=32, num_hidden_layers=2, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(
        intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_hidden_layers=2,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_key_value_heads=2, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", dict(
        intermediate_size=32, num_hidden_layers=2, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2)),
}
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n\n{% else %}"
                 "Assistant: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}Assistant:{% endif %}")


def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with bos/eos/pad, saved by 4.x as a hub tokenizer would be."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(alphabet)}
    special = ["<|bos|>", "<|eos|>", "<|pad|>"]
    for tok in special:
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_bases(out: Path) -> None:
    for i, (family, (cls_name, kw)) in enumerate(CONFIGS.items()):
        config = getattr(transformers, cls_name)(**SMALL, **kw, bos_token_id=256, eos_token_id=257, pad_token_id=258)
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
        with torch.no_grad():  # weights of a trained model's scale (4.x zero-inits some routers)
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.08)
        model.save_pretrained(out / family)
        tokenizer().save_pretrained(out / family)


def logits(model_dir: Path, ids_file: Path, out: Path) -> None:
    ids = torch.tensor(json.loads(ids_file.read_text()))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        result = {"logits": model(ids).logits.contiguous()}
        scaling = getattr(model.config, "rope_scaling", None)
        if scaling:  # the same weights without the rope scaling: shows the scaling is in effect
            model.config.rope_scaling = None
            plain = AutoModelForCausalLM.from_pretrained(model_dir, config=model.config, torch_dtype=torch.float32)
            result["logits_without_rope_scaling"] = plain.eval()(ids).logits.contiguous()
    n_experts = getattr(model.config, "num_experts", None) or getattr(model.config, "num_local_experts", None) \
        or getattr(model.config, "n_routed_experts", None)
    meta = {"transformers": transformers.__version__, "tokenizer_class": type(tok).__name__,
            "encoded": json.dumps(tok("User: hello 世界")["input_ids"]), "rope_scaling": json.dumps(scaling),
            "num_experts": str(n_experts)}
    save_file(result, str(out), metadata=meta)


if __name__ == "__main__":
    if sys.argv[1] == "bases":
        make_bases(Path(sys.argv[2]))
    elif sys.argv[1] == "logits":
        for model_dir in sys.argv[4:]:
            logits(Path(model_dir), Path(sys.argv[2]), Path(sys.argv[3]) / f"{Path(model_dir).name}.safetensors")
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
