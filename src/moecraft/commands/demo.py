"""The whole pipeline offline on CPU in a few minutes: score -> select -> train (ESFT, FFT, LoRA, PESC) -> eval -> report.

Tiny random models of real transformers classes (tiny:deepseek_v2 for ESFT and its baselines, tiny:llama
for PESC) and the built-in tasks stand in for real ones, so nothing is downloaded; random tiny models
score near zero on the tasks, which is expected: the report still shows every method before and after.
Point any step at real models and data with --moe-model, --dense-model, --data, --second-data, --eval-data.

Example: moecraft demo --out runs/demo
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from moecraft.config import SEED, checked, non_empty, one_of
from moecraft.data.records import DataFormatName, data_option
from moecraft.errors import MoecraftError


@dataclass
@checked(non_empty("methods"), steps=">= 1", seq_len=">= 2", n_sequences=">= 1", score=one_of("gate", "token"), p="(0, 1]",
         eval_limit=">= 1", max_new_tokens=">= 1", methods=one_of("esft", "fft", "lora", "pesc"), seed=SEED)
class DemoConfig:
    """Options of ``moecraft demo``."""

    out: Path = field(default=Path("runs/demo"), metadata={"help": "output folder of every step and the report"})
    moe_model: str = field(default="tiny:deepseek_v2", metadata={"help": "MoE model for ESFT/FFT/LoRA (hub id, folder, tiny:<family>)"})
    dense_model: str = field(default="tiny:llama", metadata={"help": "dense model for PESC"})
    data: str = field(default="builtin:intent", metadata={"help": "training data of the target task"})
    eval_data: str | None = field(default=None, metadata={"help": "eval rows of the target task (default: builtin:<task>:eval)"})
    second_data: str = field(default="builtin:arithmetic", metadata={"help": "a second task, scored for the overlap analysis"})
    steps: int = field(default=300, metadata={"help": "optimiser steps per method"})
    seq_len: int = field(default=256, metadata={"help": "packed sequence length for scoring and training"})
    n_sequences: int = field(default=8, metadata={"help": "packed sequences sampled for expert scoring"})
    score: str = field(default="token", metadata={"help": "expert score: token (eq. 6) or gate (eq. 5)"})
    p: float | None = field(default=None, metadata={"help": "selection threshold (default 0.2 token, 0.1 gate)"})
    eval_limit: int = field(default=32, metadata={"help": "eval rows per model"})
    max_new_tokens: int = field(default=64, metadata={"help": "generation length in eval"})
    methods: list[str] = field(default_factory=lambda: ["esft", "fft", "lora", "pesc"],
                               metadata={"help": "methods to run (any of esft, fft, lora, pesc)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    # --- data format (moecraft.data.records.DataOptions; the same on score, train, eval, demo, data)
    data_format: DataFormatName = data_option("data_format")
    field_messages: str | None = data_option("field_messages")
    message_property_mappings: dict | None = data_option("message_property_mappings")
    data_columns: dict | None = data_option("data_columns")
    roles: dict | None = data_option("roles")
    roles_to_train: list[str] | None = data_option("roles_to_train")
    overwrite: bool = field(default=False, metadata={"help": "run into a non-empty --out, discarding what is in it"})


def _step(n: int, text: str) -> float:
    print(f"\n[{n}] {text}", flush=True)
    return time.monotonic()


def _done(t0: float, where) -> None:
    print(f"    -> {where}  ({time.monotonic() - t0:.1f}s)", flush=True)


def run_demo(cfg: DemoConfig) -> dict:
    """Run every step; returns the summary that ``out/summary.json`` and ``out/report.html`` show.

    ``--out`` is claimed as a long-lived folder (:func:`moecraft.files.run_folder`): refused when not empty
    unless --overwrite, locked for the whole demo, and marked unfinished until the report is written.
    """
    from moecraft.files import run_folder

    inputs = [cfg.moe_model, cfg.dense_model, cfg.data, cfg.eval_data, cfg.second_data]
    with run_folder(cfg.out, inputs=inputs, overwrite=cfg.overwrite) as folder:
        summary = _run_demo(cfg, folder)
        folder.finish()
    return summary


def _run_demo(cfg: DemoConfig, folder) -> dict:
    from moecraft.analysis.analyze import AnalyzeConfig, analyze
    from moecraft.analysis.plots import bar_plot
    from moecraft.analysis.report import image_html, section, table_html, write_report
    from moecraft.data import DataOptions, load_records
    from moecraft.esft.selection import SelectConfig, select_experts
    from moecraft.esft.stats import ScoreConfig, score_experts
    from moecraft.eval.perplexity import perplexity
    from moecraft.eval.runner import EvalConfig, evaluate_model, format_table
    from moecraft.models import load_model
    from moecraft.runinfo import seed_everything, write_run_info

    unknown = sorted(set(cfg.methods) - {"esft", "fft", "lora", "pesc"})
    if unknown:
        raise MoecraftError(f"demo: unknown method(s) {unknown}; choose from esft, fft, lora, pesc")
    start = time.monotonic()
    seed_everything(cfg.seed)
    out = folder.start()
    write_run_info(out, cfg)
    eval_data = cfg.eval_data or (f"{cfg.data}:eval" if cfg.data.startswith("builtin:") and cfg.data.count(":") == 1 else cfg.data)
    dopts = DataOptions.values_of(cfg)  # the data format options go to every step
    ecfg = EvalConfig(tasks=[eval_data], limit=cfg.eval_limit, max_new_tokens=cfg.max_new_tokens,
                      batch_size=cfg.eval_limit, seed=cfg.seed, **dopts)
    general_data = (f"{cfg.second_data}:eval" if cfg.second_data.startswith("builtin:")
                    and cfg.second_data.count(":") == 1 else cfg.second_data)
    results: dict[str, dict] = {}
    train_info: dict[str, dict] = {}
    moe_methods = [m for m in cfg.methods if m != "pesc"]

    def evaluate(name: str, model, tok, n: int) -> None:
        t0 = _step(n, f"evaluate {name} on {eval_data} ({cfg.eval_limit} rows, greedy)")
        res = evaluate_model(model, tok, ecfg, out / "eval" / name)
        (out / "eval" / name / "results.json").write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
        write_run_info(out / "eval" / name, ecfg)
        results[name] = dict(res["tasks"][eval_data]["metrics"])
        # Smooth signals next to the 0/1 task metric: perplexity of the reference answers of the task,
        # and perplexity on the second task's held-out text (general ability kept).
        for key, src in (("task answer ppl", eval_data), ("other-task ppl", general_data)):
            recs = load_records(src, cfg.eval_limit, DataOptions(**dopts))
            results[name][key] = perplexity(model, tok, recs, cfg.seq_len, 8, progress=False)["ppl"]
        print(format_table(res))
        _done(t0, out / "eval" / name / "results.json")

    n = 0
    sections_routing: list[str] = []
    if moe_methods:
        n += 1
        t0 = _step(n, f"load MoE model {cfg.moe_model}")
        moe, tok = load_model(cfg.moe_model, seed=cfg.seed)
        _done(t0, f"{type(moe).__name__}, {sum(p.numel() for p in moe.parameters()):,} parameters")
        # One loaded model for every scoring pass: different samples must be scored on the same weights.
        score_files = {}
        for label, data, seed in [("task", cfg.data, cfg.seed), ("task-sample-2", cfg.data, cfg.seed + 1),
                                  ("second-task", cfg.second_data, cfg.seed)]:
            n += 1
            t0 = _step(n, f"score experts on {data} (sample seed {seed}): router statistics, ESFT eq. 5/6")
            path = out / "scores" / f"{label}.json"
            score_experts(ScoreConfig(model=cfg.moe_model, data=data, out=path, n_sequences=cfg.n_sequences, **dopts,
                                      seq_len=cfg.seq_len, seed=seed), model=moe, tokenizer=tok)
            score_files[label] = path
            _done(t0, path)
        n += 1
        t0 = _step(n, f"select experts (eq. 8, {cfg.score} score)")
        experts_path = out / "experts.json"
        sel = select_experts(SelectConfig(scores=score_files["task"], score=cfg.score, p=cfg.p, out=experts_path))
        print("    selected per layer: " + ", ".join(f"L{k}: {v}" for k, v in sel.experts.items()))
        _done(t0, experts_path)
        n += 1
        evaluate("moe-base", moe, tok, n)
        for method in moe_methods:
            n += 1
            _train(cfg, method, cfg.moe_model, cfg.data, experts_path, out, n, train_info)
            n += 1
            evaluate(method, train_info[method].pop("model"), tok, n)
        if "esft" in moe_methods:
            n += 1
            t0 = _step(n, "score the ESFT-trained model on the same sample (routing before/after)")
            from moecraft.artifacts import load_artifact

            base, _ = load_model(cfg.moe_model, seed=cfg.seed)
            tuned = load_artifact(base, out / "train" / "esft")
            score_files["after-esft"] = out / "scores" / "after-esft.json"
            score_experts(ScoreConfig(model=cfg.moe_model, data=cfg.data, out=score_files["after-esft"], **dopts,
                                      n_sequences=cfg.n_sequences, seq_len=cfg.seq_len, seed=cfg.seed),
                          model=tuned, tokenizer=tok)
            _done(t0, score_files["after-esft"])
        n += 1
        t0 = _step(n, "routing analysis: heatmaps, concentration, overlap, before/after")
        acfg = AnalyzeConfig(
            scores=[f"{k}={v}" for k, v in score_files.items() if k != "after-esft"], score=cfg.score, p=cfg.p,
            before=str(score_files["task"]) if "after-esft" in score_files else None,
            after=str(score_files["after-esft"]) if "after-esft" in score_files else None, out=out / "analysis")
        numbers, sections_routing = analyze(acfg)
        (out / "analysis" / "analysis.json").write_text(json.dumps(numbers, indent=2) + "\n")
        write_run_info(out / "analysis", acfg)
        _done(t0, out / "analysis")
    if "pesc" in cfg.methods:
        n += 1
        t0 = _step(n, f"load dense model {cfg.dense_model} for PESC")
        dense, dtok = load_model(cfg.dense_model, seed=cfg.seed)
        _done(t0, f"{type(dense).__name__}, {sum(p.numel() for p in dense.parameters()):,} parameters")
        n += 1
        evaluate("dense-base", dense, dtok, n)
        n += 1
        _train(cfg, "pesc", cfg.dense_model, cfg.data, None, out, n, train_info)
        n += 1
        evaluate("pesc", train_info["pesc"].pop("model"), dtok, n)

    n += 1
    t0 = _step(n, "write the HTML report")
    base_of = {m: "moe-base" for m in moe_methods} | {"pesc": "dense-base"}
    metric_names = list(dict.fromkeys(k for r in results.values() for k in r))
    rows, bars = [], {}
    for m in cfg.methods:
        for met in metric_names:
            before, after = results[base_of[m]].get(met), results[m].get(met)
            rows.append([m, met, before, after, after - before])
            if "ppl" not in met:
                bars[f"{m} ({met})"] = {"before": before, "after": after}
        ti = train_info[m]
        ti["artifact_share_%"] = 100 * ti["artifact_bytes"] / ti["base_bytes"]
    ppl_bars = {f"{m}: {met}": {"before": results[base_of[m]][met], "after": results[m][met]}
                for m in cfg.methods for met in metric_names if "ppl" in met}
    fig2 = bar_plot(ppl_bars, "perplexity before and after training (lower is better)", "perplexity",
                    out / "ppl_before_after.png")
    fig = bar_plot(bars, f"{eval_data}: score before and after training", "score (0-100)", out / "scores_before_after.png")
    train_rows = [[m, t["steps"], t["train_loss"], t["eval_loss"], t["optimizer_parameters"], t["artifact_share_%"]]
                  for m, t in train_info.items()]
    summary = {"eval_data": eval_data, "results": results, "train": train_info,
               "seconds": time.monotonic() - start}
    sections = [
        section(f"Task scores before and after ({eval_data})", image_html(fig), image_html(fig2),
                table_html(["method", "metric", "before", "after", "change"], rows),
                note="'before' is the base model the method starts from (the MoE base for ESFT/FFT/LoRA, the "
                     "dense base for PESC). Tiny random models are not expected to solve the task."),
        section("Training", table_html(["method", "steps", "last train loss", "eval loss", "optimised parameters",
                                        "artifact size (% of base)"], train_rows)),
        *sections_routing,
    ]
    meta = (f"MoE model {cfg.moe_model}, dense model {cfg.dense_model}, data {cfg.data}, "
            f"{cfg.steps} steps per method, seq_len {cfg.seq_len}; total {summary['seconds']:.0f}s")
    report = write_report(out / "report.html", "moecraft demo: ESFT, FFT, LoRA and PESC", sections, meta)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    _done(t0, report)
    return summary


def _train(cfg: DemoConfig, method: str, model: str, data: str, experts: Path | None, out: Path, n: int,
           info: dict) -> None:
    from moecraft.train.config import TrainConfig
    from moecraft.train.loop import train

    t0 = _step(n, f"train {method} on {data} ({cfg.steps} steps)")
    from moecraft.data import DataOptions

    tcfg = TrainConfig(model=model, data=data, out=str(out / "train" / method), method=method,
                       **DataOptions.values_of(cfg),
                       experts=str(experts) if method == "esft" else None, seq_len=cfg.seq_len,
                       max_steps=cfg.steps, eval_sequences=2, seed=cfg.seed,
                       # Higher than the paper's rates: a few hundred steps on a random tiny model, not a pretrained one.
                       lr={"esft": 3e-3, "fft": 1e-3, "lora": 3e-3, "pesc": 3e-3}[method])
    summary = train(tcfg)
    info[method] = {k: summary[k] for k in ("steps", "train_loss", "eval_loss", "optimizer_parameters",
                                            "artifact_bytes", "base_bytes", "model")}
    _done(t0, tcfg.out)


CONFIG = DemoConfig


def run(cfg: DemoConfig) -> int:
    summary = run_demo(cfg)
    print(f"\ndemo finished in {summary['seconds']:.0f}s; report: {Path(cfg.out) / 'report.html'}")
    return 0
