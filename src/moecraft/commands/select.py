"""Select each layer's task-relevant experts from router statistics (ESFT eq. 8, or a top share).

Keeps per layer the highest-scoring experts until their cumulative score reaches p (or, with --top-share S,
the ceil(S x experts) best ones); writes the expert config that `moecraft train --method esft` reads.
Several scores files (tasks) are selected one by one and combined per layer (--combine union|intersection).
Example: moecraft select --scores scores.json --score token --p 0.2 --out experts.json
         moecraft select --scores law.json math.json --top-share 0.25 --combine intersection --out experts.json
"""

from moecraft.esft.config import SelectConfig

CONFIG = SelectConfig


def run(cfg: SelectConfig) -> int:
    from moecraft.esft.selection import overlap_table, select_experts, summary_table

    result = select_experts(cfg)
    print(summary_table(result))
    if result.selections:
        print(overlap_table(result))
    if cfg.out:
        print(f"wrote {cfg.out}")
    return 0
