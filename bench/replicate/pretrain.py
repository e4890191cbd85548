"""Pretrain the two base models from scratch with the real transformers classes, resumably.

- ``moe``:   DeepseekV2ForCausalLM, fine-grained experts (full scale: 64 routed, top-6, 2 shared, first layer
             dense), trained with DeepSeekMoE's expert-level balance loss alpha * sum_i f_i P_i (mean over MoE
             layers), because transformers' DeepSeek-V2 has none and an unbalanced router would leave ESFT
             nothing to select from;
- ``dense``: LlamaForCausalLM with the same width and depth and an FFN as wide as the MoE's active experts.

Batches are a pure function of (seed, step): windows of ``pretrain_seq_len`` tokens drawn uniformly from all
training tokens, each document wrapped in bos/eos. On CUDA the model runs in bf16 (the fused expert kernels
want bf16) with fp32 master weights in the optimiser; on CPU everything is fp32. A run stops cleanly before
``time_budget`` seconds, leaving ``checkpoint.pt`` (weights, optimiser, step, RNG), and the next call
continues; at the end the model is saved with ``save_pretrained`` next to the tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import random
import time

import numpy as np
import torch

from replicate.common import Layout, Scale, domains, machine, read_json, write_json


# ----------------------------------------------------------------------------- models
def model_config(kind: str, scale: Scale, tokenizer):
    from transformers import DeepseekV2Config, LlamaConfig

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    if kind == "moe":
        return DeepseekV2Config(**scale.moe, **ids)
    if kind == "dense":
        return LlamaConfig(**scale.dense, **ids)
    raise ValueError(f"unknown model kind {kind!r}")


def parameter_counts(model) -> dict[str, int]:
    """Total parameters, parameters active per token (routed experts count K/E), embedding parameters."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    share = cfg.num_experts_per_tok / cfg.n_routed_experts if routed else 1.0
    emb = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    return {"total": total, "active": round(total - routed * (1 - share)), "embedding": emb}


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """DeepSeekMoE expert-level balance loss sum_i f_i P_i, f_i = E/(K T) * #tokens choosing i, mean over layers."""
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        n_exp = probs.shape[-1]
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
        f = chosen.mean(0) * n_exp / top_k
        losses.append((f * probs.mean(0)).sum())
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------- data
def token_arrays(layout: Layout, tokenizer) -> dict[str, np.ndarray]:
    """``{"<domain>.<split>": uint16/uint32 tokens}``, cached as .npy; documents wrapped in bos ... eos."""
    out = {}
    cache = layout.root / "pretrain" / "tokens"
    cache.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if len(tokenizer) < 2**16 else np.uint32
    for domain in domains(layout):
        for split in ("train", "heldout"):
            key = f"{domain}.{split}"
            path = cache / f"{key}.npy"
            if not path.is_file():
                docs: dict[str, list[str]] = {}
                with (layout.corpus / f"{key}.jsonl").open(encoding="utf-8") as f:
                    for line in f:
                        r = json.loads(line)
                        docs.setdefault(f"{r['source']}/{r['doc']}", []).append(r["text"])
                texts = ["".join(parts) for parts in docs.values()]
                bos, eos = np.array([tokenizer.bos_token_id], dtype), np.array([tokenizer.eos_token_id], dtype)
                pieces = []
                for i in range(0, len(texts), 256):
                    for enc in tokenizer.backend_tokenizer.encode_batch(texts[i : i + 256], add_special_tokens=False):
                        pieces += [bos, np.asarray(enc.ids, dtype), eos]
                tmp = path.with_name(path.stem + ".tmp.npy")
                np.save(tmp, np.concatenate(pieces))
                os.replace(tmp, path)
            out[key] = np.load(path, mmap_mode="r")
    return out


def batch(tokens: np.ndarray, seed: int, step: int, size: int, seq_len: int) -> torch.Tensor:
    starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - seq_len, size=size)
    return torch.from_numpy(np.stack([tokens[s : s + seq_len].astype(np.int64) for s in starts]))


