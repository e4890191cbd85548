"""Select each layer's task-relevant experts from router statistics (ESFT eq. 8).

Keeps per layer the highest-scoring experts until their cumulative score reaches p; writes the expert
config that `moecraft train --method esft` reads.
Example: moecraft select --scores scores.json --score token --p 0.2 --out experts.json
"""

from moecraft.esft.selection import SelectConfig, select_experts, summary_table

CONFIG = SelectConfig


def run(cfg: SelectConfig) -> int:
    result = select_experts(cfg)
    print(summary_table(result))
    print(f"wrote {cfg.out}")
    return 0
