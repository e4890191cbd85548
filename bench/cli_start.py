"""Start time of the ``moecraft`` CLI: ``moecraft --help`` and ``moecraft train --help``, wall clock.

Each source tree is put first on PYTHONPATH in turn and the trees alternate within each round, so that
two trees are compared under the same machine load. Reports the median of ``--rounds`` runs.

    python bench/cli_start.py --tree before=/tmp/old/src --tree after=src --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (["--help"], ["train", "--help"], ["--version"])


def run_once(src: Path, argv: list[str]) -> float:
    """One run of the installed ``moecraft`` script (``python -m moecraft`` without one) on ``src``'s code."""
    script = Path(sys.executable).parent / "moecraft"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "moecraft"]
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    subprocess.run([*cmd, *argv], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, help="label=path of a tree's src folder")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    trees = [(label, Path(path).resolve()) for label, _, path in (t.partition("=") for t in args.tree)]
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for argv in COMMANDS:
            for label, src in trees:
                times.setdefault((" ".join(argv), label), []).append(run_once(src, argv))
    labels = [label for label, _ in trees]
    print("| command | " + " | ".join(f"{label}, s" for label in labels) + " |")
    print("|---|" + "---|" * len(labels))
    for argv in COMMANDS:
        cmd = " ".join(argv)
        print(f"| `moecraft {cmd}` | " + " | ".join(f"{statistics.median(times[cmd, label]):.2f}"
                                                   for label in labels) + " |")


if __name__ == "__main__":
    main()
