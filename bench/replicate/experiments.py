"""The papers' comparisons on the pretrained models, every step a ``moecraft`` command (see runner.py).

ESFT (Table 1 and Table 3 in miniature, on the MoE model), per task:
  vanilla | FFT | LoRA (r 8, alpha 16) | ESFT-Gate (p 0.1) | ESFT-Token (p 0.2)
  | expert-selective variants on the ESFT-Gate experts: esft-lora (LoRA r 8 on the selected experts only,
    MoE-Sieve arXiv 2603.24044), esft-router (ESFT-Gate + the routers of those layers, CEFT arXiv 2508.19594),
    router (the routers alone) and two-stage (experts selected on the router-tuned model, then ESFT on the
    base with them: the router run -> merge -> score -> select -> ESFT)
  and Table 3's shared/non-shared variants of ESFT-Gate (+ shared experts, + shared + non-expert modules),
  all mixed 1:1 with alignment data (pretraining text) as in the paper;
  measured: task score, held-out perplexity per pretraining domain (general ability), trainable parameters,
  step time, peak memory, artifact size.
ESFT Figure 2: expert overlap of two disjoint samples of one task vs two tasks (``moecraft analyze``).
PESC (on the dense model, instruction mix of the tasks): PESC (8 experts, top-2) vs dense LoRA with as many
trainable parameters vs dense FFT; task scores and held-out perplexity.

Learning rates: like the paper (a search over {1e-5, 3e-5, 1e-4, 3e-4} per method), each method's rate is
chosen from ``scale.lr_grid`` by its validation loss on the first task (PESC side: on the mix), with the first
seed, and reused for the other task, the other seeds and the Table 3 variants (which run on the first seed
only); two-stage reuses ESFT-Gate's rate (the same training on another expert set). ``collect`` gathers every number with the step ids of the
commands behind it into ``exp/results.json``, which report.py renders.
"""

from __future__ import annotations

import json
import math
import shutil
from itertools import zip_longest
from pathlib import Path

from replicate.common import (
    PROBE_TASKS,
    TASKS,
    Layout,
    Scale,
    domains,
    machine,
    read_json,
    read_jsonl,
    write_json,
)
from replicate.runner import Runner, records

# MoE methods with their own learning rate: name -> (moecraft --method, ESFT selection score or None, flags)
MOE_METHODS: dict[str, tuple[str, str | None, list[str]]] = {
    "fft": ("fft", None, []),
    "lora": ("lora", None, []),
    "esft-gate": ("esft", "gate", []),
    "esft-token": ("esft", "token", []),
    "esft-lora": ("esft", "gate", ["--expert-adapter", "lora"]),  # MoE-Sieve: LoRA on the selected experts
    "esft-router": ("esft", "gate", ["--train-router", "true"]),  # CEFT: + routers of the selected layers
    "router": ("router", None, []),  # Router Lens / CEFT: routers alone
}
VARIANT_METHODS = ("esft-lora", "esft-router", "router")  # learning rates from scale.variant_lr_grid
LATE_METHODS = ("router",)  # run after everything else (the two-stage row needs it): the first to drop for time
TWO_STAGE = "two-stage"  # ESFT-Gate on experts selected with the router-tuned model (needs "router")
VARIANTS = {  # ESFT Table 3 rows beyond the plain relevant-experts one, on the ESFT-Gate selection
    "esft-gate+shared": ["--train-shared-experts", "true"],
    "esft-gate+shared+non-expert": ["--train-shared-experts", "true", "--train-non-expert-modules", "true"],
}
DENSE_METHODS = {"pesc": "pesc", "lora-eq": "lora", "fft": "fft"}  # name -> moecraft --method
PARTS = ("moe", "pesc", "late")  # Experiments.run's steps 1-5, 6, 7


def cli_method(model: str, method: str) -> str:
    """The ``moecraft train --method`` behind a row name."""
    if model == "dense":
        return DENSE_METHODS[method]
    return "esft" if method in VARIANTS or method == TWO_STAGE else MOE_METHODS[method][0]


