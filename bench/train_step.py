"""ESFT vs FFT vs LoRA training step: time and peak memory, DeepSeek-V2-Lite shape (issue 3).

Default (GPU): hidden 2048, 64 routed experts of 1408, 2 shared, top-6, 6 layers, random weights, bf16,
seq 4096, grouped GEMM experts, 6 experts per MoE layer selected for ESFT. ``--small`` is a CPU smoke
configuration (tiny shapes, float32) that checks the benchmark runs.

    python bench/train_step.py            # GPU
    python bench/train_step.py --small    # CPU smoke test
    python bench/train_step.py --fsdp2    # the same step with every decoder layer and the root under FSDP2
                                          # (torch's fully_shard, one process: the sharding machinery's cost)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, DeepseekV2Config

from moecraft.families import moe_layers
from moecraft.methods import get_method


def build_config(small: bool) -> DeepseekV2Config:
    if small:
        kw = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
                  n_shared_experts=2, num_experts_per_tok=4, kv_lora_rank=16, qk_nope_head_dim=16,
                  qk_rope_head_dim=8, v_head_dim=16)
    else:  # DeepSeek-V2-Lite shape, 6 layers
        kw = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                  num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
                  n_shared_experts=2, num_experts_per_tok=6, kv_lora_rank=512, qk_nope_head_dim=128,
                  qk_rope_head_dim=64, v_head_dim=128)
    return DeepseekV2Config(q_lora_rank=None, first_k_dense_replace=1, topk_method="greedy",
                            max_position_embeddings=8192, **kw)


def run_method(method_name: str, config, args, device, dtype, expert_file: Path) -> dict:
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: initialising billions of weights on the host is slow
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config._experts_implementation = "grouped_mm"
    model.config.use_cache = False
    for layer in moe_layers(model):  # random routers (zero-initialised by the class)
        torch.nn.init.normal_(layer.router.weight, std=config.hidden_size ** -0.5)
    # "esft-lora": ESFT's selected experts with per-expert LoRA factors instead of their full weights
    adapter = "lora" if method_name == "esft-lora" else "none"
    cfg = SimpleNamespace(experts=str(expert_file), train_shared_experts=None, train_non_expert_modules=None,
                          lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_experts=False, expert_adapter=adapter, seed=0)
    method = get_method("esft" if adapter == "lora" else method_name)
    model = method.prepare(model, cfg)
    if args.fsdp2:
        _fully_shard(model, device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    groups = method.param_groups(model, 0.0)
    n_opt = sum(p.numel() for g in groups for p in g["params"])
    opt = torch.optim.AdamW(groups, lr=method.default_lr)
    ids = torch.randint(0, config.vocab_size, (1, args.seq_len), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del model, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"method": method_name, "step_s": sorted(times)[len(times) // 2], "peak_gib": peak, "opt_params": n_opt}


def _fully_shard(model, device) -> None:
    """FSDP2 units as accelerate's TRANSFORMER_BASED_WRAP makes them: one per decoder layer, then the root."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():  # a one-process group: the FSDP2 code path without a launcher
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (1,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny CPU smoke configuration")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--experts-per-layer", type=int, default=6)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--methods", default="esft,fft,lora,esft-lora",
                    help="comma-separated: fft, esft, lora, esft-lora (LoRA on the selected experts only)")
    ap.add_argument("--fsdp2", action="store_true", help="wrap the model with FSDP2 (one process)")
    ap.add_argument("--json", type=Path, default=None, help="also write the settings and rows here as JSON")
    args = ap.parse_args()
    args.seq_len = args.seq_len or (128 if args.small else 4096)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = build_config(args.small)
    n = args.experts_per_layer
    moe_idx = range(config.first_k_dense_replace, config.num_hidden_layers)
    with tempfile.TemporaryDirectory() as tmp:
        expert_file = Path(tmp) / "experts.json"
        expert_file.write_text(json.dumps({"family": "deepseek_v2", "experts": {
            str(i): [(i * 7 + j * 5) % config.n_routed_experts for j in range(n)] for i in moe_idx}}))
        rows = [run_method(m, config, args, device, dtype, expert_file) for m in args.methods.split(",")]
    base = next((r for r in rows if r["method"] == "fft"), rows[0])
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {dtype}, "
          f"seq {args.seq_len}, hidden {config.hidden_size}, {config.n_routed_experts} experts, "
          f"{n} selected/layer, grouped_mm{', FSDP2 (1 process)' if args.fsdp2 else ''}")
    print(f"{'method':<9} {'step s':>9} {'x FFT':>6} {'peak GiB':>9} {'x FFT':>6} {'opt params':>14}")
    for r in rows:
        mem_ratio = r["peak_gib"] / base["peak_gib"] if base["peak_gib"] == base["peak_gib"] else float("nan")
        print(f"{r['method']:<9} {r['step_s']:>9.4f} {r['step_s'] / base['step_s']:>6.2f} {r['peak_gib']:>9.2f} "
              f"{mem_ratio:>6.2f} {r['opt_params']:>14,}")
    if args.json:
        settings = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
                    "seq_len": args.seq_len, "hidden": config.hidden_size, "experts": config.n_routed_experts,
                    "selected_per_layer": n, "fsdp2": args.fsdp2, "steps": args.steps}
        args.json.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