def lr_at(step: int, scale: Scale) -> float:
    """Linear warmup, cosine to 10% of the peak."""
    if step < scale.pretrain_warmup:
        return scale.pretrain_lr * (step + 1) / scale.pretrain_warmup
    progress = (step - scale.pretrain_warmup) / max(1, scale.pretrain_steps - scale.pretrain_warmup)
    return scale.pretrain_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ----------------------------------------------------------------------------- training
def pretrain(kind: str, layout: Layout, scale: Scale, time_budget: float | None, seed: int = 0,
             command: str = "", stop_after: int | None = None) -> dict:
    """Train (or continue) ``kind``; returns ``{"done": bool, ...}``. Idempotent once ``info.json`` exists.

    ``stop_after`` ends this call after that many steps, as a spent time budget would (for resume checks).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.monotonic()
    work, final = layout.pretrain(kind), layout.model(kind)
    if (final / "info.json").is_file():
        return {"done": True, **read_json(final / "info.json")}
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(layout.tokenizer))
    tokens = token_arrays(layout, tokenizer)
    doms = domains(layout)
    train_tokens = np.concatenate([tokens[f"{d}.train"] for d in doms])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(seed)
    config = model_config(kind, scale, tokenizer)
    config.use_cache = False
    model = AutoModelForCausalLM.from_config(config).to(device)
    counts = parameter_counts(model)
    names = [n for n, _ in model.named_parameters()]
    # fp32 master weights for the optimiser; the model itself runs in bf16 on CUDA
    masters = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
    if cuda:
        model.to(torch.bfloat16)
    groups = [{"params": [m for m in masters if m.dim() >= 2], "weight_decay": 0.1},
              {"params": [m for m in masters if m.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=scale.pretrain_lr, betas=(0.9, 0.95), eps=1e-8)
    step, wall_before, parts = 0, 0.0, 1
    ckpt, log_path = work / "checkpoint.pt", work / "log.jsonl"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        step, wall_before, parts = state["step"], state["wall_s"], state["parts"] + 1
        with torch.no_grad():
            for n, m in zip(names, masters):
                m.copy_(state["weights"][n])
        opt.load_state_dict(state["optimizer"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        if cuda and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        kept = [ln for ln in log_path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        log_path.write_text("".join(ln + "\n" for ln in kept))
        print(f"  {kind}: resumed at step {step}/{scale.pretrain_steps} (part {parts})", flush=True)
    elif log_path.exists():
        log_path.unlink()
    sync_model(model, masters)

    def save_checkpoint() -> float:
        t0 = time.monotonic()
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state() if cuda else None}
        state = {"step": step, "weights": {n: m.detach() for n, m in zip(names, masters)},
                 "optimizer": opt.state_dict(), "rng": rng, "parts": parts,
                 "wall_s": wall_before + time.monotonic() - t_start}
        torch.save(state, work / "checkpoint.tmp")
        os.replace(work / "checkpoint.tmp", ckpt)
        return time.monotonic() - t0

    model.train()
    is_moe = kind == "moe"
    step_s, save_s, last_save = 0.0, 0.0, time.monotonic()
    n_tok = scale.pretrain_batch * scale.pretrain_seq_len
    while step < scale.pretrain_steps:
        reserve = 3 * step_s + 2 * save_s + 10
        out_of_time = time_budget is not None and time.monotonic() - t_start + reserve > time_budget
        if out_of_time or (stop_after is not None and step >= stop_after):
            save_checkpoint()
            print(f"  {kind}: time budget reached at step {step}/{scale.pretrain_steps}; checkpoint saved", flush=True)
            return {"done": False, "step": step}
        t0 = time.monotonic()
        lr = lr_at(step, scale)
        for g in opt.param_groups:
            g["lr"] = lr
        ids = batch(train_tokens, seed, step, scale.pretrain_batch, scale.pretrain_seq_len).to(device)
        out = model(input_ids=ids, labels=ids, output_router_logits=is_moe)
        aux = balance_loss(out.router_logits, config.num_experts_per_tok) if is_moe else torch.zeros((), device=device)
        (out.loss + scale.aux_loss_coef * aux).backward()
        for p, m in zip(model.parameters(), masters):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        gnorm = torch.nn.utils.clip_grad_norm_(masters, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync_model(model, masters)
        step += 1
        if cuda:
            torch.cuda.synchronize()
        step_s = time.monotonic() - t0
        rec = {"step": step, "loss": out.loss.item(), "balance_loss": aux.item(), "lr": lr, "grad_norm": float(gnorm),
               "tokens_per_s": n_tok / step_s}
        with log_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if step % max(1, scale.pretrain_steps // 20) == 0:
            print(f"  {kind} step {step}/{scale.pretrain_steps} loss {rec['loss']:.3f} "
                  f"bal {rec['balance_loss']:.3f} {rec['tokens_per_s']:.0f} tok/s", flush=True)
        if time.monotonic() - last_save > 120:
            save_s, last_save = save_checkpoint(), time.monotonic()

    heldout = {d: heldout_loss(model, tokens[f"{d}.heldout"], scale) for d in doms}
    model.config.use_cache = True
    # the generation config was derived from the training config (use_cache off); without this every
    # generated token re-runs the whole prefix (~10x slower evaluation)
    model.generation_config.use_cache = True
    model.eval()
    final.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(final))
    tokenizer.save_pretrained(str(final))
    log = [json.loads(ln) for ln in log_path.read_text().splitlines()]
    tail = log[-max(1, len(log) // 20):]
    info = {"kind": kind, "architecture": type(model).__name__, "parameters": counts, "config": scale.moe
            if is_moe else scale.dense, "vocab_size": len(tokenizer), "steps": step, "seed": seed,
            "tokens_seen": step * n_tok, "train_tokens": {d: int(len(tokens[f"{d}.train"])) for d in doms},
            "heldout_tokens": {d: int(len(tokens[f"{d}.heldout"])) for d in doms},
            "final_train_loss": sum(r["loss"] for r in tail) / len(tail),
            "heldout_loss": heldout, "heldout_ppl": {d: math.exp(v) for d, v in heldout.items()},
            "precision": "bf16 weights + fp32 master (CUDA)" if cuda else "fp32 (CPU)", "device": str(device),
            "wall_s": wall_before + time.monotonic() - t_start, "parts": parts,
            "mean_tokens_per_s": sum(r["tokens_per_s"] for r in log) / len(log), "command": command,
            "lr": scale.pretrain_lr, "batch": scale.pretrain_batch, "seq_len": scale.pretrain_seq_len,
            "balance_loss_coef": scale.aux_loss_coef if is_moe else None, "machine": machine()}
    write_json(final / "info.json", info)
    ckpt.unlink(missing_ok=True)
    print(f"  {kind}: done, held-out loss " + ", ".join(f"{d} {v:.3f}" for d, v in heldout.items()), flush=True)
    return {"done": True, **info}


@torch.no_grad()
def sync_model(model, masters: list[torch.Tensor]) -> None:
    for p, m in zip(model.parameters(), masters):
        p.copy_(m)


@torch.no_grad()
def heldout_loss(model, tokens: np.ndarray, scale: Scale) -> float:
    """Mean next-token loss over the first ``pretrain_eval_windows`` non-overlapping windows."""
    model.eval()
    n = min(scale.pretrain_eval_windows, len(tokens) // scale.pretrain_seq_len)
    if n == 0:
        raise SystemExit("pretrain: held-out split shorter than one window")
    device = next(model.parameters()).device
    losses = []
    for i in range(n):
        ids = torch.from_numpy(tokens[i * scale.pretrain_seq_len : (i + 1) * scale.pretrain_seq_len].astype(np.int64))
        losses.append(float(model(input_ids=ids[None].to(device), labels=ids[None].to(device)).loss))
    model.train()
    return sum(losses) / n
