"""Scoring throughput: router-statistics hooks vs a plain forward of the same model and data.

The statistics pass runs the decoder (no LM head) with hooks on every router; the baseline runs the same
decoder on the same packed sequences without hooks. Both are timed side by side in one process, in
alternating rounds, and the best round of each is reported.

    python bench/score.py                 # DeepSeek-V2-Lite-like layer shapes, reduced depth (GPU)
    python bench/score.py --small         # CPU-sized model
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from moecraft.esft.stats import collect_router_stats
from moecraft.families.deepseek_v2 import tiny_config
from moecraft.models import _randomise_routers


def build(small: bool, device: torch.device, dtype: torch.dtype):
    if small:
        cfg = tiny_config(vocab_size=1024, hidden_size=256, moe_intermediate_size=128, intermediate_size=512,
                          num_hidden_layers=4, n_routed_experts=64, num_experts_per_tok=6, kv_lora_rank=64,
                          qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_attention_heads=4)
    else:  # DeepSeek-V2-Lite layer shapes, 6 layers
        cfg = tiny_config(vocab_size=102400, hidden_size=2048, moe_intermediate_size=1408, intermediate_size=10944,
                          num_hidden_layers=6, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                          kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                          num_attention_heads=16, num_key_value_heads=16)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    _randomise_routers(model, 0)
    return model.to(device=device, dtype=dtype).eval(), cfg


@torch.no_grad()
def plain_forward(model, sequences, batch_size):
    decoder = model.get_decoder()
    device = next(model.parameters()).device
    for start in range(0, len(sequences), batch_size):
        ids = torch.tensor([s[0] for s in sequences[start : start + batch_size]], device=device)
        decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU-sized model and sample")
    ap.add_argument("--n-sequences", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the settings and figures here as JSON")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n_seq = args.n_sequences or (8 if args.small else 32)
    seq_len = args.seq_len or (1024 if args.small else 4096)
    model, cfg = build(args.small, device, dtype)
    gen = torch.Generator().manual_seed(0)
    sequences = [(torch.randint(0, cfg.vocab_size, (seq_len,), generator=gen).tolist(), [1] * seq_len)
                 for _ in range(n_seq)]

    plain_forward(model, sequences[:1], 1)  # warm-up (kernels, allocator)
    plain, hooked = [], []
    for _ in range(args.rounds):
        plain.append(timed(lambda: plain_forward(model, sequences, args.batch_size), device))
        hooked.append(timed(lambda: collect_router_stats(model, sequences, args.batch_size, progress=False), device))
    tokens = n_seq * seq_len
    best_plain, best_hooked = min(plain), min(hooked)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'}, {torch.get_num_threads()} threads)"
    print(f"device: {where}; dtype {dtype}; torch {torch.__version__}")
    print(f"model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.n_routed_experts} experts top-"
          f"{cfg.num_experts_per_tok}; sample {n_seq} x {seq_len} tokens, batch {args.batch_size}")
    print(f"{'pass':<22}{'best s':>9}{'tokens/s':>12}")
    print(f"{'plain forward':<22}{best_plain:>9.3f}{tokens / best_plain:>12.0f}")
    print(f"{'router statistics':<22}{best_hooked:>9.3f}{tokens / best_hooked:>12.0f}")
    print(f"hook overhead: {100 * (best_hooked / best_plain - 1):+.1f}%  (goal: under 10%)")
    if args.json:
        args.json.write_text(json.dumps({
            "settings": {"device": where, "dtype": str(dtype), "layers": cfg.num_hidden_layers,
                         "hidden": cfg.hidden_size, "experts": cfg.n_routed_experts, "top_k": cfg.num_experts_per_tok,
                         "sequences": n_seq, "seq_len": seq_len, "batch_size": args.batch_size, "rounds": args.rounds},
            "plain_s": best_plain, "hooked_s": best_hooked, "tokens": tokens,
            "overhead": best_hooked / best_plain - 1}, indent=1))


if __name__ == "__main__":
    main()