def lr_id(lr: float) -> str:
    return f"lr{lr:.0e}"


class Experiments:
    """Builds each command line from the scale and the data manifest; the runner skips what is done."""

    def __init__(self, layout: Layout, scale: Scale, runner: Runner, data: dict):
        self.L, self.S, self.R, self.data = layout, scale, runner, data
        self.exp = layout.exp
        self.domains = domains(layout)

    # ------------------------------------------------------------------ command builders
    def rel(self, path: Path) -> str:
        return self.L.rel(path)

    def train(self, model: str, task: str, method: str, lr: float, seed: int, extra: list[str]) -> str:
        """One ``moecraft train`` run; returns its step id (output under exp/train/<step id>)."""
        files = self.data["pesc_mix"] if task == "mix" else self.data["tasks"][task]
        step = f"train/{model}/{task}/{method}/{lr_id(lr)}-s{seed}"
        out = self.exp / step
        args = ["train", "--method", cli_method(model, method), "--model", self.rel(self.L.model(model)),
                "--data", files["train"], "--eval-data", files["val"], "--out", self.rel(out),
                "--seq-len", str(self.S.seq_len), "--max-steps", str(self.S.steps),
                "--batch-size", str(self.S.batch_size), "--lr", f"{lr:g}", "--warmup-steps", str(self.S.steps // 20),
                "--seed", str(seed), "--eval-sequences", str(self.S.eval_sequences),
                "--save-every", str(self.S.save_every), "--resume", "true", "--progress", "false", *extra]
        if model == "moe" and self.S.mix_ratio > 0:  # the paper mixes every method's task data 1:1 with alignment data
            args += ["--mix-data", self.data["align"]["file"], "--mix-ratio", str(self.S.mix_ratio)]
        self.R.moecraft(step, args, out / "artifact.json")
        for ckpt in out.glob("checkpoint*"):  # only needed to resume; FFT's are as large as the model
            shutil.rmtree(ckpt, ignore_errors=True)
        return step

    def evaluate(self, model: str, name: str, adapter: str | None, tasks: list[str]) -> list[str]:
        """Task scores and held-out perplexity per domain, spread over as few ``moecraft eval`` calls as possible."""
        steps = []
        for task, domain in zip_longest(tasks, self.domains):
            what = "+".join(x for x in (task, f"ppl-{domain}" if domain else None) if x)
            step = f"eval/{model}/{name}/{what}"
            out = self.exp / step
            args = ["eval", "--model", self.rel(self.L.model(model)), "--out", self.rel(out),
                    "--seed", str(self.S.seeds[0]), "--batch-size", str(self.S.eval_batch)]
            if adapter:
                args += ["--adapter", adapter]
            if task:
                spec = self.data["tasks"][task]
                args += ["--tasks", spec["test"], "--max-new-tokens", str(spec["max_new_tokens"])]
                if self.S.eval_limit:
                    args += ["--limit", str(self.S.eval_limit)]
            else:
                args += ["--tasks", ""]
            if domain:
                args += ["--perplexity-data", f"corpus/{domain}.heldout.jsonl",
                         "--perplexity-limit", str(self.S.ppl_limit), "--seq-len", str(self.S.seq_len)]
            self.R.moecraft(step, args, out / "results.json")
            steps.append(step)
        return steps

    def score_and_select(self, model: str, data: str, name: str, fn: str) -> tuple[str, Path]:
        """Router statistics of ``model`` on a training sample (``moecraft score``), then eq. 8 with the paper's
        p for score ``fn`` (``moecraft select``); returns the select step id and the expert config."""
        S, scores = self.S, self.exp / "scores" / f"{name}.json"
        self.R.moecraft(f"score/moe/{name}", [
            "score", "--model", model, "--data", data, "--out", self.rel(scores), "--n-sequences",
            str(S.score_sequences), "--seq-len", str(S.seq_len), "--seed", str(S.seeds[0]),
            "--batch-size", str(min(8, S.score_sequences))], scores)
        experts = self.exp / "experts" / f"{name}-{fn}.json"
        self.R.moecraft(f"select/moe/{name}/{fn}", ["select", "--scores", self.rel(scores), "--score", fn,
                                                   "--out", self.rel(experts)], experts)
        return f"select/moe/{name}/{fn}", experts

    def two_stage_experts(self, task: str, router_step: str, seed: int) -> Path:
        """Experts chosen by the router-tuned model: merge the router run into the base, score, select (gate)."""
        name = f"{task}-router-s{seed}"
        if not (self.exp / "experts" / f"{name}-gate.json").is_file():
            merged = self.exp / "merged" / name
            self.R.moecraft(f"merge/moe/{name}", ["merge", "--artifact", self.rel(self.exp / router_step),
                                                  "--out", self.rel(merged), "--overwrite", "true"],
                            merged / "config.json")
            self.score_and_select(self.rel(merged), self.data["tasks"][task]["train"], name, "gate")
            shutil.rmtree(merged, ignore_errors=True)  # a full model; only its router statistics are needed
        return self.exp / "experts" / f"{name}-gate.json"

    # ------------------------------------------------------------------ the experiment
    def run(self, parts: tuple[str, ...] = PARTS) -> dict:
        """Every command of the experiment in order; ``parts`` runs some of them: "moe" (steps 1-5), "pesc"
        (step 6), "late" (step 7, once the ESFT-Gate rate is chosen). Parts share no command, so they can run
        in separate processes at once; only all of them together return the whole plan."""
        S = self.S
        if not (self.exp / "machine.json").is_file():  # where the commands run (the report may be made elsewhere)
            write_json(self.exp / "machine.json", machine())
        plan: dict = {"esft": [], "table3": [], "pesc": [], "sweep": [], "selection": {}, "two_stage": []}
        lrs: dict[str, float] = {}
        if "moe" in parts or "late" in parts:
            # 1. ESFT expert selection: router statistics on a training sample, eq. 8 with the paper's p
            for task in TASKS:
                for fn in ("gate", "token"):
                    step, experts = self.score_and_select(self.rel(self.L.model("moe")), self.data["tasks"][task]["train"],
                                                          task, fn)
                    plan["selection"].setdefault(task, {})[fn] = {"file": self.rel(experts), "step": step}

            def moe_extra(task: str, method: str) -> list[str]:
                if method in VARIANTS:
                    return ["--experts", self.rel(self.exp / "experts" / f"{task}-gate.json"), *VARIANTS[method]]
                _, fn, flags = MOE_METHODS[method]
                return [*(["--experts", self.rel(self.exp / "experts" / f"{task}-{fn}.json")] if fn else []), *flags]

            def sweep(method: str) -> float:
                grid = S.variant_lr_grid if method in VARIANT_METHODS and S.variant_lr_grid else S.lr_grid
                return self.sweep("moe", TASKS[0], method, moe_extra(TASKS[0], method), plan, grid)

            def table1(methods: list[str]) -> None:
                """Every task x method x seed (Table 3 variants: first seed), each evaluated on its task."""
                for task in TASKS:
                    for method in methods:
                        lr = lrs[method.split("+")[0]]
                        for seed in S.seeds[:1] if method in VARIANTS else S.seeds:
                            if method == TWO_STAGE:
                                router_step = f"train/moe/{task}/router/{lr_id(lrs['router'])}-s{seed}"
                                experts = self.two_stage_experts(task, router_step, seed)
                                extra = ["--experts", self.rel(experts)]
                                plan["two_stage"].append({"task": task, "seed": seed, "file": self.rel(experts),
                                                          "step": f"select/moe/{task}-router-s{seed}/gate",
                                                          "base_file": plan["selection"][task]["gate"]["file"]})
                            else:
                                extra = moe_extra(task, method)
                            step = self.train("moe", task, method, lr, seed, extra)
                            evals = self.evaluate("moe", step.removeprefix("train/moe/"), self.rel(self.exp / step), [task])
                            plan["table3" if method in VARIANTS else "esft"].append(
                                self.row("moe", task, method, lr, seed, step, evals))

        if "moe" in parts:
            # 2. vanilla MoE on every task
            vanilla = self.evaluate("moe", "vanilla", None, list(TASKS))
            plan["esft"] += [self.row("moe", task, "vanilla", None, None, None, vanilla) for task in TASKS]
            # 3. learning rate per method on the first task and seed, by validation loss
            early = [m for m in S.moe_methods if m not in LATE_METHODS]
            lrs |= {m: sweep(m) for m in early}
            # 4. Table 1 (+ Table 3 variants)
            table1([*early, *VARIANTS])
            # 5. ESFT Figure 2: overlap of expert choices, two disjoint samples per task
            specs = []
            for task in (*PROBE_TASKS, *self.domains):
                for half, rel in zip("ab", self.data["probe"][task]):
                    out = self.exp / "probe" / f"{task}-{half}.json"
                    self.R.moecraft(f"probe/score/{task}-{half}", [
                        "score", "--model", self.rel(self.L.model("moe")), "--data", rel, "--out", self.rel(out),
                        "--n-sequences", str(S.score_sequences), "--seq-len", str(S.seq_len), "--seed", str(S.seeds[0]),
                        "--batch-size", str(min(8, S.score_sequences))], out)
                    specs.append(f"{task}-{half}={self.rel(out)}")
            analysis = self.exp / "probe" / "analysis"
            self.R.moecraft("probe/analyze", ["analyze", "--scores", ",".join(specs), "--score", "token",
                                              "--out", self.rel(analysis), "--title", "expert overlap probe"],
                            analysis / "analysis.json")
            plan["probe"] = {"step": "probe/analyze", "file": self.rel(analysis / "analysis.json")}
        # 6. PESC vs dense LoRA (same trainable parameters) vs dense FFT on the instruction mix
        if "pesc" in parts:
            dense_vanilla = self.evaluate("dense", "vanilla", None, list(TASKS))
            plan["pesc"].append(self.row("dense", "mix", "vanilla", None, None, None, dense_vanilla))
            pesc = ["--pesc-num-experts", str(S.pesc_num_experts), "--pesc-top-k", str(S.pesc_top_k),
                    "--pesc-adapter-dim", str(S.pesc_adapter_dim), "--pesc-quantize", "none",
                    "--pesc-lora-rank", "0"]  # experts + routers only, as the committed results were run
            dense_lrs = {"pesc": self.sweep("dense", "mix", "pesc", pesc, plan)}
            rank = self.equal_lora_rank(plan)
            lora_eq = ["--lora-r", str(rank), "--lora-alpha", str(2 * rank)]
            dense_lrs["lora-eq"] = self.sweep("dense", "mix", "lora-eq", lora_eq, plan)
            dense_lrs["fft"] = self.sweep("dense", "mix", "fft", [], plan)
            extras = {"pesc": pesc, "lora-eq": lora_eq, "fft": []}
            for method in DENSE_METHODS:
                for seed in S.pesc_seeds or S.seeds:
                    step = self.train("dense", "mix", method, dense_lrs[method], seed, extras[method])
                    evals = self.evaluate("dense", step.removeprefix("train/dense/"), self.rel(self.exp / step), list(TASKS))
                    plan["pesc"].append(self.row("dense", "mix", method, dense_lrs[method], seed, step, evals))
        # 7. late rows: router-only, and two-stage (ESFT-Gate's rate on the router-tuned model's experts)
        if "late" in parts:
            if "moe" not in parts and "esft-gate" in S.moe_methods:
                lrs["esft-gate"] = sweep("esft-gate")  # done by the "moe" part: read, not run again
            late = [m for m in S.moe_methods if m in LATE_METHODS]
            lrs |= {m: sweep(m) for m in late}
            if "router" in late and "esft-gate" in lrs:
                lrs[TWO_STAGE] = lrs["esft-gate"]
                late.append(TWO_STAGE)
            table1(late)
        if set(parts) != set(PARTS):
            return plan
        plan["chosen_lr"] = {"moe": lrs, "dense": dense_lrs}
        plan["lora_eq_rank"] = rank
        write_json(self.exp / "plan.json", plan)
        return plan

    def sweep(self, model: str, task: str, method: str, extra: list[str], plan: dict,
              grid: tuple[float, ...] | None = None) -> float:
        """Train at every grid rate; the rate with the lowest final validation loss (ties: the smaller)."""
        losses = {}
        for lr in grid or self.S.lr_grid:
            step = self.train(model, task, method, lr, self.S.seeds[0], extra)
            losses[lr] = final_eval_loss(self.exp / step)
            plan["sweep"].append({"model": model, "task": task, "method": method, "lr": lr, "step": step,
                                  "eval_loss": losses[lr]})
        finite = {lr: v for lr, v in losses.items() if math.isfinite(v)}
        if not finite:
            raise RuntimeError(f"{model}/{task}/{method}: every learning rate diverged: {losses}")
        return min(finite, key=lambda lr: (finite[lr], lr))

    def equal_lora_rank(self, plan: dict) -> int:
        """LoRA rank on the dense model whose trainable parameters match PESC's (moecraft's LoRA targets)."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from moecraft.methods.lora import lora_targets

        pesc_run = next(s["step"] for s in plan["sweep"] if s["method"] == "pesc")
        n_pesc = read_json(self.exp / pesc_run / "artifact.json")["optimizer_parameters"]
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(self.L.model("dense"))))
        targets = set(lora_targets(model))
        per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets)
        return max(1, round(n_pesc / per_rank))

    def row(self, model: str, task: str, method: str, lr: float | None, seed: int | None, train_step: str | None,
            eval_steps: list[str]) -> dict:
        return {"model": model, "task": task, "method": method, "lr": lr, "seed": seed, "train_step": train_step,
                "eval_steps": eval_steps}


def plan_test(layout: Layout) -> str:
    """The intent test file (relative to the output folder)."""
    return read_json(layout.data / "manifest.json")["tasks"]["intent"]["test"]


def final_eval_loss(run: Path) -> float:
    for line in reversed((run / "metrics.jsonl").read_text().splitlines()):
        rec = json.loads(line)
        if rec.get("final"):
            return float(rec["eval_loss"])
    return math.nan


# ----------------------------------------------------------------------------- collect
def collect(layout: Layout, scale: Scale, plan: dict) -> dict:
    """Every number of the report, each with the step ids (hence command lines) that produced it."""
    cmds = records(layout.root)
    exp, doms = layout.exp, domains(layout)

    def fill(row: dict) -> dict:
        out = dict(row)
        out["scores"], out["ppl"] = {}, {}
        for step in row["eval_steps"]:
            res = read_json(exp / step / "results.json")
            for source, r in res["tasks"].items():
                task = next(t for t in TASKS if source.startswith(("data/" + t, "builtin:" + t)))
                # the task's own metric comes first (moecraft's infer_metrics); others as "<task>:<metric>"
                for i, (metric, value) in enumerate(r["metrics"].items()):
                    out["scores"][task if i == 0 else f"{task}:{metric}"] = {"metric": metric, "value": value,
                                                                             "n": r["n"], "step": step}
            if "perplexity" in res:
                dom = next(d for d in doms if f"/{d}." in res["perplexity"]["data"])
                out["ppl"][dom] = {"ppl": res["perplexity"]["ppl"], "n_tokens": res["perplexity"]["n_tokens"],
                                   "step": step}
        if row["train_step"]:
            run = exp / row["train_step"]
            art, cmd = read_json(run / "artifact.json"), cmds.get(row["train_step"], {})
            metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
            tps = [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s")]
            out.update({"trainable_params": art["optimizer_parameters"], "artifact_bytes": art["artifact_bytes"],
                        "base_bytes": art["base_bytes"], "eval_loss": final_eval_loss(run),
                        "step_s": scale.batch_size * scale.seq_len / tps[-1] if tps else None,
                        "train_wall_s": cmd.get("wall_s"), "peak_gpu_bytes": cmd.get("peak_gpu_bytes"),
                        "peak_rss_bytes": cmd.get("peak_rss_bytes")})
            if (run / "expert_config.json").is_file():
                out["selected_fraction"] = read_json(run / "expert_config.json")["selected_fraction"]
        else:
            out.update({"trainable_params": 0, "artifact_bytes": 0})
        return out

    results = {key: [fill(r) for r in plan[key]] for key in ("esft", "table3", "pesc")}
    results["sweep"], results["chosen_lr"], results["lora_eq_rank"] = plan["sweep"], plan["chosen_lr"], plan["lora_eq_rank"]
    results["selection"] = {}
    for task, fns in plan["selection"].items():
        for fn, s in fns.items():
            ec = read_json(layout.root / s["file"])
            results["selection"].setdefault(task, {})[fn] = {
                "p": ec["p"], "selected_fraction": ec["selected_fraction"], "step": s["step"],
                "per_layer": {k: len(v) for k, v in ec["experts"].items()}, "num_experts": ec["num_experts"],
                "warnings": ec["warnings"]}
    from moecraft.eval.metrics import intent_label

    rows = read_jsonl(layout.root / plan_test(layout))[: scale.eval_limit]  # the rows evaluated
    labels = [intent_label(r["reference"][0] if isinstance(r["reference"], list) else r["reference"]) for r in rows]
    results["intent_label_majority"] = 100 * max(labels.count(x) for x in set(labels)) / len(labels)
    results["two_stage"] = []
    for t in plan.get("two_stage", []):  # experts picked with the router-tuned model vs with the base model
        new, base = (read_json(layout.root / t[k])["experts"] for k in ("file", "base_file"))
        results["two_stage"].append({**t, "selected": sum(map(len, new.values())),
                                     "base_selected": sum(map(len, base.values())),
                                     "shared": sum(len(set(v) & set(base.get(k, []))) for k, v in new.items())})
    a = read_json(layout.root / plan["probe"]["file"])
    labels, m = a["tasks"], a["shared_top_k"]
    task_of = [lab.rsplit("-", 1)[0] for lab in labels]
    same = [m[i][j] for i in range(len(labels)) for j in range(i + 1, len(labels)) if task_of[i] == task_of[j]]
    cross = [m[i][j] for i in range(len(labels)) for j in range(i + 1, len(labels)) if task_of[i] != task_of[j]]
    results["probe"] = {"step": plan["probe"]["step"], "labels": labels, "shared_top_k": m, "k": a["k"],
                        "num_experts": a["num_experts"], "n_tokens": a["n_tokens"],
                        "same_task_mean": sum(same) / len(same), "cross_task_mean": sum(cross) / len(cross),
                        "chance": a["k"] ** 2 / a["num_experts"],
                        "per_task_same": {task_of[i]: m[i][i + 1] for i in range(0, len(labels), 2)}}
    results["models"] = {k: read_json(layout.model(k) / "info.json") for k in ("moe", "dense")}
    results["data"] = read_json(layout.data / "manifest.json")
    results["corpus"] = read_json(layout.corpus / "manifest.json")
    results["tokenizer"] = read_json(layout.tokenizer / "tokenizer_info.json")
    results["scale"], results["domains"] = scale.to_json(), doms
    results["machine"] = read_json(exp / "machine.json")
    write_json(exp / "results.json", results)
    return results


def run(layout: Layout, scale: Scale, runner: Runner, parts: tuple[str, ...] = PARTS) -> dict:
    """Run (or skip, where done) every command, then gather the numbers; with one of ``parts`` only its commands
    (returns that part's plan, collects nothing)."""
    from transformers import AutoTokenizer

    from replicate import tasks

    tokenizer = AutoTokenizer.from_pretrained(str(layout.tokenizer))
    data = tasks.prepare(layout, scale, tokenizer)
    plan = Experiments(layout, scale, runner, data).run(parts)
    return collect(layout, scale, plan) if set(parts) == set(PARTS) else plan

