"""Shared pieces of the replication: the three scales (full GPU run, ~1.5 h CPU run, CPU smoke), the output
layout, small I/O.

Every size of the experiment lives in :class:`Scale`, so the scales differ only in numbers, never in code path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moecraft.files import sha256_file  # noqa: F401  (one file hash for the project; re-exported)

REPO = Path(__file__).resolve().parents[2]
ESFT_DATA = Path(os.environ.get("REPLICATE_ESFT_DATA", REPO.parent / "shared" / "data" / "esft"))
TASKS = ("intent", "arithmetic")  # fine-tuning tasks (ESFT Table 1 columns, PESC instruction mix)
PROBE_TASKS = ("intent", "law", "arithmetic")  # expert-overlap probe (ESFT Fig. 2), with every corpus domain
DOMAINS = ("code", "prose")  # pretraining domains; held-out perplexity per domain = general ability


@dataclass(frozen=True)
class Scale:
    """All sizes of one run. ``full``: ~10 min per pretraining on one H100; ``cpu``: ~1.5 h in all on 2 cores;
    ``smoke``: seconds on CPU."""

    name: str
    # corpus
    max_docs_per_source: int | None
    max_bytes_per_source: int | None
    heldout_percent: int
    record_chars: int  # corpus documents are cut into records of at most this many characters
    # tokenizer
    vocab_size: int
    tokenizer_task_records: int | None  # task records per task file added to the tokenizer's training text
    # pretraining (see pretrain.py)
    moe: dict[str, Any]
    dense: dict[str, Any]
    pretrain_seq_len: int
    pretrain_batch: int
    pretrain_steps: int
    pretrain_lr: float
    pretrain_warmup: int
    aux_loss_coef: float
    pretrain_eval_windows: int
    # fine-tuning and evaluation (see experiments.py)
    seq_len: int
    batch_size: int
    steps: int
    lr_grid: tuple[float, ...]
    mix_ratio: float  # ESFT paper: task data mixed 1:1 with alignment data (here: pretraining text)
    save_every: int
    max_task_records: int | None
    score_sequences: int
    eval_limit: int | None
    eval_batch: int
    max_new_tokens_cap: int
    ppl_limit: int
    pesc_num_experts: int = 8
    pesc_top_k: int = 2
    pesc_adapter_dim: int = 64
    eval_sequences: int = 8  # packed validation sequences behind each run's final validation loss
    seeds: tuple[int, ...] = (0,)
    # MoE rows (experiments.MOE_METHODS keys; "router" also brings the two-stage row) and the learning-rate
    # grid of the expert-selective variants (esft-lora, esft-router, router; None: lr_grid)
    moe_methods: tuple[str, ...] = ("fft", "lora", "esft-gate", "esft-token", "esft-lora", "esft-router", "router")
    variant_lr_grid: tuple[float, ...] | None = None
    pesc_seeds: tuple[int, ...] | None = None  # seeds of the PESC comparison (None: seeds)
    torch_threads: int | None = None  # intra-op threads of every process (None: torch's default)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


FULL = Scale(
    name="full",
    max_docs_per_source=None, max_bytes_per_source=None, heldout_percent=3, record_chars=6000,
    vocab_size=16384, tokenizer_task_records=None,
    # DeepSeek-V2-Lite's shape in miniature: fine-grained experts (64 routed, top-6, 2 shared), the first
    # layer dense with the width of the active experts (8 x 128 = 1024), MLA attention.
    moe=dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
             intermediate_size=1024, moe_intermediate_size=128, n_routed_experts=64, num_experts_per_tok=6,
             n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=128, q_lora_rank=None,
             qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64, routed_scaling_factor=1.0,
             topk_method="greedy", norm_topk_prob=False, max_position_embeddings=2048),
    # Dense Llama with the MoE's active FFN width (1024) and the same depth and width: similar active parameters.
    dense=dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
               intermediate_size=1024, max_position_embeddings=2048),
    pretrain_seq_len=1024, pretrain_batch=32, pretrain_steps=1200, pretrain_lr=1.5e-3, pretrain_warmup=60,
    aux_loss_coef=0.01, pretrain_eval_windows=64,
    seq_len=1024, batch_size=16, steps=300, lr_grid=(1e-4, 3e-4, 1e-3, 3e-3), mix_ratio=0.5, save_every=100,
    max_task_records=None, score_sequences=32, eval_limit=None, eval_batch=64, max_new_tokens_cap=128,
    ppl_limit=200, pesc_adapter_dim=64,
)

SMOKE = Scale(
    name="smoke",
    max_docs_per_source=24, max_bytes_per_source=120_000, heldout_percent=25, record_chars=2000,
    vocab_size=600, tokenizer_task_records=300,
    moe=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=192, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4,
             n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=1.0,
             topk_method="greedy", norm_topk_prob=False, max_position_embeddings=512),
    dense=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
               intermediate_size=192, max_position_embeddings=512),
    pretrain_seq_len=128, pretrain_batch=4, pretrain_steps=6, pretrain_lr=3e-3, pretrain_warmup=2,
    aux_loss_coef=0.01, pretrain_eval_windows=4,
    seq_len=256, batch_size=2, steps=2, lr_grid=(1e-3,), mix_ratio=0.5, save_every=1,
    max_task_records=120, score_sequences=2, eval_limit=3, eval_batch=3, max_new_tokens_cap=6,
    ppl_limit=3, pesc_adapter_dim=8, eval_sequences=1, seeds=(0, 1),
    torch_threads=1,  # tiny models: thread start-up costs more than it saves
)

# Sized with timing probes on a shared 2-core CPU (AMD EPYC, torch 2.13, one thread per process, nice 10):
# pretraining ~2,500 tokens/s for either model, fine-tuning ~2,300 (MoE) / ~2,800 (dense PESC) tokens/s, a 500-row
# intent evaluation ~15 s. The first CPU run (one seed, four MoE methods, grid {1e-3, 3e-3, 1e-2}): ~19 min
# pretraining (both models), ~33 min experiments (29 fine-tuning runs of 60 steps, ~40 evaluations).
# Learning-rate grid: a run with {3e-4, 1e-3} chose 1e-3, its upper edge, for every method; the run with
# {1e-3, 3e-3, 1e-2} chose 3e-3 (FFT) or 1e-2 (all others), 1e-3 never, so the grid is now {3e-3, 1e-2}: with
# seven MoE methods and two seeds (~55 fine-tuning runs) the whole run stays near 1.5 h (92 min on 2026-11-30,
# load average 2-7, experiments in parallel --parts). Same structure as FULL in miniature: DeepSeek-V2-shaped MoE
# (32 routed experts of width 64, top-4, 2 shared, first layer dense with the active width 6 x 64 = 384, MLA
# attention) and a dense Llama of the same width, depth and FFN width as the MoE's active experts.
CPU = Scale(
    name="cpu",
    max_docs_per_source=None, max_bytes_per_source=3_000_000, heldout_percent=5, record_chars=3000,
    vocab_size=8192, tokenizer_task_records=None,
    moe=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=384, moe_intermediate_size=64, n_routed_experts=32, num_experts_per_tok=4,
             n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=None,
             qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64, routed_scaling_factor=1.0,
             topk_method="greedy", norm_topk_prob=False, max_position_embeddings=1024),
    dense=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
               intermediate_size=384, max_position_embeddings=1024),
    pretrain_seq_len=256, pretrain_batch=16, pretrain_steps=320, pretrain_lr=2e-3, pretrain_warmup=30,
    aux_loss_coef=0.01, pretrain_eval_windows=32,
    seq_len=256, batch_size=8, steps=60, lr_grid=(3e-3, 1e-2), mix_ratio=0.5, save_every=30,
    max_task_records=None, score_sequences=32, eval_limit=None, eval_batch=50, max_new_tokens_cap=64,
    ppl_limit=40, pesc_adapter_dim=16,
    eval_sequences=32,  # task scores of models this small sit near 0: the validation loss carries the comparison
    # with other jobs on the two cores, a second thread waits on a busy core: one thread was 3-5x faster
    torch_threads=1,
    seeds=(0, 1),  # the learning-rate grid runs on seed 0; seed 1 repeats every run at the chosen rate
)

SCALES = {s.name: s for s in (FULL, CPU, SMOKE)}


@dataclass(frozen=True)
class Layout:
    """Where each stage writes, under one output folder (commands run with it as working directory)."""

    root: Path

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    def model(self, kind: str) -> Path:
        return self.root / "models" / kind

    def pretrain(self, kind: str) -> Path:
        return self.root / "pretrain" / kind

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def exp(self) -> Path:
        return self.root / "exp"

    @property
    def commands(self) -> Path:
        return self.root / "commands.jsonl"

    def rel(self, path: Path) -> str:
        """``path`` relative to the output folder: how commands name it."""
        return os.path.relpath(path, self.root)

    def check_scale(self, scale: Scale) -> None:
        """Refuse to mix two scales in one folder: every stage skips work already done there."""
        path = self.root / "scale.json"
        if path.is_file():
            old = read_json(path)
            if old != json.loads(json.dumps(scale.to_json())):
                raise SystemExit(f"{self.root} holds a run of scale '{old.get('name')}' with other settings; "
                                 f"use another --out for scale '{scale.name}'")
        else:
            write_json(path, scale.to_json())


def domains(layout: Layout) -> list[str]:
    """The pretraining domains the corpus stage found sources for (a subset of DOMAINS)."""
    return list(read_json(layout.corpus / "manifest.json")["domains"])


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_json(path: Path, obj: Any) -> Path:
    """Atomic write, so an interrupted stage never leaves a half file that looks done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": platform.processor(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda or "none"}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), info["cpu"])
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    import transformers

    info["transformers"] = transformers.__version__
    return info
