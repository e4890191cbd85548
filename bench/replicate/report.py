"""Render ``exp/results.json`` as ``RESULTS.md`` (tables) and ``report/report.html`` (tables + plots).

Every number in a table cites the commands behind it (``c<N>``, listed at the end with their command lines,
run inside the output folder). The section on the papers' claims is computed here from the numbers: each
claim is the paper's qualitative statement, the evidence is the measured comparison, and the verdict follows
a stated rule (task scores: a difference counts when it exceeds two binomial standard errors, and a comparison
in which every score is within two standard errors of 0 is "not testable"; perplexity, and the task
validation loss as a perplexity ratio exp(a - b): a difference counts when it exceeds 1% relative; with more
than one seed a difference must also exceed the seed spread: the sum of the two methods' half-ranges over
seeds). The task validation loss (final loss of each ``moecraft train`` run on held-out task rows, the
learning-rate criterion) measures how much of the task was learnt even where small models score 0 on the
exact-match metrics; so does the intent label alone (``intent_label``: the right one of the task's intents,
slots ignored; against the majority-label rate of the test set). Values shown as ``m ± h`` are the mean over
seeds and the half-range (half the max - min difference) across seeds.
"""

from __future__ import annotations

import html
import math
import shutil
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moecraft.analysis.report import image_html, section, write_report  # noqa: E402
from replicate.common import TASKS, Layout, read_json, read_jsonl  # noqa: E402
from replicate.runner import records  # noqa: E402

Table = tuple[str, list[str], list[list[str]], str]  # title, headers, rows, note


# ----------------------------------------------------------------------------- helpers
class Cites:
    """Short ids for step ids, in order of first use."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}

    def __call__(self, *steps: str | None) -> str:
        out = []
        for s in steps:
            if s:
                self.ids.setdefault(s, f"c{len(self.ids) + 1}")
                out.append(self.ids[s])
        return " ".join(dict.fromkeys(out))


def num(x: float | None, unit: str = "", digits: int = 3) -> str:
    """``1.23M`` parameters, ``45.6 MB``, ``0.123 s``; ``n/a`` for a missing value."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if unit in ("params", "B"):
        for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")):
            if abs(x) >= factor or factor == 1:
                return f"{x / factor:.{digits}g}{' ' + prefix + 'B' if unit == 'B' else prefix}"
    return f"{x:.{digits}g}" + (f" {unit}" if unit else "")


def pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:+.1f}%"


def mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else math.nan


def se(score: dict) -> float:
    """Binomial standard error (points) of a 0-100 score on n items, with add-half smoothing."""
    n = score["n"]
    p = (score["value"] / 100 * n + 0.5) / (n + 1)
    return 100 * math.sqrt(p * (1 - p) / n)


