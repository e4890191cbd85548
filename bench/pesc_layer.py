"""Forward+backward time of the PESC layer against (a) the dense FFN with LoRA r=64 on gate/up/down and
(b) a reference-style per-expert Python loop, at Llama-2-7B and TinyLlama FFN shapes.

GPU default: bf16, 8192 tokens, 8 experts, top-2, adapter r in (512, 64).
``--small``: a CPU-sized run (shapes / 4, 1024 tokens, float32) to compare ratios without a GPU.

    python bench/pesc_layer.py [--small] [--iters 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moecraft.pesc.layer import PescMoE

SHAPES = {"llama2-7b": (4096, 11008), "tinyllama-1.1b": (2048, 5632)}


class FFN(nn.Module):
    def __init__(self, h, i, lora_rank=0):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.act_fn = nn.SiLU()
        self.requires_grad_(False)
        self.lora = nn.ParameterList()
        if lora_rank:
            for lin in (self.gate_proj, self.up_proj, self.down_proj):
                self.lora.append(nn.Parameter(torch.randn(lin.in_features, lora_rank) * 0.01))
                self.lora.append(nn.Parameter(torch.randn(lora_rank, lin.out_features) * 0.01))

    def _lin(self, j, lin, x):
        y = lin(x)
        return y + (x @ self.lora[2 * j]) @ self.lora[2 * j + 1] if len(self.lora) else y

    def forward(self, x):
        h = self.act_fn(self._lin(0, self.gate_proj, x)) * self._lin(1, self.up_proj, x)
        return self._lin(2, self.down_proj, h)


class LoopPesc(nn.Module):
    """Reference-style layer: one Python iteration per expert over the tokens routed to it."""

    def __init__(self, ffn, h, e, k, r, s=0.25):
        super().__init__()
        self.ffn, self.k, self.s = ffn, k, s
        self.router = nn.Linear(h, e, bias=False)
        self.down = nn.ModuleList(nn.Linear(h, r, bias=False) for _ in range(e))
        self.up = nn.ModuleList(nn.Linear(r, h, bias=False) for _ in range(e))

    def forward(self, x):
        y = self.ffn(x)
        top, idx = self.router(x).topk(self.k, dim=-1)
        w = torch.softmax(top.float(), -1).to(x.dtype)
        out = y.clone()
        for e in range(len(self.down)):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                a = self.up[e](F.gelu(self.down[e](y[tok]))) * self.s
                out = out.index_add(0, tok, a * w[tok, slot, None])
        return out


def time_fb(module, x, iters, sync):
    def step():
        out = module(x)
        out.float().square().mean().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    for _ in range(2):
        step()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="CPU-sized run (shapes/4, 1024 tokens, fp32)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the settings and rows here as JSON")
    args = ap.parse_args()
    device = "cpu" if args.small or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tokens = args.tokens or (1024 if args.small else 8192)
    div = 4 if args.small else 1
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    print(f"device={device} dtype={dtype} tokens={tokens} experts=8 top-2 "
          f"({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'})")
    print(f"{'shape':<16}{'H':>6}{'I':>7}{'r':>5}  {'(a) ms':>9}{'pesc ms':>9}{'loop ms':>9}  {'pesc/(a)':>8}{'loop/(a)':>9}")
    rows = []
    for name, (h, i) in SHAPES.items():
        h, i = h // div, i // div
        torch.manual_seed(0)
        x = torch.randn(tokens, h, device=device, dtype=dtype, requires_grad=True)
        base = FFN(h, i, lora_rank=64).to(device, dtype)
        t_a = time_fb(base, x, args.iters, sync)
        for r in (512 // div, 64 // div):
            ffn = FFN(h, i).to(device, dtype)
            pesc = PescMoE(ffn, h, i, 8, 2, r, 0.25).to(device, dtype)
            pesc.reset_parameters()
            with torch.no_grad():
                pesc.experts.up.normal_(0, 0.01)
            loop = LoopPesc(ffn, h, 8, 2, r).to(device, dtype)
            t_p = time_fb(pesc, x, args.iters, sync)
            t_l = time_fb(loop, x, args.iters, sync)
            print(f"{name:<16}{h:>6}{i:>7}{r:>5}  {t_a * 1e3:>9.2f}{t_p * 1e3:>9.2f}{t_l * 1e3:>9.2f}  "
                  f"{t_p / t_a:>8.2f}{t_l / t_a:>9.2f}")
            rows.append({"shape": name, "hidden": h, "intermediate": i, "rank": r, "dense_lora_ms": t_a * 1e3,
                         "pesc_ms": t_p * 1e3, "loop_ms": t_l * 1e3})
    if args.json:
        args.json.write_text(json.dumps({"settings": {"device": device, "dtype": str(dtype), "tokens": tokens,
                                                      "iters": args.iters}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
