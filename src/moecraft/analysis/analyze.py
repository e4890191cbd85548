"""``moecraft analyze``: routing plots and numbers from score files, as PNGs, JSON and one HTML report."""

from __future__ import annotations

import json
from pathlib import Path

from moecraft.analysis import plots
from moecraft.analysis.config import AnalyzeConfig
from moecraft.analysis.report import image_html, section, table_html, write_report
from moecraft.analysis.routing import (
    concentration,
    jaccard_selected,
    overlap_matrix,
    selections,
    shared_top_k,
)
from moecraft.errors import MoecraftError


def _parse_sources(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for s in specs:
        label, sep, path = s.partition("=")
        if not sep:
            label, path = Path(s).stem, s
        out.append((label, path))
    labels = [lab for lab, _ in out]
    if len(set(labels)) != len(labels):
        raise MoecraftError(f"score labels must be unique, got {labels}; label them as name=path")
    return out


def _top_k(k: int | None, scores) -> int:
    """``--k`` (default: the model's experts per token), at most the model's experts per layer."""
    if k is not None and k > scores.num_experts:
        raise MoecraftError(f"--k {k} is more than the {scores.num_experts} experts per layer of the scores")
    return k or scores.top_k


def analyze(cfg: AnalyzeConfig) -> tuple[dict, list[str]]:
    """Numbers (JSON-ready dict) and HTML sections; PNGs are written under ``cfg.out``."""
    from moecraft.esft.selection import DEFAULT_P
    from moecraft.esft.stats import ExpertScores

    if not cfg.scores and not (cfg.before and cfg.after):
        raise MoecraftError("nothing to analyze: give --scores files and/or both --before and --after")
    if bool(cfg.before) != bool(cfg.after):
        raise MoecraftError("--before and --after go together")
    p = cfg.p if cfg.p is not None else DEFAULT_P[cfg.score]
    out = Path(cfg.out)
    numbers: dict = {"score": cfg.score, "p": p}
    html: list[str] = []
    if cfg.scores:
        srcs = _parse_sources(cfg.scores)
        loaded = [ExpertScores.load(path) for _, path in srcs]
        labels = [lab for lab, _ in srcs]
        ref = loaded[0]
        for (_, path), s in zip(srcs, loaded):
            if (s.layers, s.num_experts) != (ref.layers, ref.num_experts):
                raise MoecraftError(f"{path}: layers/experts differ from {srcs[0][1]}; all score files must be of one model")
        mats = [s.scores(cfg.score) for s in loaded]
        k = _top_k(cfg.k, ref)
        conc = {lab: concentration(m, cfg.ps) for lab, m in zip(labels, mats)}
        shared = overlap_matrix(mats, shared_top_k, k)
        jac = overlap_matrix(mats, jaccard_selected, p)
        sel_sizes = {lab: [len(x) for x in selections(m, p)] for lab, m in zip(labels, mats)}
        numbers.update({
            "tasks": labels, "layers": ref.layers, "num_experts": ref.num_experts, "top_k": ref.top_k, "k": k,
            "n_tokens": {lab: s.n_tokens for lab, s in zip(labels, loaded)},
            "concentration": {lab: {str(pp): c[:, j].tolist() for j, pp in enumerate(cfg.ps)} for lab, c in conc.items()},
            "selected_per_layer": sel_sizes,
            "shared_top_k": shared.tolist(), "jaccard_selected": jac.tolist(),
        })
        name = "token selection ratio (eq. 6)" if cfg.score == "token" else "average gate score (eq. 5)"
        f1 = plots.usage_heatmaps(mats, labels, ref.layers, out / "usage_heatmaps.png", name)
        f2 = plots.concentration_plot(conc, cfg.ps, ref.layers, ref.num_experts, out / "concentration.png")
        html.append(section("Expert usage per layer", image_html(f1), note=f"{name}; rows are MoE layers."))
        rows = [[lab, s.n_tokens, *[f"{float(c[:, j].float().mean()):.2f}" for j in range(len(cfg.ps))],
                 f"{sum(sel_sizes[lab]) / len(sel_sizes[lab]):.2f}"] for (lab, c), s in zip(conc.items(), loaded)]
        html.append(section(
            "Concentration", image_html(f2),
            table_html(["task", "tokens", *[f"experts for {pp:.0%} (mean over layers)" for pp in cfg.ps],
                        f"selected at p={p} (eq. 8)"], rows),
            note=f"How few of the {ref.num_experts} experts of each layer hold a share p of its {cfg.score} score mass."))
        if len(mats) > 1:
            f3 = plots.matrix_plot(shared, labels, f"shared top-{k} experts (mean over layers)",
                                   out / "overlap_shared_topk.png", vmax=k)
            f4 = plots.matrix_plot(jac, labels, f"Jaccard of selected experts, p={p}", out / "overlap_jaccard.png",
                                   vmax=1.0)
            html.append(section(
                "Overlap between tasks", image_html(f3), image_html(f4),
                table_html(["", *labels], [[a, *[float(v) for v in shared[i]]] for i, a in enumerate(labels)],
                           caption=f"shared top-{k} experts, mean over layers (0..{k})"),
                table_html(["", *labels], [[a, *[float(v) for v in jac[i]]] for i, a in enumerate(labels)],
                           caption=f"Jaccard index of the eq. 8 selections at p={p}, mean over layers"),
                note="As in the ESFT paper's Figure 2: the number of top-k experts two score sets share per layer, "
                     "averaged over layers. Two samples of one task should share more than two different tasks."))
    if cfg.before and cfg.after:
        b, a = ExpertScores.load(cfg.before), ExpertScores.load(cfg.after)
        if (b.layers, b.num_experts) != (a.layers, a.num_experts):
            raise MoecraftError(f"{cfg.before} and {cfg.after} are of different models (layers/experts differ)")
        mb, ma = b.scores(cfg.score), a.scores(cfg.score)
        k = _top_k(cfg.k, b)
        ba = {"shared_top_k": shared_top_k(mb, ma, k), "jaccard_selected": jaccard_selected(mb, ma, p),
              "mean_abs_change": float((ma - mb).abs().mean()), "max_abs_change": float((ma - mb).abs().max()),
              "concentration_before": concentration(mb, cfg.ps).float().mean(0).tolist(),
              "concentration_after": concentration(ma, cfg.ps).float().mean(0).tolist()}
        numbers["before_after"] = ba
        f5 = plots.before_after_plot(mb, ma, b.layers, out / "before_after.png", cfg.score)
        html.append(section(
            "Before / after training", image_html(f5),
            table_html(["measure", "value"], [
                [f"shared top-{k} experts (mean over layers)", ba["shared_top_k"]],
                [f"Jaccard of selections at p={p}", ba["jaccard_selected"]],
                ["mean |after - before|", ba["mean_abs_change"]], ["max |after - before|", ba["max_abs_change"]],
                *[[f"experts for {pp:.0%}: before -> after", f"{x:.2f} -> {y:.2f}"]
                  for pp, x, y in zip(cfg.ps, ba["concentration_before"], ba["concentration_after"])]]),
            note=f"{cfg.before} -> {cfg.after}"))
    return numbers, html


def run_analyze(cfg: AnalyzeConfig) -> Path:
    """Write PNGs, analysis.json, report.html and run_info.json under ``cfg.out``; returns the report path.

    Written into a temporary sibling of ``cfg.out`` and renamed when complete (:func:`moecraft.files.output_folder`).
    """
    from dataclasses import replace

    from moecraft.files import output_folder
    from moecraft.runinfo import write_run_info

    inputs = [path for _, path in _parse_sources(cfg.scores)] + [cfg.before, cfg.after]
    with output_folder(cfg.out, inputs=inputs, overwrite=cfg.overwrite) as tmp:
        numbers, html = analyze(replace(cfg, out=tmp))
        (tmp / "analysis.json").write_text(json.dumps(numbers, indent=2) + "\n")
        write_report(tmp / "report.html", cfg.title, html)
        write_run_info(tmp, cfg)
    return Path(cfg.out) / "report.html"