def grouped(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by method (seeds and tasks together), in first-seen order."""
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        out[r["method"]].append(r)
    return out


def task_score(rows: list[dict], task: str) -> dict | None:
    """Mean score of ``task`` over the rows' distinct evaluations (seeds), with their total item count."""
    vals = list({r["scores"][task]["step"]: r["scores"][task] for r in rows if task in r["scores"]}.values())
    if not vals:
        return None
    return {"value": mean([v["value"] for v in vals]), "n": sum(v["n"] for v in vals), "metric": vals[0]["metric"]}


def mean_score(rows: list[dict]) -> tuple[float, float]:
    """Mean over tasks of the task score and its standard error."""
    s = [task_score(rows, t) for t in TASKS]
    s = [x for x in s if x]
    return mean([x["value"] for x in s]), math.sqrt(sum(se(x) ** 2 for x in s)) / max(1, len(s))


def at_floor(*groups: list[dict]) -> bool:
    """Every task score of these rows is within two standard errors of 0 (nothing to compare)."""
    scores = [task_score(rows, t) for rows in groups for t in TASKS]
    return all(x["value"] <= 2 * se(x) for x in scores if x)


def val_loss(rows: list[dict]) -> float:
    """Mean over the rows (tasks, seeds) of the final validation loss on the task's held-out rows."""
    return mean([r.get("eval_loss") for r in rows])


def ppl_change(rows: list[dict], base: list[dict], dom: str) -> float:
    """Mean relative change (%) of held-out perplexity against the base model."""
    b = mean([r["ppl"][dom]["ppl"] for r in base if dom in r["ppl"]])
    return 100 * (mean([r["ppl"][dom]["ppl"] for r in rows if dom in r["ppl"]]) / b - 1)


def mem(r: dict) -> float | None:
    return r.get("peak_gpu_bytes") or r.get("peak_rss_bytes")


LABEL = "intent:intent_label"  # the intent task's second metric (scores key "<task>:<metric>", experiments.collect)


def per_seed(rows: list[dict], fn) -> list[float]:
    """``fn`` of each seed's rows (one value for rows without a seed, like the vanilla model's)."""
    seeds = sorted({r["seed"] for r in rows if r.get("seed") is not None})
    vals = [fn([r for r in rows if r.get("seed") == s]) for s in seeds] if seeds else [fn(rows)]
    return [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]


def half_range(vals: list[float]) -> float:
    return (max(vals) - min(vals)) / 2 if len(vals) > 1 else 0.0


def spread(vals: list[float], fmt=num) -> str:
    """``mean ± half-range`` over seeds (the mean alone for one value)."""
    if not vals:
        return "n/a"
    return fmt(mean(vals)) + (f" ± {fmt(half_range(vals))}" if len(vals) > 1 else "")


def pct_spread(vals: list[float]) -> str:
    return "n/a" if not vals else pct(mean(vals)) + (f" ± {half_range(vals):.1f}" if len(vals) > 1 else "")


def score_of(rows: list[dict], key: str) -> float | None:
    s = task_score(rows, key)
    return s["value"] if s else None


def general_change(rows: list[dict], base: list[dict], doms: list[str]) -> float:
    """Mean over domains of the held-out perplexity change (%) against the base model."""
    return mean([ppl_change(rows, base, d) for d in doms])


# ----------------------------------------------------------------------------- tables
def tables(res: dict, cite: Cites) -> list[Table]:
    out: list[Table] = []
    doms = res["domains"]
    esft, t3, pesc = grouped(res["esft"]), grouped(res["table3"]), grouped(res["pesc"])
    moe_total = res["models"]["moe"]["parameters"]["total"]
    dense_total = res["models"]["dense"]["parameters"]["total"]
    gpu = any(r.get("peak_gpu_bytes") for r in res["esft"] + res["pesc"])
    mem_name = "peak GPU memory" if gpu else "peak RSS"

    rows = []
    for name, info in res["models"].items():
        p = info["parameters"]
        rows.append([name, info["architecture"], num(p["total"], "params"), num(p["active"], "params"),
                     num(p["embedding"], "params"), num(info["tokens_seen"], "params"), str(info["steps"]),
                     num(info["wall_s"], "s"), *[num(info["heldout_ppl"][d]) for d in doms], info["precision"]])
    out.append(("Pretrained models", ["model", "class", "parameters", "active / token", "embeddings", "tokens seen",
                                      "steps", "time", *[f"held-out ppl {d}" for d in doms], "precision"], rows,
                "Pretraining (pretrain.py) by: " + "; ".join(sorted({i["command"] for i in res["models"].values()}))
                + ". Held-out perplexity over the first windows of each domain's held-out split."))
    rows = [[n, s["domain"], "yes" if s["available"] else f"no ({s['package']})", str(s["documents"]),
             str(s["heldout_documents"]), f"{s['bytes'] / 1e6:.2f}"] for n, s in res["corpus"]["sources"].items()]
    out.append(("Corpus", ["source", "domain", "installed", "documents", "held out", "MB"], rows,
                f"Held-out rule: {res['corpus']['split_rule']}; tokenizer: byte-level BPE, "
                f"{res['tokenizer']['vocab_size']} tokens."))

    out.append(side_by_side(res, cite))
    extra = sorted({k for r in esft["vanilla"] for k in r["scores"] if ":" in k})  # e.g. the intent label
    keys = [k for t in TASKS for k in (t, *[x for x in extra if x.startswith(t + ":")])]
    headers = ["method", "lr", *[f"{k.split(':')[0]} ({task_score(esft['vanilla'], k)['metric']})" for k in keys],
               "mean", *[f"{t} val loss" for t in TASKS], "commands"]
    one = lambda x: f"{x:.1f}"  # noqa: E731
    rows = []
    for m, rs in esft.items():
        ms, s = mean_score(rs)
        rows.append([m, num(rs[0]["lr"]), *[spread(per_seed(rs, lambda x, k=k: score_of(x, k)), one) for k in keys],
                     f"{ms:.1f} ± {s:.1f}",
                     *[spread(per_seed([r for r in rs if r["task"] == t], val_loss)) for t in TASKS],
                     cite(*[r["train_step"] for r in rs], *[e for r in rs for e in r["eval_steps"]])])
    n_test = ", ".join(f"{t}: n={task_score(esft['vanilla'], t)['n']}" for t in TASKS)
    majority = res.get("intent_label_majority")
    passes = ", ".join(f"{t} {d['passes']} passes over {d['unique_train_records']} rows"
                       for t, d in res["data"]["tasks"].items())
    out.append(("ESFT Table 1 in miniature: task performance (MoE model)", headers, rows,
                f"Scores 0-100 on the test sets ({n_test}) as mean ± half-range over seeds; 'mean': mean over "
                f"the tasks' own metrics ± one binomial standard error (items of all seeds pooled). "
                + (f"intent (intent_label): the intent label alone, slots ignored (answering the test set's most "
                   f"frequent label every time scores {majority:.1f}). " if majority is not None else "")
                + "Each fine-tuned "
                f"row is a model trained on that task alone, mixed {res['scale']['mix_ratio']:.0%} with alignment "
                f"text ({passes}). Val loss: final loss of that training run on the task's validation rows "
                f"(lower is better; not measured for the untrained model)."))

    rows = []
    for m, rs in esft.items():
        rows.append([m, *[f"{mean([r['ppl'][d]['ppl'] for r in rs]):.2f} ({pct(ppl_change(rs, esft['vanilla'], d))})"
                          for d in doms], pct_spread(per_seed(rs, lambda x: general_change(x, esft["vanilla"], doms))),
                     cite(*[r["ppl"][d]["step"] for r in rs for d in doms])])
    out.append(("ESFT Table 2 in miniature: general ability kept (held-out perplexity per pretraining domain)",
                ["method", *[f"{d} ppl (change)" for d in doms], "mean change", "commands"], rows,
                "Lower is better; averaged over the per-task models (and seeds; mean change ± half-range over seeds); "
                "change relative to the vanilla model. The "
                "alignment stand-in mixed into training is training-split text of these domains, so fine-tuning also "
                "continues pretraining and perplexity can fall below the vanilla model's."))

    rows = []
    for m, rs in [*esft.items(), *t3.items()]:
        if m == "vanilla":
            continue
        tp = mean([r["trainable_params"] for r in rs])
        sel = [r["selected_fraction"] for r in rs if "selected_fraction" in r]
        rows.append([m, num(tp, "params"), f"{100 * tp / moe_total:.2f}%", f"{100 * mean(sel):.1f}%" if sel else "",
                     num(mean([r["step_s"] for r in rs]), "s"), num(mean([mem(r) for r in rs]), "B"),
                     num(mean([r["artifact_bytes"] for r in rs]), "B"),
                     f"{100 * mean([r['artifact_bytes'] / r['base_bytes'] for r in rs]):.1f}%",
                     cite(*[r["train_step"] for r in rs])])
    out.append(("ESFT efficiency (paper §5.2, Table 3 parameters)",
                ["method", "trainable parameters", "of all", "routed experts trained", "step time", mem_name,
                 "artifact", "of base", "commands"], rows,
                "Step time from moecraft's tokens/s (batch x seq_len / tokens per second, checkpoint writes included); "
                f"peak memory of the training process; means over tasks. Base model: {num(moe_total, 'params')} parameters."))

    config = {"fft": ("all", "✓", "✓"), "esft-gate+shared+non-expert": ("relevant", "✓", "✓"),
              "esft-gate+shared": ("relevant", "✓", "×"), "esft-gate": ("relevant", "×", "×"),
              "vanilla": ("×", "×", "×")}
    rows = []
    for m, (rel, sh, ne) in config.items():
        rs = (esft | t3).get(m)
        if rs:
            ms, s = mean_score(rs)
            rows.append([m, rel, sh, ne, num(mean([r["trainable_params"] for r in rs]), "params"), f"{ms:.1f} ± {s:.1f}",
                         num(val_loss(rs)), pct(mean([ppl_change(rs, esft["vanilla"], d) for d in doms])),
                         cite(*[r["train_step"] for r in rs], *[e for r in rs for e in r["eval_steps"]])])
    out.append(("ESFT Table 3 in miniature: shared vs non-shared parameters",
                ["config", "routed experts", "shared experts", "non-expert modules", "trainable", "specialized (mean score)",
                 "specialized (task val loss)", "general (mean ppl change)", "commands"], rows,
                "Rows 'shared experts only' (× ✓ ×, × ✓ ✓) are not in this experiment's plan yet (moecraft "
                "trains them: an expert config with no routed expert plus --train-shared-experts)."))

    rows = [[t, fn, str(s["p"]), f"{100 * s['selected_fraction']:.1f}%",
             " ".join(f"L{k}:{v}" for k, v in s["per_layer"].items()), cite(s["step"])]
            for t, fns in res["selection"].items() for fn, s in fns.items()]
    out.append(("ESFT expert selection (eq. 8, the paper's p)", ["task", "score", "p", "routed experts selected",
                                                                 "per MoE layer", "commands"], rows, ""))
    if res.get("two_stage"):
        rows = [[t["task"], str(t["seed"]), str(t["base_selected"]), str(t["selected"]), str(t["shared"]),
                 cite(t["step"])] for t in res["two_stage"]]
        out.append(("Two-stage selection: experts chosen after router tuning vs on the base model",
                    ["task", "seed", "experts (base model, gate)", "experts (router-tuned model, gate)",
                     "in both", "commands"], rows,
                    "Same scoring sample and p; the router-tuned model is the 'router' run of that task and seed, "
                    "merged into the base (moecraft merge); the two-stage row trains these experts of the base."))

    pr = res["probe"]
    rows = [[lab, *[f"{v:.2f}" for v in row]] for lab, row in zip(pr["labels"], pr["shared_top_k"])]
    out.append(("ESFT Figure 2 in miniature: shared top-k experts between samples", ["", *pr["labels"]], rows,
                f"Mean over MoE layers of |top-{pr['k']}(A) ∩ top-{pr['k']}(B)| by token selection ratio; "
                f"a and b are disjoint halves of one task's training data. Same task (a vs b): "
                f"{pr['same_task_mean']:.2f}; different tasks: {pr['cross_task_mean']:.2f}; random expert sets: "
                f"{pr['chance']:.2f}. Tokens per sample: {min(pr['n_tokens'].values())}-{max(pr['n_tokens'].values())}. "
                f"Commands: {cite(pr['step'])}."))

    rows = [[s["model"], s["method"], num(s["lr"]), f"{s['eval_loss']:.4f}",
             "✓" if res["chosen_lr"][s["model"]].get(s["method"]) == s["lr"] else "", cite(s["step"])]
            for s in res["sweep"]]
    grid = sorted(res["scale"]["lr_grid"])
    edge = [f"{model}/{m} ({'highest' if lr == grid[-1] else 'lowest'})" for model, lrs in res["chosen_lr"].items()
            for m, lr in lrs.items() if len(grid) > 1 and lr in (grid[0], grid[-1])]
    out.append(("Learning-rate choice (validation loss)", ["model", "method", "lr", "final validation loss", "chosen",
                                                           "commands"], rows,
                "As in the paper, one rate per method from a small grid; chosen on the first task (MoE) or the mix "
                "(dense), seed " + str(res["scale"]["seeds"][0]) + "; the other seeds reuse it."
                + (f" Expert-selective variants (esft-lora, esft-router, router): reduced grid "
                   f"{res['scale']['variant_lr_grid']}; two-stage uses esft-gate's rate." if res["scale"].get("variant_lr_grid")
                   else "") + (" Chosen at an edge of the grid, so the best rate may lie beyond it: " + ", ".join(edge)
                              + "." if edge else "")))

    rows = []
    for m, rs in pesc.items():
        ms, s = mean_score(rs)
        tp = mean([r["trainable_params"] for r in rs])
        rows.append([m, num(rs[0]["lr"]), *[spread(per_seed(rs, lambda x, t=t: score_of(x, t)), one) for t in TASKS],
                     f"{ms:.1f} ± {s:.1f}", spread(per_seed(rs, val_loss)),
                     *[pct(ppl_change(rs, pesc["vanilla"], d)) for d in doms], num(tp, "params"),
                     f"{100 * tp / dense_total:.2f}%", num(mean([r.get("step_s") for r in rs]), "s"),
                     num(mean([mem(r) for r in rs]), "B"), num(mean([r["artifact_bytes"] for r in rs]), "B"),
                     cite(*[r["train_step"] for r in rs], *[e for r in rs for e in r["eval_steps"]])])
    out.append(("PESC in miniature: dense model crafted into an MoE vs dense baselines (instruction mix)",
                ["method", "lr", *TASKS, "mean", "mix val loss", *[f"{d} ppl change" for d in doms], "trainable", "of base",
                 "step time", mem_name, "artifact", "commands"], rows,
                f"PESC: {res['scale']['pesc_num_experts']} adapter experts (dim {res['scale']['pesc_adapter_dim']}), "
                f"top-{res['scale']['pesc_top_k']}, unquantised base; lora-eq: LoRA of rank {res['lora_eq_rank']} on every "
                "linear layer, chosen to match PESC's trainable parameters; fft: every parameter."))
    return out


def side_by_side(res: dict, cite: Cites) -> Table:
    """Every MoE method in one table: cost (parameters, step time, memory) next to task fit (validation loss,
    intent label) and general ability kept (held-out perplexity change), with the seed spread."""
    esft, doms = grouped(res["esft"]), res["domains"]
    total = res["models"]["moe"]["parameters"]["total"]
    gpu = any(r.get("peak_gpu_bytes") for r in res["esft"])
    one = lambda x: f"{x:.1f}"  # noqa: E731
    rows = []
    for m, rs in esft.items():
        if m == "vanilla":
            rows.append([m, "", "0", "", "", "", *["n/a" for _ in TASKS], spread(per_seed(rs, lambda x: score_of(x, LABEL)), one),
                         "+0.0%", cite(*[e for r in rs for e in r["eval_steps"]])])
            continue
        tp = mean([r["trainable_params"] for r in rs])
        rows.append([m, num(rs[0]["lr"]), num(tp, "params"), f"{100 * tp / total:.2f}%",
                     spread(per_seed(rs, lambda x: mean([r["step_s"] for r in x])), lambda v: num(v, "s")),
                     spread(per_seed(rs, lambda x: mean([mem(r) for r in x])), lambda v: num(v, "B")),
                     *[spread(per_seed([r for r in rs if r["task"] == t], val_loss)) for t in TASKS],
                     spread(per_seed(rs, lambda x: score_of(x, LABEL)), one),
                     pct_spread(per_seed(rs, lambda x: general_change(x, esft["vanilla"], doms))),
                     cite(*[r["train_step"] for r in rs], *[e for r in rs for e in r["eval_steps"]])])
    seeds = res["scale"]["seeds"]
    return ("Methods side by side (MoE model): cost, task fit, general ability",
            ["method", "lr", "trainable parameters", "of all", "step time", "peak GPU memory" if gpu else "peak RSS",
             *[f"{t} val loss" for t in TASKS], "intent label (0-100)", "general: held-out ppl change", "commands"],
            rows,
            f"Seeds {', '.join(map(str, seeds))}: mean ± half-range over seeds (step time and memory: means over the "
            "tasks). Trainable parameters: those the optimiser updates. esft-lora: LoRA (r 8, alpha 16) on the "
            "ESFT-Gate experts only (MoE-Sieve); esft-router: ESFT-Gate plus the routers of the layers with selected "
            "experts (CEFT); router: the routers alone; two-stage: ESFT-Gate's training on the experts selected with "
            "the router-tuned model (see the two-stage selection table). Val loss: final loss on the task's "
            f"validation rows (lower is better); intent label: share of the {(task_score(esft['vanilla'], LABEL) or {}).get('n')} "
            "intent test rows whose answer names the right intent (always answering the most frequent label: "
            f"{res.get('intent_label_majority', math.nan):.1f}); general: mean "
            "over the pretraining domains of the held-out perplexity change against the vanilla model.")


# ----------------------------------------------------------------------------- claims
def claims(res: dict) -> list[tuple[str, str, str]]:
    """(paper's claim, measured evidence, verdict) triples, all computed from ``res``."""
    esft, t3, pesc = grouped(res["esft"]), grouped(res["table3"]), grouped(res["pesc"])
    doms = res["domains"]
    out = []

    def verdict(diff: float, noise: float, comparable: bool, why: str) -> str:
        """``diff`` > 0 favours the claim; it counts beyond ``noise`` (2 SE, 1%, or the seed spread)."""
        if comparable:
            return "holds" if diff >= -noise else "does not hold"
        return "holds" if diff > noise else "does not hold" if diff < -noise else f"inconclusive (within {why})"

    def seeds_note(spread_: float) -> str:
        return f", seed spread {spread_:.2g}" if spread_ > 0 else ""

    def score_claim(claim: str, a: list[dict], b: list[dict], na: str, nb: str, comparable: bool) -> None:
        (sa, ea), (sb, eb) = mean_score(a), mean_score(b)
        diff, err = sa - sb, math.sqrt(ea**2 + eb**2)
        sp = sum(half_range(per_seed(x, lambda y: mean_score(y)[0])) for x in (a, b))
        if at_floor(a, b):
            v = "not testable here: every task score of both is within 2 SE of 0"
        else:
            v = verdict(diff, max(2 * err, sp), comparable, "2 SE or the seed spread")
        out.append((claim, f"mean task score {na} {sa:.1f} vs {nb} {sb:.1f} (difference {diff:+.1f}, 2 SE = "
                           f"{2 * err:.1f}{seeds_note(sp)})", v))

    def label_claim(claim: str, a: list[dict], b: list[dict], na: str, nb: str, comparable: bool) -> None:
        ta, tb = task_score(a, LABEL), task_score(b, LABEL)
        if not ta or not tb:
            return
        diff, err = ta["value"] - tb["value"], math.sqrt(se(ta) ** 2 + se(tb) ** 2)
        sp = sum(half_range(per_seed(x, lambda y: score_of(y, LABEL))) for x in (a, b))
        maj = res.get("intent_label_majority")
        if all(t["value"] <= 2 * se(t) for t in (ta, tb)):
            v = "not testable here: both within 2 SE of 0"
        else:
            v = verdict(diff, max(2 * err, sp), comparable, "2 SE or the seed spread")
            if maj is not None and all(t["value"] <= maj + 2 * se(t) for t in (ta, tb)):
                v += (f" (neither beats always answering the most frequent label, {maj:.1f}: this compares "
                      "learning the answer format, not the classification)")
        out.append((claim + " [intent label]", f"intent label {na} {ta['value']:.1f} vs {nb} {tb['value']:.1f} "
                                               f"(difference {diff:+.1f}, 2 SE = {2 * err:.1f}{seeds_note(sp)})", v))

    def loss_claim(claim: str, a: list[dict], b: list[dict], na: str, nb: str, comparable: bool) -> None:
        la, lb = val_loss(a), val_loss(b)
        ratio = 100 * (math.exp(la - lb) - 1)  # task perplexity of a relative to b
        sp = sum(half_range(per_seed(x, val_loss)) for x in (a, b))
        v = verdict(lb - la, max(math.log(1.01), sp), comparable, "1% or the seed spread")
        out.append((claim + " [task validation loss]", f"validation loss {na} {la:.3f} vs {nb} {lb:.3f} "
                                                       f"(task perplexity {pct(ratio)}{seeds_note(sp)})", v))

    def forget_claim(claim: str, a: list[dict], b: list[dict], base: list[dict], na: str, nb: str) -> None:
        ca, cb = (general_change(x, base, doms) for x in (a, b))
        sp = sum(half_range(per_seed(x, lambda y: general_change(y, base, doms))) for x in (a, b))
        v = verdict(cb - ca, max(1.0, sp), False, "1% or the seed spread")
        out.append((claim, f"held-out perplexity change vs vanilla: {na} {pct(ca)}, {nb} {pct(cb)}"
                           + (f" (seed spread {sp:.1f} points)" if sp else ""), v))

    for m in ("esft-gate", "esft-token"):
        for measure in (score_claim, label_claim, loss_claim):
            measure(f"{m} reaches task performance comparable to (or better than) FFT (Table 1)",
                    esft[m], esft["fft"], m, "fft", comparable=True)
        for measure in (score_claim, label_claim, loss_claim):
            measure(f"{m} outperforms LoRA on the tasks (Table 1)", esft[m], esft["lora"], m, "lora", comparable=False)
        forget_claim(f"{m} keeps general ability better than FFT (Table 2)", esft[m], esft["fft"], esft["vanilla"], m, "fft")
    # expert-selective variants (not in the ESFT paper: the claims of the papers that propose them)
    if esft.get("esft-lora") and esft.get("esft-gate"):
        for measure in (label_claim, loss_claim):
            measure("MoE-Sieve: LoRA on the selected experts fits the task about as well as training them fully "
                    "(esft-lora vs esft-gate)", esft["esft-lora"], esft["esft-gate"], "esft-lora", "esft-gate",
                    comparable=True)
        pa, pb = (mean([r["trainable_params"] for r in esft[m]]) for m in ("esft-lora", "esft-gate"))
        out.append(("MoE-Sieve: LoRA on the selected experts trains far fewer parameters than ESFT-Gate", f"esft-lora {num(pa, 'params')} vs esft-gate "
                    f"{num(pb, 'params')} ({pct(100 * (pa / pb - 1))})", "holds" if pa < pb else "does not hold"))
    if esft.get("esft-router") and esft.get("esft-gate"):
        for measure in (label_claim, loss_claim):
            measure("CEFT: also training the routers of the selected layers improves ESFT on the task "
                    "(esft-router vs esft-gate)", esft["esft-router"], esft["esft-gate"], "esft-router", "esft-gate",
                    comparable=False)
    if esft.get("two-stage") and esft.get("esft-gate"):
        for measure in (label_claim, loss_claim):
            measure("Router Lens / CEFT: experts selected after router tuning serve ESFT better than those of the base "
                    "model (two-stage vs esft-gate)", esft["two-stage"], esft["esft-gate"], "two-stage", "esft-gate",
                    comparable=False)
    for m in ("esft-lora", "esft-router", "router", "two-stage"):
        if esft.get(m):
            forget_claim(f"{m} keeps general ability better than FFT", esft[m], esft["fft"], esft["vanilla"], m, "fft")
    for m in ("esft-gate", "esft-token"):
        a, f = esft[m], esft["fft"]
        for what, key in (("storage (artifact size)", "artifact_bytes"), ("training time (step time)", "step_s"),
                          ("training memory", None)):
            va = mean([(r[key] if key else mem(r)) for r in a])
            vf = mean([(r[key] if key else mem(r)) for r in f])
            if math.isnan(va) or math.isnan(vf):
                continue
            out.append((f"{m} needs less {what} than FFT (§5.2)",
                        f"{m} {num(va, 'B' if key != 'step_s' else 's')} vs fft {num(vf, 'B' if key != 'step_s' else 's')} "
                        f"({pct(100 * (va / vf - 1))})", "holds" if va < vf else "does not hold"))
    fracs = {f"{t}/{fn}": s["selected_fraction"] for t, fns in res["selection"].items() for fn, s in fns.items()}
    inside = [k for k, v in fracs.items() if 0.05 <= v <= 0.15]
    out.append(("At the paper's p, ESFT trains 5-15% of the routed experts (§6.1)",
                ", ".join(f"{k} {100 * v:.1f}%" for k, v in fracs.items()),
                "holds" if len(inside) == len(fracs) else f"holds for {len(inside)} of {len(fracs)}"))
    pr = res["probe"]
    out.append(("Expert sets of one task are consistent across samples and distinct across tasks (Figure 2)",
                f"shared top-{pr['k']} experts: same task {pr['same_task_mean']:.2f}, different tasks "
                f"{pr['cross_task_mean']:.2f}, random sets {pr['chance']:.2f}",
                "holds" if pr["same_task_mean"] > pr["cross_task_mean"] else "does not hold"))
    both = esft | t3
    order = [m for m in ("esft-gate", "esft-gate+shared", "esft-gate+shared+non-expert", "fft") if both.get(m)]
    floor = at_floor(*[both[m] for m in order])  # then specialized performance is read from the validation loss
    rows = [(mean([r["trainable_params"] for r in both[m]]),
             -val_loss(both[m]) if floor else mean_score(both[m])[0],
             mean([ppl_change(both[m], esft["vanilla"], d) for d in doms])) for m in order]
    spec = "minus task validation loss (task scores all within 2 SE of 0)" if floor else "mean score"
    for i, (claim, col) in enumerate((("Specialized performance rises with the trainable parameters (Table 3)", 1),
                                      ("General performance falls as more shared parameters are trained (Table 3)", 2))):
        tau = kendall([r[0] for r in rows], [r[col] for r in rows])
        out.append((claim, f"Kendall tau between trainable parameters and {spec if i == 0 else 'perplexity change'} "
                           f"over {', '.join(order)}: {tau:+.2f}",
                    "holds" if tau > 0 else "does not hold" if tau < 0 else "inconclusive"))
    for measure in (score_claim, loss_claim):
        measure("PESC outperforms its dense counterpart tuned on the same instructions (dense FFT)",
                pesc["pesc"], pesc["fft"], "pesc", "fft", comparable=False)
    for measure in (score_claim, loss_claim):
        measure("The crafted MoE, not the parameter count, helps: PESC beats dense LoRA with as many trainable "
                "parameters", pesc["pesc"], pesc["lora-eq"], "pesc", "lora-eq", comparable=False)
    forget_claim("PESC mitigates forgetting compared with dense fine-tuning (FFT)", pesc["pesc"], pesc["fft"],
                 pesc["vanilla"], "pesc", "fft")
    return out


def kendall(x: list[float], y: list[float]) -> float:
    """Kendall's tau-a: (concordant - discordant pairs) / pairs."""
    prods = [(x[i] - x[j]) * (y[i] - y[j]) for i in range(len(x)) for j in range(i + 1, len(x))]
    return sum((p > 0) - (p < 0) for p in prods) / len(prods) if prods else 0.0


# ----------------------------------------------------------------------------- plots
def plots(layout: Layout, res: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths, doms = [], res["domains"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for kind in ("moe", "dense"):
        log = read_jsonl(layout.pretrain(kind) / "log.jsonl")
        ax.plot([r["step"] for r in log], [r["loss"] for r in log], label=f"{kind} ({res['models'][kind]['architecture']})")
    ax.set(xlabel="step", ylabel="training loss", title="pretraining")
    ax.legend()
    paths.append(_save(fig, out / "pretraining.png"))

    for key, title in (("esft", "ESFT (MoE model)"), ("pesc", "PESC (dense model)")):
        groups = grouped(res[key] + (res["table3"] if key == "esft" else []))
        base = groups["vanilla"]
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
        names = list(groups)
        width = 0.8 / len(TASKS)
        for i, t in enumerate(TASKS):
            vals = [(task_score(groups[m], t) or {"value": 0})["value"] for m in names]
            axes[0].bar([k + i * width for k in range(len(names))], vals, width, label=t)
        axes[0].set(title=f"{title}: task score", ylabel="score (0-100)")
        width = 0.8 / len(doms)
        for i, d in enumerate(doms):
            axes[1].bar([k + i * width for k in range(len(names))], [ppl_change(groups[m], base, d) for m in names],
                        width, label=d)
        axes[1].axhline(0, color="k", lw=0.5)
        axes[1].set(title=f"{title}: held-out perplexity change vs vanilla", ylabel="%")
        changes = [abs(ppl_change(groups[m], base, d)) for m in names for d in doms]
        if max(changes, default=0) > 300:  # one collapsed model would flatten every other bar on a linear axis
            axes[1].set_yscale("symlog", linthresh=10)
        for ax in axes:
            ax.set_xticks([k + 0.4 - width / 2 for k in range(len(names))], names, rotation=30, ha="right")
            ax.legend()
        paths.append(_save(fig, out / f"{key}.png"))

    rows = [r for r in res["esft"] + res["table3"] if r["method"] != "vanilla"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, (label, get) in zip(axes, (("trainable parameters", lambda r: r["trainable_params"]),
                                        ("artifact bytes", lambda r: r["artifact_bytes"]),
                                        ("step time (s)", lambda r: r["step_s"] or 0),
                                        ("peak memory (bytes)", lambda r: mem(r) or 0))):
        g = grouped(rows)
        ax.bar(list(g), [mean([get(r) for r in rs]) for rs in g.values()])
        ax.set(title=label, yscale="log" if label.startswith(("trainable", "artifact")) else "linear")
        ax.tick_params(axis="x", rotation=45)
    paths.append(_save(fig, out / "efficiency.png"))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for (model, method), pts in _sweep_series(res["sweep"]).items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{model}: {method}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="final validation loss", title="learning-rate choice")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "sweep.png"))
    return paths


def _sweep_series(sweep: list[dict]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    out: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for s in sweep:
        out[(s["model"], s["method"])].append((s["lr"], s["eval_loss"]))
    return out


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- output
def markdown_table(t: Table) -> str:
    title, headers, rows, note = t
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = [f"### {title}", "", "| " + " | ".join(map(esc, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines + ([f"\n{note}"] if note else []) + [""])


def html_table(t: Table) -> str:
    title, headers, rows, note = t
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return section(title, f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>", note=note or None)


PUBLISH = {"full": Path(__file__).parent, "cpu": Path(__file__).parent / "results-cpu"}  # scale -> folder in git


def stage_walls(layout: Layout) -> tuple[list[str], dict[str, float]]:
    """The run.py command lines and the wall time per stage, summed over the calls that did the work."""
    path = layout.root / "stages.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    walls: dict[str, float] = defaultdict(float)
    for r in rows:
        walls[r["stage"]] += r["wall_s"]
    return sorted({r["command"] for r in rows}), dict(walls)


def command_span(layout: Layout) -> str:
    """When the logged moecraft commands ran (start of the first to end of the last), for runs whose experiments
    stage was split over calls or parts (``run.py --parts``)."""
    import datetime as dt

    path = layout.root / "commands.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    if not rows:
        return ""
    ends = [dt.datetime.strptime(r["finished"], "%Y-%m-%d %H:%M:%S") for r in rows]
    start = min(e - dt.timedelta(seconds=r["wall_s"]) for e, r in zip(ends, rows))
    return (f" The moecraft commands ran from {start:%H:%M} to {max(ends):%H:%M} "
            f"({(max(ends) - start).total_seconds() / 60:.0f} min, local time of the machine).")


def header(layout: Layout, res: dict) -> tuple[str, str]:
    """(Markdown banner, one-line meta) stating scale, machine, seeds, sizes and the commands that ran."""
    sc, mach, models = res["scale"], res["machine"], res["models"]
    commands, walls = stage_walls(layout)
    machine = (f"{mach['gpu']} ({mach.get('gpu_memory_gib', '?')} GiB) with " if "gpu" in mach else "") + (
        f"a {mach['cpu_count']}-core CPU ({mach['cpu']})" + ("" if "gpu" in mach else ", no GPU"))
    versions = f"torch {mach['torch']}, transformers {mach['transformers']}, CUDA {mach['cuda']}"
    meta = (f"Scale '{sc['name']}'; seeds {list(sc['seeds'])}; machine: {machine}; {versions}. Commands run inside "
            f"the output folder ({layout.root.name}/).")
    sizes = "; ".join(f"{k}: {models[k]['architecture']}, {num(models[k]['parameters']['total'], 'params')} parameters "
                      f"({num(models[k]['parameters']['active'], 'params')} active per token), pretrained on "
                      f"{num(models[k]['tokens_seen'], 'params')} tokens in {models[k]['wall_s'] / 60:.0f} min"
                      for k in ("moe", "dense"))
    lines = []
    if sc["name"] == "smoke":
        lines.append("**Smoke run: tiny models and a few steps on CPU. The numbers only show that the pipeline works; "
                     "they say nothing about the papers.**")
    elif sc["name"] != "full":
        seeds = ", ".join(map(str, sc["seeds"]))
        lines.append(f"**Scale '{sc['name']}': a much smaller version of the full run, on {machine}. "
                     + (f"One seed ({seeds}), so run-to-run variation is not measured. " if len(sc["seeds"]) == 1
                        else f"Seeds {seeds}. ")
                     + "The verdicts say what this miniature shows, not whether the papers hold at their scale.**")
    lines.append(meta)
    lines.append(f"Models: {sizes}. Fine-tuning: {sc['steps']} steps of {sc['batch_size']} x {sc['seq_len']} tokens, "
                 f"learning rate from {list(sc['lr_grid'])}"
                 + (f" (expert-selective variants: {list(sc['variant_lr_grid'])})" if sc.get("variant_lr_grid") else "")
                 + (f"; PESC comparison on seeds {list(sc['pesc_seeds'])}" if sc.get("pesc_seeds") else "") + ".")
    if commands:
        repeat = any("--time-budget" in c for c in commands)  # exit 3 = budget spent, same call again
        lines.append(("Command (repeated until it exited 0): " if repeat else "Command: ")
                     + "; ".join(f"`{c}`" for c in commands) + ". Wall time per stage: "
                     + ", ".join(f"{st} {w / 60:.1f} min" for st, w in walls.items())
                     + f" (total {sum(walls.values()) / 60:.0f} min)." + command_span(layout))
    return "\n\n".join(lines), meta


def write(layout: Layout, publish: bool = False) -> list[Path]:
    """Write RESULTS.md and report/ (report.html and the plots); with ``publish`` also copy them into the
    scale's folder under bench/replicate (``PUBLISH``)."""
    res = read_json(layout.exp / "results.json")
    cmds = records(layout.root)
    cite = Cites()
    tabs = tables(res, cite)
    verdicts = claims(res)
    smoke = res["scale"]["name"] == "smoke"
    banner, meta = header(layout, res)
    claim_rows = [[c, e, v] for c, e, v in verdicts]
    claim_table: Table = ("Where the papers' claims hold at this scale and where not", ["paper's claim", "measured here",
                                                                                         "verdict"], claim_rows,
                          "Computed from the tables below by report.py (rules in its docstring).")
    appendix = [[cid, f"`{cmds[s]['command']}`" if s in cmds else s, num(cmds.get(s, {}).get("wall_s"), "s")]
                for s, cid in cite.ids.items()]
    stage_cmds, _ = stage_walls(layout)
    cmd_table: Table = ("Commands", ["id", "command", "wall time"], appendix,
                        "Pipeline commands (corpus, tokenizer, pretraining, data files): " + "; ".join(stage_cmds))
    report_dir = layout.root / "report"
    figs = plots(layout, res, report_dir)
    probe_png = layout.exp / "probe" / "analysis" / "overlap_shared_topk.png"
    if probe_png.is_file():
        figs.append(Path(shutil.copyfile(probe_png, report_dir / "probe_overlap.png")))
    md = "\n".join(["# Miniature replication of ESFT and PESC: results", "", banner, "",
                    "Produced by `python bench/replicate/run.py`; see bench/replicate/README.md. Plots: "
                    + ", ".join(f"[{f.stem}](report/{f.name})" for f in figs) + " (all in `report/report.html`).", "",
                    *[markdown_table(t) for t in [claim_table, *tabs, cmd_table]]])
    results_md = layout.root / "RESULTS.md"
    results_md.write_text(md, encoding="utf-8")
    sections = [section("Plots", *[image_html(p) for p in figs]),
                *[html_table(t) for t in [claim_table, *tabs, cmd_table]]]
    report = write_report(report_dir / "report.html", "Miniature replication of ESFT and PESC", sections,
                          ("SMOKE RUN (plumbing only). " if smoke else "") + banner.replace("**", ""))
    written = [results_md, report]
    dest = PUBLISH.get(res["scale"]["name"]) if publish else None
    if dest:
        (dest / "report").mkdir(parents=True, exist_ok=True)
        written.append(Path(shutil.copyfile(results_md, dest / "RESULTS.md")))
        written += [Path(shutil.copyfile(f, dest / "report" / f.name)) for f in [report, *figs]]
    return written
