"""The training loop shared by every method (esft, fft, lora, pesc), on accelerate.

ESFT paper §4.1 set-up: packed sequences of ``seq_len`` tokens (loss on response tokens of chat data),
optional 1:1 mixing with an alignment data set, AdamW, warmup + cosine/linear decay, gradient clipping.
The method (:mod:`moecraft.methods`) decides what is trainable and what is saved; the loop only trains
the parameters it is given.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moecraft.artifacts import base_fingerprint, model_bytes, write_manifest
from moecraft.config import dump_yaml
from moecraft.data import BUILTIN_PREFIX, DataOptions, load_records, mix_sequences, sample_sequences
from moecraft.data.packing import NoResponseTokensError
from moecraft.data.render import early_tokenizer, template_options
from moecraft.errors import MoecraftError
from moecraft.esft.expert_parallel import clip_grad_norm_ep, expert_parallel_config
from moecraft.files import RunFolder, run_folder, write_text
from moecraft.methods import get_method
from moecraft.models import check_sequence_length, load_model
from moecraft.runinfo import seed_everything, write_run_info
from moecraft.train.checkpoint import (
    check_inputs,
    find_checkpoint,
    load_trainable,
    open_checkpoint,
    restore_optimizer,
    resume_metrics,
    run_inputs,
    save_checkpoint,
)
from moecraft.train.config import TrainConfig
from moecraft.train.distributed import check_engine, gathered, make_accelerator, mark_zero3_leaf_modules
from moecraft.train.optim import LOW_PRECISION, AdamWMaster
from moecraft.train.stopping import (
    StopSignals,
    check_finite_eval,
    check_finite_weights,
    interrupted,
    last_good,
    stop_requested,
)
from moecraft.train.tracking import Tracking, accelerator_options, check_trackers, hyperparameters

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


def build_data(cfg: TrainConfig, tokenizer, num_processes: int = 1) -> tuple[list[Seq], list[Seq]]:
    """(train sequences, eval sequences), packed to ``seq_len`` with response-token loss masks."""
    n_train = cfg.max_steps * cfg.batch_size * cfg.grad_accum * num_processes
    opts = DataOptions.from_config(cfg)  # one set of format options for every data source of the run
    records = load_records(cfg.data, limit=cfg.max_records, options=opts)
    eval_src = _eval_source(cfg)
    train_name, eval_name = cfg.data, eval_src  # how errors name a record
    if eval_src:
        eval_records = load_records(eval_src, limit=cfg.max_records, options=opts)
    else:  # hold out a seeded share of the training records
        order = list(range(len(records)))
        random.Random(cfg.seed + 1).shuffle(order)
        n_eval = max(1, int(len(records) * cfg.eval_fraction))
        if n_eval >= len(records):
            raise MoecraftError(f"{cfg.data}: too few records to hold out an eval split; give --eval-data")
        eval_records = [records[i] for i in order[:n_eval]]
        records = [records[i] for i in order[n_eval:]]

        def train_name(i: int) -> str:
            return f"{cfg.data}: record {order[n_eval + i] + 1}"

        def eval_name(i: int) -> str:
            return f"{cfg.data}: record {order[i] + 1}"
    mix_records = load_records(cfg.mix_data, limit=cfg.max_records, options=opts) if cfg.mix_data else []  # checked even if unused
    options = template_options(cfg.chat_template_kwargs)
    train = mix_sequences(records, mix_records, tokenizer, n_train, cfg.mix_ratio, cfg.seq_len, cfg.seed,
                          sources=(train_name, cfg.mix_data), template_kwargs=options)
    evals = sample_sequences(eval_records, tokenizer, cfg.eval_sequences, cfg.seq_len, cfg.seed, response_only=True,
                             source=eval_name, template_kwargs=options)
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


def _check(cfg: TrainConfig) -> None:
    if cfg.max_steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise MoecraftError("max_steps, batch_size and grad_accum must be at least 1")
    if not 0 <= cfg.mix_ratio < 1:
        raise MoecraftError(f"mix_ratio must be in [0, 1), got {cfg.mix_ratio}")
    if cfg.expert_parallel < 1:
        raise MoecraftError(f"expert_parallel must be at least 1, got {cfg.expert_parallel}")
    if cfg.expert_parallel > 1 and cfg.method != "esft":
        raise MoecraftError(f"--expert-parallel is for --method esft (got {cfg.method}); shard other methods with "
                            "FSDP2 or ZeRO-3 (docs/distributed.md)")
    check_trackers(cfg.report_to)


# settings that may change between a killed run and its --resume; any other change would alter the run
_RESUMABLE_CHANGES = {"out", "resume", "overwrite", "progress", "log_every", "eval_every", "save_every",
                      "deterministic", "save_on_interrupt", "report_to"}
# paths whose *contents* the checkpoint records (checkpoint.run_inputs): a moved file is the same input, an
# edited one is not
_CONTENT_CHECKED = {"data", "eval_data", "mix_data", "experts"}


def _run_settings(cfg: TrainConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in _RESUMABLE_CHANGES | _CONTENT_CHECKED}


def _check_same_run(saved: dict, cfg: TrainConfig, ckpt: Path) -> None:
    now = _run_settings(cfg)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise MoecraftError(f"{ckpt} belongs to a run with other settings ({', '.join(changed)}); resume with the "
                            "same settings, or train into a new --out")


def _micro_batch(train_seqs: list[Seq], cfg: TrainConfig, step: int, micro: int, rank: int, world: int) -> list[Seq]:
    """The sequences of one micro-batch: a pure function of (step, micro, rank), so a resumed run sees the
    same data, and ``world`` processes with ``grad_accum`` g see exactly what one process with g*world does."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    start = step * per_step + (micro * world + rank) * cfg.batch_size
    return [train_seqs[(start + i) % len(train_seqs)] for i in range(cfg.batch_size)]


