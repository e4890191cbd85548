"""Fine-tune an MoE model with ESFT (only the selected experts), FFT or LoRA, or a crafted PESC model.

Example: moecraft train --method esft --model M --experts experts.json --data D --out run/
Writes to --out: the artifact (only the trained tensors), artifact.json (base fingerprint, sizes),
expert_config.json (ESFT), train_config.yaml, run_info.json and metrics.jsonl; --resume continues a
killed run from its last checkpoint (--save-every).
"""

from __future__ import annotations

from moecraft.train.config import TrainConfig

CONFIG = TrainConfig


def run(cfg: TrainConfig) -> int:
    from moecraft.train.loop import train

    summary = train(cfg)
    if not summary["main_process"]:  # under accelerate launch, one process reports
        return 0
    art, base = summary["artifact_bytes"], summary["base_bytes"]
    print(f"trained {summary['steps']} steps ({cfg.method}): train loss {summary['train_loss']:.4f}, "
          f"eval loss {summary['eval_loss']:.4f}; optimiser held {summary['optimizer_parameters']:,} parameters")
    print(f"artifact {art / 2**20:.2f} MiB vs base model {base / 2**20:.2f} MiB ({100 * art / base:.2f}%) "
          f"-> {summary['out']}")
    return 0
