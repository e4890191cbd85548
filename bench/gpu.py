"""Every GPU figure of BENCHMARKS.md in one command (about 5 minutes on one H100/H200).

Runs, each in its own process with a time limit (one that fails or times out is reported, the rest go on):
  1. bench/score.py       router-statistics hooks vs a plain forward (DeepSeek-V2-Lite layer shapes)
  2. bench/train_step.py  FFT / ESFT / LoRA / LoRA on the selected experts, each twice, interleaved
  3. bench/train_step.py --fsdp2   the same step under FSDP2 on one GPU (FFT and ESFT)
  4. bench/pesc_layer.py  PESC layer vs dense FFN + LoRA vs a per-expert loop
and writes ``OUT/gpu.json`` (settings, library versions, every row) and ``OUT/gpu.md`` (the tables for
BENCHMARKS.md). ``--small`` runs the CPU-sized configurations instead (a dry run of the whole pipeline;
``--quick`` is ``--small`` with the fewest tokens that run every code path: the test suite runs it).

    python bench/gpu.py --out bench/results-gpu            # on the GPU machine
    python bench/gpu.py --small --out /tmp/gpu-dry-run     # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def steps(small: bool, quick: bool = False) -> list[tuple[str, list[str], int]]:
    """(name, script + arguments, time limit in seconds) of every benchmark: GPU, CPU-sized (``small``), or
    CPU-sized with the fewest tokens and repetitions that still run every code path (``quick``, for tests)."""
    cpu = ["--small"] if small or quick else []
    reps = "1" if quick else ("2" if small else "5")
    score = ["--n-sequences", "1", "--seq-len", "64"] if quick else []
    step = ["--seq-len", "32", "--warmup", "0"] if quick else []
    pesc = ["--tokens", "64"] if quick else []
    return [
        ("score", ["score.py", *cpu, *score, "--rounds", "1" if small or quick else "3"], 150),
        ("train_step", ["train_step.py", *cpu, *step, "--steps", reps, "--methods", "fft,esft,lora,esft-lora,fft,esft,lora,esft-lora"],
         240),
        ("train_step_fsdp2", ["train_step.py", *cpu, *step, "--fsdp2", "--steps", reps, "--methods", "fft,esft"], 150),
        ("pesc_layer", ["pesc_layer.py", *cpu, *pesc, "--iters", "1" if quick else ("2" if small else "10")], 150),
    ]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("moecraft", "torch", "transformers", "accelerate", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception as exc:  # noqa: BLE001 - reported, not fatal: the steps say what went wrong
        out["device"] = f"unknown ({exc})"
    return out


def run_step(name: str, argv: list[str], limit: int, out: Path) -> dict:
    result_file = out / f"{name}.json"
    log_file = out / f"{name}.log"
    cmd = [sys.executable, str(BENCH / argv[0]), *argv[1:], "--json", str(result_file)]
    t0 = time.perf_counter()
    with log_file.open("w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=limit, cwd=BENCH.parent).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    entry = {"command": " ".join(["python", f"bench/{argv[0]}", *argv[1:]]), "rc": rc,
             "seconds": round(time.perf_counter() - t0, 1), "log": log_file.name}
    if rc == 0 and result_file.is_file():
        entry["result"] = json.loads(result_file.read_text())
    else:
        entry["tail"] = log_file.read_text(errors="replace")[-2000:]
    print(f"{name}: rc {rc} in {entry['seconds']} s", flush=True)
    return entry


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def markdown(report: dict) -> str:
    v, res = report["versions"], report["steps"]
    lines = [f"Device: {v.get('device')}; torch {v.get('torch')} (CUDA {v.get('cuda')}), transformers "
             f"{v.get('transformers')}, accelerate {v.get('accelerate')}, peft {v.get('peft')}; "
             f"`{report['command']}`, {report['seconds']} s in all.", ""]
    for name, entry in res.items():
        lines.append(f"### {name}: `{entry['command']}`")
        lines.append("")
        if "result" not in entry:
            lines += [f"failed (rc {entry['rc']}); last lines of {entry['log']}:", "", "```",
                      entry.get("tail", "").strip()[-800:], "```", ""]
            continue
        r = entry["result"]
        if name == "score":
            lines += _table(["pass", "best s", "tokens/s"], [
                ["plain forward", f"{r['plain_s']:.3f}", f"{r['tokens'] / r['plain_s']:.0f}"],
                ["forward + router statistics", f"{r['hooked_s']:.3f}", f"{r['tokens'] / r['hooked_s']:.0f}"]])
            lines.append(f"\nHook overhead: {100 * r['overhead']:+.1f} % (goal: under 10 %).")
        elif name.startswith("train_step"):
            fft = next((x for x in r["rows"] if x["method"] == "fft"), r["rows"][0])
            rows = [[x["method"], f"{x['step_s']:.4f}", f"{x['step_s'] / fft['step_s']:.2f}",
                     f"{x['peak_gib']:.2f}", f"{x['peak_gib'] / fft['peak_gib']:.2f}", f"{x['opt_params']:,}"]
                    for x in r["rows"]]
            lines += _table(["method", "step s", "x FFT", "peak GiB", "x FFT", "optimiser parameters"], rows)
        elif name == "pesc_layer":
            rows = [[x["shape"], x["hidden"], x["intermediate"], x["rank"], f"{x['dense_lora_ms']:.2f}",
                     f"{x['pesc_ms']:.2f}", f"{x['loop_ms']:.2f}", f"{x['pesc_ms'] / x['dense_lora_ms']:.2f}",
                     f"{x['loop_ms'] / x['dense_lora_ms']:.2f}"] for x in r["rows"]]
            lines += _table(["shape", "H", "I", "r", "(a) ms", "PESC ms", "loop ms", "PESC/(a)", "loop/(a)"], rows)
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu.json, gpu.md and the logs")
    ap.add_argument("--small", action="store_true", help="CPU-sized configurations (dry run)")
    ap.add_argument("--quick", action="store_true", help="CPU-sized and as few tokens as run every path (tests)")
    ap.add_argument("--only", default=None, help="comma-separated step names to run (default: all)")
    args = ap.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        ap.error(f"--out {args.out} is not empty; give a new folder")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    wanted = set(args.only.split(",")) if args.only else None
    t0 = time.perf_counter()
    flags = "".join(f" --{f}" for f in ("small", "quick") if getattr(args, f))
    report = {"command": "python bench/gpu.py" + flags, "versions": versions(),
              "steps": {}}
    for name, argv_, limit in steps(args.small, args.quick):
        if wanted is None or name in wanted:
            report["steps"][name] = run_step(name, argv_, limit, args.out)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=1))
    (args.out / "gpu.md").write_text(markdown(report))
    print(f"wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'} ({report['seconds']} s)")
    return 0 if all(e["rc"] == 0 for e in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