def _oom_advice(cfg: TrainConfig, step: int) -> MoecraftError:
    tips = [f"lower --batch-size (now {cfg.batch_size}) and raise --grad-accum (now {cfg.grad_accum}) to keep "
            "the same tokens per step", f"lower --seq-len (now {cfg.seq_len})"]
    if not cfg.gradient_checkpointing:
        tips.append("add --gradient-checkpointing")
    if cfg.method == "fft":
        tips.append("use --method esft or lora, which keep no optimiser state for frozen weights")
    tips.append("or shard over several GPUs (docs/distributed.md)")
    return MoecraftError(f"out of memory at step {step + 1}. Try: " + "; ".join(tips) + ". "
                         + ("Resume from the last checkpoint with --resume." if cfg.save_every else ""))


def _not_finite(what: str, value: float, step: int, out: Path) -> MoecraftError:
    return MoecraftError(f"{what} is {value} at step {step + 1}; stopped before the update, {last_good(out)}. "
                         "Lower --lr, keep --max-grad-norm on, or check the data of this step.")


def train(cfg: TrainConfig, *, stop_after: int | None = None) -> dict:
    """Train ``cfg.model`` with ``cfg.method`` and write the artifact to ``cfg.out``; returns a summary.

    Runs on one process or on several (``accelerate launch`` with DDP, FSDP2 or DeepSpeed): each process
    trains on its own micro-batches of the same seeded sequence order. ``stop_after`` stops after that many
    optimiser steps without saving the artifact (a stand-in for a killed run).
    ``--out`` is claimed first (moecraft.files.run_folder): refused when not empty unless --resume or
    --overwrite, or when it holds an input; its lock is held by the main process for the whole run.
    """
    inputs = [cfg.model, cfg.data, cfg.eval_data, cfg.mix_data, cfg.experts]
    # SIGINT/SIGTERM stop at a step boundary while training
    with run_folder(cfg.out, inputs=inputs, overwrite=cfg.overwrite, resume=cfg.resume,
                    writer=int(os.environ.get("RANK", 0)) == 0) as folder, StopSignals() as stop:
        if not cfg.deterministic:
            return _train(cfg, stop_after, folder, stop)
        # multi-threaded CPU kernels (and CUDA atomics) may sum in any order; this pins them, for this run only
        before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return _train(cfg, stop_after, folder, stop)
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _train(cfg: TrainConfig, stop_after: int | None, folder: RunFolder, stop: StopSignals) -> dict:
    """One run, as a recipe: set up the engine, the data and the model, resume, train the steps, save."""
    _check(cfg)
    method = get_method(cfg.method)
    engine = _start_engine(cfg)
    data = _early_data(cfg, engine.world)  # bad records and chat template errors fail in seconds, before the model
    model, tokenizer, fingerprint = _load_base(cfg, method, engine)
    ckpt, inputs = _resume_inputs(cfg, model, fingerprint)
    model = _make_trainable(cfg, method, model, engine)
    blob, step = _restore_trainable(cfg, ckpt, inputs, model, engine)
    opt = _build_optimizer(cfg, method, model, engine)
    if blob is not None:
        restore_optimizer(ckpt, blob, engine.accelerator, opt.model, opt.optimizer, opt.scheduler)
    train_seqs, eval_seqs = data if data is not None else build_data(cfg, tokenizer, engine.world)
    metrics_path = _start_run_folder(cfg, folder, engine, step, resumed=blob is not None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tracking = Tracking(engine.accelerator, cfg.report_to, Path(cfg.out), step, resuming=cfg.resume,
                        resumed=blob["state"].get("tracking") if blob is not None else None)
    try:
        tracking.start(hyperparameters(cfg))
        loop = _Loop(cfg, method, engine, opt, train_seqs, eval_seqs, pad_id, metrics_path, inputs, step,
                     saved_step=step if blob is not None else None, tracking=tracking)
        if loop.run(stop, stop_after):
            return {"out": str(Path(cfg.out)), "steps": loop.step, "stopped": True}
        return _save_artifact(cfg, method, engine, opt, folder, fingerprint, loop)
    finally:
        tracking.finish()


# ----------------------------------------------------------------------------- set-up
@dataclass
class _Engine:
    """The accelerate side of a run: the ``Accelerator`` and the facts about it that the other parts ask."""

    accelerator: Any
    device: torch.device
    rank: int
    world: int
    main: bool
    deepspeed: bool
    expert_parallel: bool
    ep_config: Any  # transformers' expert-parallel DistributedConfig, or None


def _start_engine(cfg: TrainConfig) -> _Engine:
    """Make the ``Accelerator``, check the distributed engine against the run's settings and seed every RNG
    (before any data is sampled or weight initialised, so that a run is reproducible)."""
    accelerator = make_accelerator(**accelerator_options(cfg.report_to, Path(cfg.out)))
    check_engine(accelerator, cfg.batch_size, cfg.grad_accum, cfg.max_grad_norm)
    seed_everything(cfg.seed)
    # expert parallelism: transformers shards the experts (and FSDP2-shards the rest) while loading
    expert_parallel = cfg.expert_parallel > 1
    if expert_parallel and accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise MoecraftError("--expert-parallel runs on transformers' own FSDP2 + expert-parallel plan; launch it "
                            "with torchrun or a plain multi-process accelerate config, not FSDP or DeepSpeed")
    world = accelerator.num_processes
    return _Engine(accelerator, accelerator.device, accelerator.process_index, world, accelerator.is_main_process,
                   deepspeed=accelerator.distributed_type.name == "DEEPSPEED", expert_parallel=expert_parallel,
                   ep_config=expert_parallel_config(cfg.expert_parallel, world) if expert_parallel else None)


def _early_data(cfg: TrainConfig, world: int) -> tuple[list[Seq], list[Seq]] | None:
    """The run's sequences, built with the tokenizer alone where it loads without the model (else None): input
    errors then come before the minutes a large model takes to load."""
    data, early = None, early_tokenizer(cfg.model)
    with suppress(NoResponseTokensError):  # that one is reported after the model checks, as before
        data = build_data(cfg, early, world) if early is not None else None
    return data


def _load_base(cfg: TrainConfig, method, engine: _Engine) -> tuple[Any, Any, dict]:
    """(base model, tokenizer, fingerprint): the model as the method wants it loaded, checked against
    ``--seq-len``; the fingerprint (and size) of the base is what the artifact records."""
    if hasattr(method, "load_base"):  # e.g. PESC loads a 4-bit QLoRA base where CUDA + bitsandbytes allow
        model, tokenizer = method.load_base(cfg, engine.device)
    elif engine.expert_parallel:
        model, tokenizer = load_model(cfg.model, dtype=_resolve_dtype(cfg, engine.device),
                                      distributed_config=engine.ep_config)
    else:
        model, tokenizer = load_model(cfg.model, dtype=_resolve_dtype(cfg, engine.device))
    check_sequence_length(model, cfg.seq_len)
    fingerprint = base_fingerprint(model)
    fingerprint["base_bytes"] = model_bytes(model)
    return model, tokenizer, fingerprint


def _resume_inputs(cfg: TrainConfig, model, fingerprint: dict) -> tuple[Path | None, dict | None]:
    """(checkpoint to resume from, what the run trains on by content): the inputs are read from the base model
    before the method changes it, and only when a checkpoint is read or may be written (they are its record)."""
    ckpt = find_checkpoint(Path(cfg.out)) if cfg.resume else None
    saves = ckpt is not None or cfg.save_every > 0 or cfg.save_on_interrupt == "always"
    return ckpt, (run_inputs(cfg, model, fingerprint) if saves else None)


def _make_trainable(cfg: TrainConfig, method, model, engine: _Engine):
    """The method's model (it decides what is trainable), in training mode, with activation recomputation and
    ZeRO-3 leaf modules as the run asks."""
    model = method.prepare(model, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    mark_zero3_leaf_modules(model, engine.accelerator)
    return model


def _restore_trainable(cfg: TrainConfig, ckpt: Path | None, inputs: dict | None, model,
                       engine: _Engine) -> tuple[dict | None, int]:
    """(checkpoint state, step to start at): a checkpoint is checked to belong to this run (settings and
    inputs), then its trainable tensors are copied in, before the engine shards them."""
    blob, step = None, 0
    if ckpt is not None:
        blob = open_checkpoint(ckpt, engine.world)
        _check_same_run(blob["state"]["settings"], cfg, ckpt)
        check_inputs(blob["state"].get("inputs"), inputs, ckpt)
        load_trainable(ckpt, model)
        step = blob["state"]["step"]
        if engine.main:
            print(f"resuming from {ckpt} at step {step}")
    elif cfg.resume and engine.main:
        print(f"--resume: no checkpoint in {Path(cfg.out)}; starting from step 0")
    return blob, step


@dataclass
class _Optimisation:
    """What updates the weights: the engine-prepared model and optimiser, the lr schedule, the parameters to
    clip, and how the loss is scaled and autocast."""

    model: Any
    optimizer: Any
    scheduler: Any
    trained: list[torch.nn.Parameter]  # what the optimiser holds once the engine has (maybe) replaced them
    n_opt: int  # trainable parameters, over every process
    loss_scale: int
    autocast: Callable


def _build_optimizer(cfg: TrainConfig, method, model, engine: _Engine) -> _Optimisation:
    """AdamW (with fp32 master weights for bf16/fp16 trainables) on the method's parameter groups, the lr
    schedule of :func:`lr_factor`, and the model and optimiser handed to the engine."""
    accelerator = engine.accelerator
    groups = method.param_groups(model, cfg.weight_decay)
    n_opt = sum(p.numel() for g in groups for p in g["params"])
    if engine.expert_parallel:  # each process holds its own experts' share
        n_opt = int(accelerator.reduce(torch.tensor(n_opt, device=engine.device), reduction="sum"))
    if n_opt == 0:
        raise MoecraftError(f"method '{cfg.method}' left nothing to train")
    lr = cfg.lr if cfg.lr is not None else method.default_lr
    half = {p.dtype for g in groups for p in g["params"]} & set(LOW_PRECISION)
    if half and not cfg.master_weights and engine.main:  # an Adam step of ~lr is below bf16's resolution of most weights
        warnings.warn(f"trainable weights are {sorted(map(str, half))} and --master-weights is off: updates "
                      "smaller than ~0.4% of a weight are rounded away (ESFT's lr 1e-5 mostly is)", stacklevel=3)
    # fp32 master copies of bf16/fp16 trainable weights, in the optimiser state (moecraft/train/optim.py)
    adamw = AdamWMaster if half and cfg.master_weights else torch.optim.AdamW
    optimizer = adamw(groups, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    if engine.expert_parallel:  # already distributed by transformers; a DDP wrapper would average different experts
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    # each expert's gradient sums every process's tokens (all-to-all): divide by N as DDP's mean does
    loss_scale = cfg.grad_accum * (engine.world if engine.expert_parallel else 1)
    autocast = accelerator.autocast if engine.expert_parallel else nullcontext  # prepare() did it for the others
    # the engine may have replaced the parameters (FSDP2 shards them): clip what the optimiser now holds
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    return _Optimisation(model, optimizer, scheduler, trained, n_opt, loss_scale, autocast)


def _start_run_folder(cfg: TrainConfig, folder: RunFolder, engine: _Engine, step: int, resumed: bool) -> Path:
    """Create --out (only now: a bad input above leaves nothing behind; marked unfinished until the artifact is
    written) with the run's config and run info, and ``metrics.jsonl`` holding what a resumed run keeps."""
    out = Path(cfg.out)
    if engine.main:
        folder.start()
    metrics_path = out / "metrics.jsonl"
    if engine.main:
        kept = resume_metrics(metrics_path, step) if resumed else []
        write_text(metrics_path, "".join(ln + "\n" for ln in kept))
        write_text(out / "train_config.yaml", dump_yaml(cfg))
        write_run_info(out, cfg)
    return metrics_path


# ----------------------------------------------------------------------------- steps
class _Loop:
    """The optimiser steps from ``step`` to ``max_steps``: each one's metrics line, and between steps the
    evals, checkpoints, signals and ``stop_after`` that may end the run early."""

    def __init__(self, cfg: TrainConfig, method, engine: _Engine, opt: _Optimisation, train_seqs: list[Seq],
                 eval_seqs: list[Seq], pad_id: int, metrics_path: Path, inputs: dict | None, step: int,
                 saved_step: int | None, tracking: Tracking):
        self.cfg, self.method, self.engine, self.opt = cfg, method, engine, opt
        self.train_seqs, self.eval_seqs, self.pad_id = train_seqs, eval_seqs, pad_id
        self.metrics_path, self.inputs, self.out = metrics_path, inputs, Path(cfg.out)
        self.step, self.saved_step, self.tracking = step, saved_step, tracking
        self.last: dict = {}  # the latest metrics line
        self.tokens = 0  # tokens seen by every process since this run (not the resumed one) started

    def record(self, line: dict) -> None:
        """One metrics line (main process): appended to metrics.jsonl and given to the trackers."""
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        self.tracking.log(line)

    def checkpoint(self) -> Path:
        """Save a checkpoint of the current step (collective), once the weights are checked finite."""
        check_finite_weights(self.opt.model, self.engine.accelerator, self.step, self.out, "the checkpoint")
        return save_checkpoint(self.out, self.engine.accelerator, self.opt.model, self.opt.optimizer,
                               self.opt.scheduler, {"step": self.step, "settings": _run_settings(self.cfg),
                                                    "inputs": self.inputs, "tracking": self.tracking.state()})

    def run(self, stop: StopSignals, stop_after: int | None) -> bool:
        """Train up to ``max_steps``; True when ``stop_after`` ended the run first (a stand-in for a kill).
        A signal raises :class:`TrainingInterrupted` after the step it came in."""
        cfg, engine = self.cfg, self.engine
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"train {cfg.method}",
                   disable=not (cfg.progress and engine.main), dynamic_ncols=True)
        t0 = time.perf_counter()
        while self.step < cfg.max_steps:
            stop.step = self.step
            loss_value, grad_norm, cur_lr, extra_logs = self.optimizer_step()
            self.step += 1
            step = self.step
            elapsed = time.perf_counter() - t0
            last = {"step": step, "loss": loss_value, "lr": cur_lr, "grad_norm": grad_norm,
                    "tokens_per_s": self.tokens / elapsed if elapsed else None, **extra_logs}
            self.last = last
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                last["eval_loss"] = eval_loss(self.opt.model, self.eval_seqs, self.pad_id, engine.device)
            if engine.main and (step % cfg.log_every == 0 or "eval_loss" in last):
                self.record(last)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{cur_lr:.2e}", tok_s=f"{last['tokens_per_s'] or 0:.0f}")
            bar.update(1)
            if "eval_loss" in last:
                check_finite_eval(last["eval_loss"], step, self.out, "a checkpoint or the artifact")
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                self.checkpoint()
                self.saved_step = step
            if (signum := stop_requested(stop, engine.accelerator)) is not None:
                bar.close()
                raise interrupted(signum, step, self.saved_step, cfg, self.checkpoint)
            if stop_after is not None and step >= stop_after and step < cfg.max_steps:
                bar.close()
                return True
        bar.close()
        return False

    def optimizer_step(self) -> tuple[float, float | None, float, dict]:
        """One optimiser step at ``self.step``: ``grad_accum`` micro-batches (gradients all-reduced on the last),
        clipping, the update; (loss, gradient norm or None, lr used, the method's extra logs). A non-finite loss
        or gradient norm stops before the update; running out of memory says what to change."""
        cfg, engine, opt, step = self.cfg, self.engine, self.opt, self.step
        accelerator, model, world = engine.accelerator, opt.model, engine.world
        opt.optimizer.zero_grad(set_to_none=True)
        loss_sum, extra_logs = torch.zeros((), device=engine.device), {}
        try:
            for micro in range(cfg.grad_accum):
                batch = collate(_micro_batch(self.train_seqs, cfg, step, micro, engine.rank, world), self.pad_id,
                                engine.device)
                self.tokens += int(batch["attention_mask"].sum()) * world
                # gradients are all-reduced once per optimiser step, on the last micro-batch
                boundary = micro == cfg.grad_accum - 1
                accelerator.sync_gradients = boundary  # DeepSpeed steps its engine in backward only when True
                sync = nullcontext() if boundary else accelerator.no_sync(model)
                with sync:
                    with opt.autocast():
                        output = model(**batch)
                    loss = output.loss
                    if not bool((batch["labels"][:, 1:] != -100).any()):
                        # no target token (e.g. only prompts): the loss would be 0/0 = nan; count it as 0
                        # but keep the graph so every process still joins the gradient all-reduce
                        loss = output.logits.sum() * 0.0
                    extra = self.method.extra_loss(accelerator.unwrap_model(model))
                    if extra.loss is not None:
                        loss = loss + extra.loss
                    extra_logs = extra.logs
                    # DeepSpeed divides by its own gradient_accumulation_steps (= grad_accum, see check_engine)
                    accelerator.backward(loss if engine.deepspeed else loss / opt.loss_scale)
                loss_sum += loss.detach() / cfg.grad_accum
        except torch.OutOfMemoryError as exc:
            raise _oom_advice(cfg, step) from exc
        loss_value = float(accelerator.reduce(loss_sum, reduction="mean"))
        if not math.isfinite(loss_value):
            raise _not_finite("the training loss", loss_value, step, self.out)
        # the norm is wanted even without clipping: a non-finite gradient must never reach the weights
        clip = clip_grad_norm_ep if engine.expert_parallel else accelerator.clip_grad_norm_
        norm = clip(opt.trained, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        grad_norm = None if norm is None else float(norm)  # None: DeepSpeed clips inside its engine
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise _not_finite("the gradient norm", grad_norm, step, self.out)
        cur_lr = opt.scheduler.get_last_lr()[0]
        opt.optimizer.step()
        opt.scheduler.step()
        return loss_value, grad_norm, cur_lr, extra_logs


# ----------------------------------------------------------------------------- save
def _save_artifact(cfg: TrainConfig, method, engine: _Engine, opt: _Optimisation, folder: RunFolder,
                   fingerprint: dict, loop: _Loop) -> dict:
    """Check the trained weights, run the final eval, then write the artifact (the method decides which tensors)
    and its manifest, and mark --out finished; the run's summary."""
    accelerator, out, step, main = engine.accelerator, Path(cfg.out), loop.step, engine.main
    check_finite_weights(opt.model, accelerator, step, out, "the artifact")
    final_eval = eval_loss(opt.model, loop.eval_seqs, loop.pad_id, engine.device)
    check_finite_eval(final_eval, step, out, "the artifact")
    unwrapped = accelerator.unwrap_model(opt.model)
    manifest = None
    with gathered(unwrapped, deepspeed=engine.deepspeed):
        if main:
            final = {"step": step, "eval_loss": final_eval, "final": True}
            loop.record(final)
            loop.tracking.finish()  # before the folder is marked finished: the trackers write as they close
            (out / "artifact.json").unlink(missing_ok=True)  # a resumed finished run: stale until rewritten
            method.save(unwrapped, out, cfg)
            manifest = write_manifest(out, method=cfg.method, base=cfg.model, fingerprint=fingerprint,
                                      extra={"optimizer_parameters": opt.n_opt, "steps": step,
                                             "processes": engine.world,
                                             "engine": "EXPERT_PARALLEL" if engine.expert_parallel
                                             else accelerator.distributed_type.name})
            folder.finish()  # modes as the umask says; the folder is accepted as an artifact from now on
    accelerator.wait_for_everyone()
    summary = {"out": str(out), "steps": step, "train_loss": loop.last.get("loss"), "eval_loss": final_eval,
               "optimizer_parameters": opt.n_opt, "model": unwrapped, "main_process": main,
               "artifact_bytes": manifest["artifact_bytes"] if manifest else None,
               "base_bytes": manifest["base_bytes"] if manifest else None}
    return summary
