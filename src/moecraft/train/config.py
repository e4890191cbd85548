"""``TrainConfig``: one dataclass for ``moecraft train`` (CLI, YAML and Python), all methods included."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moecraft.config import SEED, ConfigError, checked, dtype_name, non_empty
from moecraft.data.records import DataFormatName, data_option


def _h(text: str) -> dict:
    return {"help": text}


def _report_to_alone(cfg: TrainConfig) -> None:
    if "none" in cfg.report_to and len(cfg.report_to) > 1:
        raise ConfigError(f"option 'report_to': 'none' cannot be combined with other trackers, got {cfg.report_to}",
                          "report_to")
    repeated = sorted({n for n in cfg.report_to if cfg.report_to.count(n) > 1})
    if repeated:
        raise ConfigError(f"option 'report_to' names {repeated[0]!r} more than once", "report_to")


def _pesc_top_k_fits(cfg: TrainConfig) -> None:
    from moecraft.pesc.config import CraftConfig

    k = cfg.pesc_top_k if cfg.pesc_top_k is not None else CraftConfig.top_k
    n = cfg.pesc_num_experts if cfg.pesc_num_experts is not None else CraftConfig.num_experts
    if k > n:
        raise ConfigError(f"option 'pesc_top_k' ({k}) must be <= pesc_num_experts ({n})", "pesc_top_k")


@dataclass
@checked(
    _pesc_top_k_fits, _report_to_alone, non_empty("pesc_layers", "report_to"),
    lora_r=">= 1", lora_alpha=">= 1", lora_dropout="[0, 1)",
    pesc_num_experts=">= 1", pesc_top_k=">= 1", pesc_adapter_dim=">= 1", pesc_scaling="> 0", pesc_dropout="[0, 1)",
    pesc_layers=">= 0", pesc_aux_loss_coef=">= 0", pesc_lora_rank=">= 0", pesc_lora_alpha="> 0", pesc_lora_dropout="[0, 1)",
    eval_fraction="(0, 1)", eval_sequences=">= 1", mix_ratio="[0, 1)", max_records=">= 0", seq_len=">= 2",
    max_steps=">= 1", batch_size=">= 1", grad_accum=">= 1", lr="> 0", weight_decay=">= 0", adam_beta1="[0, 1)",
    adam_beta2="[0, 1)", warmup_steps=">= 0", min_lr_ratio="[0, 1]", max_grad_norm=">= 0", expert_parallel=">= 1",
    dtype=dtype_name, seed=SEED, eval_every=">= 0", save_every=">= 0", log_every=">= 1",
)
class TrainConfig:
    model: str = field(metadata=_h("base model: hub id, local folder or tiny:<family>"))
    data: str = field(metadata=_h("training data: JSONL, datasets folder, hub id or builtin:<task>"))
    out: str = field(metadata=_h("output folder (artifact, configs, metrics, checkpoints)"))
    method: Literal["esft", "fft", "lora", "pesc", "router"] = field(default="esft", metadata=_h(
        "training method (router: the MoE routers only, Router Lens / CEFT arXiv 2508.19594)"))
    # --- ESFT
    experts: str | None = field(default=None, metadata=_h("ESFT: expert config JSON from `moecraft select`"))
    train_shared_experts: bool | None = field(
        default=None, metadata=_h("ESFT: also train shared experts (paper §6.3); default: the expert config's"))
    train_non_expert_modules: bool | None = field(
        default=None, metadata=_h("ESFT: also train non-expert modules (paper §6.3); default: the expert config's"))
    # --- LoRA
    lora_r: int = field(default=8, metadata=_h("LoRA rank"))
    lora_alpha: int = field(default=16, metadata=_h("LoRA alpha"))
    lora_dropout: float = field(default=0.0, metadata=_h("LoRA dropout"))
    lora_experts: bool = field(default=False, metadata=_h("LoRA: also adapt the fused routed-expert tensors"))
    train_router: bool = field(default=False, metadata=_h(
        "ESFT: also train the routers of the layers with selected experts (CEFT, arXiv 2508.19594)"))
    expert_adapter: Literal["none", "lora"] = field(default="none", metadata=_h(
        "ESFT: 'lora' trains rank --lora-r LoRA factors on the selected experts only, instead of their full "
        "weights (MoE-Sieve, arXiv 2603.24044); frozen experts get no adapter"))
    # --- PESC (read by moecraft.methods.pesc; None = the CraftConfig default, i.e. the paper's)
    pesc_expert: Literal["adapter", "lora"] | None = field(
        default=None, metadata=_h("PESC: expert kind, adapter (default) or lora (MixLoRA, exports as Mixtral)"))
    pesc_num_experts: int | None = field(default=None, metadata=_h("PESC: experts per crafted layer (default 8: paper, official script)"))
    pesc_top_k: int | None = field(default=None, metadata=_h("PESC: experts per token (default 2: paper, official script)"))
    pesc_adapter_dim: int | None = field(default=None, metadata=_h("PESC: adapter dim / expert LoRA rank (default 512: paper)"))
    pesc_scaling: float | None = field(default=None, metadata=_h("PESC: expert output scaling s (default 0.25: paper)"))
    pesc_dropout: float | None = field(default=None, metadata=_h("PESC: dropout on the expert input (default 0)"))
    pesc_layers: list[int] | None = field(default=None, metadata=_h("PESC: decoder layers to craft (default all)"))
    pesc_aux_loss_coef: float | None = field(
        default=None, metadata=_h("PESC: load-balancing loss coefficient (default 0.01: paper)"))
    pesc_lora_rank: int | None = field(
        default=None, metadata=_h("PESC: LoRA rank on the base's linear layers (default 64, official PESC script; 0 = off)"))
    pesc_lora_alpha: float | None = field(default=None, metadata=_h("PESC: base LoRA alpha (default 16, official script)"))
    pesc_lora_dropout: float | None = field(
        default=None, metadata=_h("PESC: base LoRA dropout (default 0.1, official script)"))
    pesc_lora_targets: list[str] | None = field(
        default=None, metadata=_h("PESC: base modules given LoRA (default q,k,v,o,gate,up,down _proj, official script; "
                                  "no FFN ones for --pesc-expert lora)"))
    pesc_quantize: Literal["auto", "none", "nf4"] | None = field(
        default=None, metadata=_h("PESC: nf4 = QLoRA 4-bit NF4 base (official script; CUDA + bitsandbytes); "
                                  "auto (default) = nf4 if available"))
    # --- data
    eval_data: str | None = field(
        default=None, metadata=_h("held-out data; default: builtin:<task>:eval, else eval_fraction of --data"))
    eval_fraction: float = field(default=0.05, metadata=_h("share of --data held out when no eval data is given"))
    eval_sequences: int = field(default=8, metadata=_h("packed sequences in the eval set"))
    mix_data: str | None = field(default=None, metadata=_h("second (alignment) data set mixed into training"))
    mix_ratio: float = field(default=0.5, metadata=_h("share of training sequences from --mix-data (paper 1:1 = 0.5)"))
    max_records: int | None = field(default=None, metadata=_h("use at most this many records per data set"))
    # --- data format (moecraft.data.records.DataOptions; the same on score, train, eval, demo, data)
    data_format: DataFormatName = data_option("data_format")
    field_messages: str | None = data_option("field_messages")
    message_property_mappings: dict | None = data_option("message_property_mappings")
    data_columns: dict | None = data_option("data_columns")
    roles: dict | None = data_option("roles")
    roles_to_train: list[str] | None = data_option("roles_to_train")
    seq_len: int = field(default=4096, metadata=_h("packed sequence length (paper 4096)"))
    chat_template_kwargs: str | None = field(default=None, metadata=_h(
        'JSON object of chat template options for every data set, e.g. \'{"enable_thinking": false}\''))
    # --- optimisation
    max_steps: int = field(default=500, metadata=_h("optimiser steps"))
    batch_size: int = field(default=1, metadata=_h("sequences per micro-batch"))
    grad_accum: int = field(default=1, metadata=_h("micro-batches per optimiser step"))
    lr: float | None = field(default=None, metadata=_h("learning rate; default: the method's paper value"))
    weight_decay: float = field(default=0.0, metadata=_h("AdamW weight decay (matrices only)"))
    adam_beta1: float = field(default=0.9, metadata=_h("AdamW beta1"))
    adam_beta2: float = field(default=0.999, metadata=_h("AdamW beta2"))
    warmup_steps: int = field(default=0, metadata=_h("linear warmup steps"))
    schedule: Literal["cosine", "linear", "constant"] = field(default="cosine", metadata=_h("lr schedule after warmup"))
    min_lr_ratio: float = field(default=0.0, metadata=_h("final lr as a share of the peak (cosine/linear)"))
    max_grad_norm: float = field(default=1.0, metadata=_h("gradient clipping (0 = off)"))
    gradient_checkpointing: bool = field(default=False, metadata=_h("recompute activations in backward"))
    expert_parallel: int = field(
        default=1, metadata=_h("ESFT: split each MoE layer's experts over N processes (transformers' expert-parallel "
                               "plan; N = number of processes, launched with torchrun/accelerate launch)"))
    master_weights: bool = field(
        default=True, metadata=_h("keep fp32 master copies of bf16/fp16 trainable weights in the optimiser (+4 bytes "
                                  "per trainable parameter); off: small updates round away in bf16"))
    dtype: str = field(default="auto", metadata=_h("model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"))
    seed: int = field(default=0, metadata=_h("seed of data order, init and dropout"))
    deterministic: bool = field(
        default=False, metadata=_h("bit-reproducible runs (torch deterministic algorithms; slower on GPU)"))
    # --- bookkeeping
    eval_every: int = field(default=0, metadata=_h("eval loss every N steps (0 = only at the end)"))
    save_every: int = field(default=0, metadata=_h("checkpoint every N steps (0 = no checkpoints)"))
    log_every: int = field(default=1, metadata=_h("write metrics every N steps"))
    resume: bool = field(default=False, metadata=_h("continue from the checkpoint in --out"))
    save_on_interrupt: Literal["auto", "always", "never"] = field(
        default="auto", metadata=_h("on SIGINT/SIGTERM, after the current step: save a checkpoint (always), only when "
                                    "half a --save-every interval would be lost (auto), or not (never)"))
    overwrite: bool = field(default=False, metadata=_h("train into a non-empty --out, discarding the run in it "
                                                       "(once this run's inputs have passed their checks)"))
    progress: bool = field(default=True, metadata=_h("show a progress bar"))
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "none"]] = field(
        default_factory=lambda: ["none"], metadata=_h(
            "experiment trackers fed the metrics.jsonl lines and the config, e.g. tensorboard or tensorboard,mlflow; "
            "they write under <out>/tracking (wandb offline unless WANDB_MODE is set, MLflow to a file store unless "
            "MLFLOW_TRACKING_URI is set)"))
