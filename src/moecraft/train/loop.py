"""The training loop shared by every method (esft, fft, lora, pesc), on accelerate.

ESFT paper §4.1 set-up: packed sequences of ``seq_len`` tokens (loss on response tokens of chat data),
optional 1:1 mixing with an alignment data set, AdamW, warmup + cosine/linear decay, gradient clipping.
The method (:mod:`moecraft.methods`) decides what is trainable and what is saved; the loop only trains
the parameters it is given.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moecraft.artifacts import base_fingerprint, model_bytes, write_manifest
from moecraft.config import dump_yaml
from moecraft.data import BUILTIN_PREFIX, load_records, sample_sequences
from moecraft.errors import MoecraftError
from moecraft.methods import get_method
from moecraft.models import load_model
from moecraft.runinfo import seed_everything, write_run_info
from moecraft.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from moecraft.train.config import TrainConfig

Seq = tuple[list[int], list[int]]


# ----------------------------------------------------------------------------- schedule
def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at optimiser step ``step``: linear warmup, then cosine/linear/constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


# ----------------------------------------------------------------------------- data
def _eval_source(cfg: TrainConfig) -> str | None:
    if cfg.eval_data:
        return cfg.eval_data
    if cfg.data.startswith(BUILTIN_PREFIX) and cfg.data.count(":") == 1:
        return f"{cfg.data}:eval"
    return None


def build_data(cfg: TrainConfig, tokenizer) -> tuple[list[Seq], list[Seq]]:
    """(train sequences, eval sequences), packed to ``seq_len`` with response-token loss masks."""
    n_train = cfg.max_steps * cfg.batch_size * cfg.grad_accum
    records = load_records(cfg.data, limit=cfg.max_records)
    eval_src = _eval_source(cfg)
    if eval_src:
        eval_records = load_records(eval_src, limit=cfg.max_records)
    else:  # hold out a seeded share of the training records
        order = list(range(len(records)))
        random.Random(cfg.seed + 1).shuffle(order)
        n_eval = max(1, int(len(records) * cfg.eval_fraction))
        if n_eval >= len(records):
            raise MoecraftError(f"{cfg.data}: too few records to hold out an eval split; give --eval-data")
        eval_records = [records[i] for i in order[:n_eval]]
        records = [records[i] for i in order[n_eval:]]
    n_mix = round(n_train * cfg.mix_ratio) if cfg.mix_data else 0
    train = sample_sequences(records, tokenizer, n_train - n_mix, cfg.seq_len, cfg.seed, response_only=True)
    if n_mix:
        mix = sample_sequences(load_records(cfg.mix_data, limit=cfg.max_records), tokenizer, n_mix, cfg.seq_len,
                               cfg.seed, response_only=True)
        train = train + mix
        random.Random(cfg.seed + 2).shuffle(train)
    evals = sample_sequences(eval_records, tokenizer, cfg.eval_sequences, cfg.seq_len, cfg.seed, response_only=True)
    return train, evals


def collate(seqs: list[Seq], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 off the loss mask and on padding."""
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, (x, m) in enumerate(seqs):
        n = len(x)
        ids[row, :n] = torch.tensor(x)
        att[row, :n] = 1
        labels[row, :n] = torch.where(torch.tensor(m, dtype=torch.bool), torch.tensor(x), -100)
    return {"input_ids": ids.to(device), "attention_mask": att.to(device), "labels": labels.to(device)}


