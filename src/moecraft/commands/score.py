"""Score every routed expert's affinity to a task (ESFT router statistics, eq. 2, 5, 6).

Samples the task data as the ESFT paper does (seeded shuffle, concatenated into n_sequences x seq_len
tokens), runs it through the model with no gradient, and writes per-layer gate sums and top-k counts.
Example: moecraft score --model deepseek-ai/DeepSeek-V2-Lite --data train.jsonl --out scores.json
"""

import os

from moecraft.esft.config import ScoreConfig

CONFIG = ScoreConfig


def run(cfg: ScoreConfig) -> int:
    from moecraft.esft.stats import score_experts

    scores = score_experts(cfg)
    if cfg.expert_parallel > 1 and int(os.environ.get("RANK", 0)) != 0:  # one process reports
        return 0
    print(
        f"scored {scores.n_tokens} tokens over {len(scores.layers)} MoE layers x {scores.num_experts} experts "
        f"({scores.family}); wrote {cfg.out}"
    )
    return 0
