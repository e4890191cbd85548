"""One entry point for the miniature ESFT + PESC replication.

    python bench/replicate/run.py --stage all [--scale full|cpu|smoke] [--out DIR] [--time-budget SECONDS]

Stages run in order (corpus, tokenizer, pretrain, experiments, report) and skip whatever is already done in
``--out``, so the same command repeated finishes the experiment in parts. Exit status 0: every requested
stage is done; 3: ``--time-budget`` was spent first (run the same command again); anything else: an error.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# import as the package ``replicate`` (bench/ on the path), not as loose modules from this folder
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from replicate import corpus, experiments, pretrain, report, tokenizer  # noqa: E402
from replicate.common import SCALES, Layout, Scale  # noqa: E402
from replicate.runner import Budget, OutOfTime, Runner  # noqa: E402

STAGES = ("corpus", "tokenizer", "pretrain", "experiments", "report")
MORE_TO_DO = 3


def done_markers(layout: Layout) -> dict[str, list[Path]]:
    """The files whose presence means a stage is complete."""
    return {"corpus": [layout.corpus / "manifest.json"], "tokenizer": [layout.tokenizer / "tokenizer_info.json"],
            "pretrain": [layout.model(k) / "info.json" for k in ("moe", "dense")],
            "experiments": [layout.exp / "results.json"], "report": [layout.root / "RESULTS.md"]}


def run_stage(stage: str, layout: Layout, scale: Scale, budget: Budget, mode: str, command: str,
              publish: bool = False, parts: tuple[str, ...] = experiments.PARTS) -> None:
    t0 = time.monotonic()
    print(f"== stage {stage} ({scale.name}) -> {layout.root}", flush=True)
    markers = done_markers(layout)
    missing = [s for s in STAGES[: STAGES.index(stage)] if not all(p.is_file() for p in markers[s])]
    if missing:
        raise SystemExit(f"stage {stage} needs stage(s) {', '.join(missing)} first (or --stage all)")
    if stage == "corpus":
        if not (layout.corpus / "manifest.json").is_file():
            corpus.build(layout.corpus, scale)
    elif stage == "tokenizer":
        if not (layout.tokenizer / "tokenizer_info.json").is_file():
            max_len = max(scale.moe["max_position_embeddings"], scale.dense["max_position_embeddings"])
            tokenizer.train(layout.corpus, layout.tokenizer, scale, max_len)
    elif stage == "pretrain":
        for kind in ("moe", "dense"):
            status = pretrain.pretrain(kind, layout, scale, budget.remaining(), seed=scale.seeds[0], command=command)
            if not status["done"]:
                raise OutOfTime(f"pretrain {kind}")
    elif stage == "experiments":
        experiments.run(layout, scale, Runner(layout.root, mode, budget, threads=scale.torch_threads), parts)
        if set(parts) != set(experiments.PARTS):
            return  # some commands only: the stage is done when a call with every part has gathered the numbers
    else:
        for path in report.write(layout, publish=publish):
            print(f"  wrote {path}", flush=True)
    with (layout.root / "stages.jsonl").open("a") as f:
        f.write(json.dumps({"stage": stage, "command": command, "wall_s": round(time.monotonic() - t0, 2),
                            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--stage", choices=("all", *STAGES), default="all")
    parser.add_argument("--scale", choices=tuple(SCALES), default=None,
                        help="sizes from common.py: full (one GPU), cpu (~1.5 h on 2 cores), smoke (seconds)")
    parser.add_argument("--smoke", action="store_true", help="same as --scale smoke (the test suite's)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/replicate[-<scale>])")
    parser.add_argument("--publish", action=argparse.BooleanOptionalAction, default=None,
                        help="copy the report into bench/replicate (full) or bench/replicate/results-<scale> (cpu); "
                             "default: only for the default --out")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="stop cleanly after about this many seconds (exit 3); the same call again continues")
    parser.add_argument("--exec", dest="mode", choices=("subprocess", "inprocess", "hybrid"), default=None,
                        help="how moecraft commands run (default: subprocess; hybrid with --scale cpu, inprocess "
                             "with --smoke)")
    parser.add_argument("--parts", default=",".join(experiments.PARTS),
                        help="experiments stage: only these of its parts (moe: selection, ESFT rows, probe; pesc: "
                             "the dense comparison; late: router-only and two-stage rows); they share no command, so "
                             "two calls with different parts can run at once; a call with all of them gathers the "
                             "numbers")
    args = parser.parse_args(argv)
    parts = tuple(p for p in args.parts.split(",") if p)
    if not parts or set(parts) - set(experiments.PARTS):
        parser.error(f"--parts: choose from {','.join(experiments.PARTS)}, got {args.parts!r}")
    if args.smoke and args.scale not in (None, "smoke"):
        parser.error("--smoke contradicts --scale " + args.scale)
    scale = SCALES["smoke" if args.smoke else args.scale or "full"]
    default_out = Path("runs") / ("replicate" if scale.name == "full" else f"replicate-{scale.name}")
    out = args.out or default_out
    layout = Layout(out.resolve())
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.check_scale(scale)
    mode = args.mode or {"smoke": "inprocess", "cpu": "hybrid"}.get(scale.name, "subprocess")
    if scale.torch_threads:
        import torch

        torch.set_num_threads(scale.torch_threads)
    # only a run in the default folder overwrites the committed results (not a test or a trial elsewhere)
    publish = args.publish if args.publish is not None else out == default_out
    budget = Budget(args.time_budget)
    command = "python bench/replicate/run.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    try:
        for stage in STAGES if args.stage == "all" else (args.stage,):
            run_stage(stage, layout, scale, budget, mode, command, publish, parts)
    except OutOfTime as exc:
        print(f"time budget spent during {exc}; run the same command again to continue", flush=True)
        return MORE_TO_DO
    print(f"done: {args.stage} ({scale.name}) in {layout.root}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