@torch.no_grad()
def eval_loss(model, seqs: list[Seq], pad_id: int, device) -> float:
    """Token-weighted mean next-token loss over ``seqs``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for seq in seqs:
        batch = collate([seq], pad_id, device)
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n:
            total += float(model(**batch).loss) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


# ----------------------------------------------------------------------------- loop
def _resolve_dtype(cfg: TrainConfig, device) -> torch.dtype | str:
    from moecraft.models import resolve_dtype

    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return resolve_dtype(cfg.dtype)


def train(cfg: TrainConfig, *, stop_after: int | None = None) -> dict:
    """Train ``cfg.model`` with ``cfg.method`` and write the artifact to ``cfg.out``; returns a summary.

    ``stop_after`` stops after that many optimiser steps without saving the artifact (a stand-in for a
    killed run; the last checkpoint is what ``--resume`` continues from).
    """
    from accelerate import Accelerator

    if cfg.max_steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise MoecraftError("max_steps, batch_size and grad_accum must be at least 1")
    if not 0 <= cfg.mix_ratio < 1:
        raise MoecraftError(f"mix_ratio must be in [0, 1), got {cfg.mix_ratio}")
    method = get_method(cfg.method)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    if hasattr(method, "load_base"):  # e.g. PESC loads a 4-bit QLoRA base where CUDA + bitsandbytes allow
        model, tokenizer = method.load_base(cfg, device)
    else:
        model, tokenizer = load_model(cfg.model, dtype=_resolve_dtype(cfg, device))
    fingerprint = base_fingerprint(model)
    fingerprint["base_bytes"] = model_bytes(model)
    model = method.prepare(model, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    groups = method.param_groups(model, cfg.weight_decay)
    n_opt = sum(p.numel() for g in groups for p in g["params"])
    if n_opt == 0:
        raise MoecraftError(f"method '{cfg.method}' left nothing to train")
    lr = cfg.lr if cfg.lr is not None else method.default_lr
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    model, optimizer = accelerator.prepare(model, optimizer)

    train_seqs, eval_seqs = build_data(cfg, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    metrics_path = out / "metrics.jsonl"
    step = 0
    ckpt = find_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        step = load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler)["step"]
        kept = [ln for ln in metrics_path.read_text().splitlines() if json.loads(ln).get("step", 0) <= step] \
            if metrics_path.is_file() else []
        metrics_path.write_text("".join(ln + "\n" for ln in kept))
    else:
        metrics_path.write_text("")
    (out / "train_config.yaml").write_text(dump_yaml(cfg))
    write_run_info(out, cfg)

    per_step = cfg.batch_size * cfg.grad_accum
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {cfg.method}", disable=not cfg.progress,
               dynamic_ncols=True)
    last = {}
    t0, tokens = time.perf_counter(), 0
    while step < cfg.max_steps:
        optimizer.zero_grad(set_to_none=True)
        loss_sum, extra_logs = 0.0, {}
        for micro in range(cfg.grad_accum):
            start = (step * per_step + micro * cfg.batch_size) % len(train_seqs)  # data position = step
            seqs = [train_seqs[(start + i) % len(train_seqs)] for i in range(cfg.batch_size)]
            batch = collate(seqs, pad_id, device)
            tokens += int(batch["attention_mask"].sum())
            loss = model(**batch).loss
            extra = method.extra_loss(accelerator.unwrap_model(model))
            if extra.loss is not None:
                loss = loss + extra.loss
            extra_logs = extra.logs
            accelerator.backward(loss / cfg.grad_accum)
            loss_sum += float(loss.detach()) / cfg.grad_accum
        grad_norm = None
        if cfg.max_grad_norm > 0:
            grad_norm = float(accelerator.clip_grad_norm_([p for g in groups for p in g["params"]],
                                                          cfg.max_grad_norm))
        cur_lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        step += 1
        elapsed = time.perf_counter() - t0
        last = {"step": step, "loss": loss_sum, "lr": cur_lr, "grad_norm": grad_norm,
                "tokens_per_s": tokens / elapsed if elapsed else None, **extra_logs}
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            last["eval_loss"] = eval_loss(model, eval_seqs, pad_id, device)
        if step % cfg.log_every == 0 or "eval_loss" in last:
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(last) + "\n")
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{cur_lr:.2e}", tok_s=f"{last['tokens_per_s'] or 0:.0f}")
        bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            save_checkpoint(out, accelerator.unwrap_model(model), optimizer, scheduler, {"step": step})
        if stop_after is not None and step >= stop_after and step < cfg.max_steps:
            bar.close()
            return {"out": str(out), "steps": step, "stopped": True}
    bar.close()

    final_eval = eval_loss(model, eval_seqs, pad_id, device)
    with metrics_path.open("a") as fh:
        fh.write(json.dumps({"step": step, "eval_loss": final_eval, "final": True}) + "\n")
    unwrapped = accelerator.unwrap_model(model)
    method.save(unwrapped, out, cfg)
    manifest = write_manifest(out, method=cfg.method, base=cfg.model, fingerprint=fingerprint,
                              extra={"optimizer_parameters": n_opt, "steps": step})
    summary = {"out": str(out), "steps": step, "train_loss": last.get("loss"), "eval_loss": final_eval,
               "optimizer_parameters": n_opt, "artifact_bytes": manifest["artifact_bytes"],
               "base_bytes": manifest["base_bytes"], "model": unwrapped}
    return summary
