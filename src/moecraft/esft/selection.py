"""ESFT expert selection (ESFT §3.3, eq. 8) and the expert config that training reads.

Per MoE layer l, sort the experts by relevance score R^l_i (average gate score, eq. 5, or token
selection ratio, eq. 6) and keep the smallest top-scoring set E^l_s whose cumulative score reaches the
threshold p in (0, 1]:  sum_{i in E^l_s} R^l_i >= p  (eq. 8).

About p across families: token selection ratios sum to 1 in every layer, but gate scores sum to 1 only
for routers that renormalise the top-k weights (Mixtral, Qwen3-MoE, DeepSeek-V3, GPT-OSS). DeepSeek-V2,
OLMoE and Qwen2-MoE keep raw softmax values, whose top-k mass is well under 1, so the same p selects
relatively more experts there, and a p above a layer's total mass selects every expert. ``normalize``
divides each layer's scores by their sum first, which makes p mean "share of the layer's mass" everywhere.

``top_share`` S is the alternative rule of MoE-Sieve (arXiv 2603.24044, which keeps the ~25% most-routed
experts per layer): the ceil(S * E) highest-scoring of a layer's E routed experts, whatever their mass.

Several score files (tasks): each is selected with the same rule, then the sets are combined per layer
(``union``: experts selected for any task, ``intersection``: for every task); their overlap is reported.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch

from moecraft.errors import MoecraftError
from moecraft.esft.config import SelectConfig
from moecraft.files import output_file, read_json, write_json

FORMAT = "moecraft.expert_config/1"
# The paper's thresholds: p = 0.1 for the average gate score, p = 0.2 for the token selection ratio.
DEFAULT_P = {"gate": 0.1, "token": 0.2}
# Cumulative sums of floats may land a hair under an exactly reachable p (e.g. 0.1 + 0.2 < 0.3).
_EPS = 1e-12


def _in_unit_interval(value: float, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or not 0.0 < value <= 1.0:
        raise MoecraftError(f"{what} must be in (0, 1], got {value!r}")
    return float(value)


def check_p(p: float) -> float:
    return _in_unit_interval(p, "threshold p")


def check_share(share: float) -> float:
    return _in_unit_interval(share, "top_share")


def top_share_count(share: float, n_experts: int, max_experts: int | None = None) -> int:
    """ceil(share * n_experts), capped by ``max_experts``, on the decimal value of ``share`` as written: 0.3
    of 10 experts is 3, not the 4 that float rounding (0.3 * 10 = 3.0000000000000004) would give."""
    n = math.ceil(Fraction(repr(check_share(share))) * n_experts)
    return n if max_experts is None else min(n, max_experts)


def select_top_share(scores: torch.Tensor, share: float, max_experts: int | None = None) -> list[int]:
    """MoE-Sieve's rule for one layer: the ceil(share * E) highest-scoring of its E experts.

    Ties are broken as in :func:`select_layer`: by the lower expert index (a stable sort on the negated
    scores), so equal scores at the cut keep the lower ids. ``max_experts`` then truncates the set.
    Returns ids best-first.
    """
    if max_experts is not None and max_experts < 1:
        raise MoecraftError(f"max_experts must be >= 1, got {max_experts}")
    s = scores.detach().to(torch.float64).flatten()
    n = top_share_count(share, len(s), max_experts)
    return torch.sort(-s, stable=True).indices[:n].tolist()


def select_layer(
    scores: torch.Tensor, p: float, normalize: bool = False, max_experts: int | None = None
) -> list[int]:
    """Eq. 8 for one layer: the fewest highest-scoring experts whose scores sum to at least ``p``.

    Ties are broken by the lower expert index. If even all experts stay under ``p`` (un-normalised gate
    scores), all experts are selected. ``max_experts`` then truncates the set. Returns ids best-first.
    """
    check_p(p)
    if max_experts is not None and max_experts < 1:
        raise MoecraftError(f"max_experts must be >= 1, got {max_experts}")
    s = scores.detach().to(torch.float64).flatten()
    if normalize:
        total = s.sum()
        if total <= 0:
            raise MoecraftError("cannot normalise a layer whose scores are all zero")
        s = s / total
    # stable sort on -score: equal scores keep index order
    order = torch.sort(-s, stable=True).indices
    cumulative = torch.cumsum(s[order], dim=0)
    reached = torch.nonzero(cumulative >= p - _EPS)
    n = int(reached[0]) + 1 if len(reached) else len(s)
    if max_experts is not None:
        n = min(n, max_experts)
    return order[:n].tolist()


@dataclass
class ExpertConfig:
    """Which routed experts of which layers to train; written by ``select``, read by ``train``."""

    model: str
    family: str
    score_function: str
    p: float | None  # None when selected by top_share
    experts: dict[int, list[int]]  # decoder-layer index -> routed expert ids (best first)
    num_experts: int
    top_k: int
    normalized: bool = False
    max_experts_per_layer: int | None = None
    train_shared_experts: bool = False
    train_non_expert_modules: bool = False
    scores: dict[int, list[float]] = field(default_factory=dict)  # several files: their mean
    warnings: list[str] = field(default_factory=list)
    top_share: float | None = None
    combine: str | None = None  # 'union' or 'intersection' of several files' selections
    sources: list[str] = field(default_factory=list)  # the scores files selected from
    selections: dict[str, dict[int, list[int]]] = field(default_factory=dict)  # per source, when several

    @property
    def selected_fraction(self) -> float:
        """Share of all routed-expert parameters selected (all routed experts have the same size)."""
        n_layers = max(len(self.experts), 1)
        return sum(len(v) for v in self.experts.values()) / (n_layers * self.num_experts)

    def selected_mass(self, layer: int) -> float:
        row = self.scores.get(layer)
        return float(sum(row[i] for i in self.experts[layer])) if row else float("nan")

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "model": self.model,
            "family": self.family,
            "score_function": self.score_function,
            "p": self.p,
            "top_share": self.top_share,
            "combine": self.combine,
            "sources": self.sources,
            "normalized": self.normalized,
            "max_experts_per_layer": self.max_experts_per_layer,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "train_shared_experts": self.train_shared_experts,
            "train_non_expert_modules": self.train_non_expert_modules,
            # the same two options under the names the official ESFT scripts read (esft.to_esft)
            **official_flags(self.train_shared_experts, self.train_non_expert_modules),
            "selected_fraction": self.selected_fraction,
            "experts": {str(k): v for k, v in self.experts.items()},
            "selected_mass": {str(k): self.selected_mass(k) for k in self.experts},
            "scores": {str(k): v for k, v in self.scores.items()},
            "selections": {name: {str(k): v for k, v in sel.items()} for name, sel in self.selections.items()},
            "warnings": self.warnings,
        }

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> ExpertConfig:
        """Read and check an expert config (moecraft's, or the official ESFT format: ``experts`` plus
        ``shared_experts`` / ``non_expert_modules``): layer keys, expert ids (integers, in range, unique),
        and the type of every other field. Any problem is a MoecraftError naming the file."""
        d = read_json(path, "expert config")
        if not isinstance(d.get("experts"), dict):
            raise MoecraftError(f"{path}: not an expert config (no 'experts' mapping of layer -> expert ids)")

        def number(key: str, kind: type, default):
            value = d.get(key, default)
            if value is None and default is None:
                return None
            bad = isinstance(value, bool) or not isinstance(value, (int, float))
            if bad or (kind is int and not float(value).is_integer()) or (kind is int and value < 0):
                what = "a non-negative integer" if kind is int else "a number"
                raise MoecraftError(f"{path}: '{key}' must be {what}, got {value!r}")
            return kind(value)

        def flag(*keys: str) -> bool:
            """One option under moecraft's name, the official ESFT name, or both (then they must agree)."""
            ours, official = (keys + (None,))[:2]
            if official is not None and ours in d and official in d and d[ours] != d[official]:
                raise MoecraftError(f"{path}: '{ours}' is {d[ours]!r} but '{official}' (its official ESFT name) is "
                                    f"{d[official]!r}; make them agree or drop one")
            for key in keys:
                if key in d:
                    if not isinstance(d[key], bool):
                        raise MoecraftError(f"{path}: '{key}' must be true or false, got {d[key]!r}")
                    return d[key]
            return False

        def text(key: str) -> str:
            value = d.get(key, "")
            if not isinstance(value, str):
                raise MoecraftError(f"{path}: '{key}' must be a string, got {value!r}")
            return value

        num_experts = number("num_experts", int, 0)
        experts = _expert_ids(d["experts"], path, "experts", num_experts)
        selections = d.get("selections", {})
        if not isinstance(selections, dict) or not all(isinstance(v, dict) for v in selections.values()):
            raise MoecraftError(f"{path}: 'selections' must map a scores file to its layer -> expert ids")
        selections = {name: _expert_ids(sel, f"{path}: selections[{name!r}]", "selections", num_experts)
                      for name, sel in selections.items()}
        sources = d.get("sources", [])
        if not isinstance(sources, list) or not all(isinstance(x, str) for x in sources):
            raise MoecraftError(f"{path}: 'sources' must be a list of file names")
        combine = d.get("combine")
        if combine not in (None, "union", "intersection"):
            raise MoecraftError(f"{path}: 'combine' must be 'union', 'intersection' or null, got {combine!r}")
        scores = d.get("scores", {})
        if not isinstance(scores, dict):
            raise MoecraftError(f"{path}: 'scores' must map layer index -> list of expert scores")
        score_rows: dict[int, list[float]] = {}
        for layer, key, row in _layer_items(scores, path, "scores"):
            if (not isinstance(row, list) or not all(_finite(v) for v in row)
                    or (num_experts and len(row) != num_experts)
                    or any(i >= len(row) for i in experts.get(layer, []))):
                raise MoecraftError(f"{path}: scores of layer {key} must be a list of finite numbers, one per "
                                    f"expert{f' ({num_experts})' if num_experts else ''}")
            score_rows[layer] = [float(v) for v in row]
        warnings = d.get("warnings", [])
        if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
            raise MoecraftError(f"{path}: 'warnings' must be a list of strings")
        return cls(
            model=text("model"), family=text("family"), score_function=text("score_function"),
            p=None if "p" in d and d["p"] is None else number("p", float, float("nan")),
            experts=experts, num_experts=num_experts,
            top_k=number("top_k", int, 0), normalized=flag("normalized"),
            max_experts_per_layer=number("max_experts_per_layer", int, None),
            train_shared_experts=flag("train_shared_experts", "shared_experts"),
            train_non_expert_modules=flag("train_non_expert_modules", "non_expert_modules"),
            scores=score_rows, warnings=list(warnings), top_share=number("top_share", float, None),
            combine=combine, sources=list(sources), selections=selections,
        )


def _expert_ids(mapping: dict, path: str | Path, what: str, num_experts: int) -> dict[int, list[int]]:
    """Layer -> expert ids of a JSON mapping: ids integers, in range (when ``num_experts`` is known), unique."""
    experts: dict[int, list[int]] = {}
    for layer, key, ids in _layer_items(mapping, path, what):
        if not isinstance(ids, list):
            raise MoecraftError(f"{path}: layer {key}: expected a list of expert ids, got {ids!r}")
        not_int = [i for i in ids if isinstance(i, bool) or not isinstance(i, int)]
        if not_int:
            raise MoecraftError(f"{path}: layer {key}: expert ids must be integers, got {not_int}")
        bad = [i for i in ids if i < 0 or (num_experts and i >= num_experts)]
        if bad:
            valid = f"[0, {num_experts})" if num_experts else "(ids start at 0)"
            raise MoecraftError(f"{path}: layer {key}: expert ids {bad} out of range {valid}")
        if len(set(ids)) != len(ids):
            raise MoecraftError(f"{path}: layer {key}: repeated expert ids {ids}")
        experts[layer] = list(ids)
    return experts


_LAYER_KEY = re.compile(r"[0-9]+")  # ASCII digits only: not '-1', ' 3', '1e1', '３' or '²'


def _layer_items(mapping: dict, path: str | Path, what: str) -> list[tuple[int, str, object]]:
    """``(layer, key, value)`` of a JSON mapping keyed by decoder-layer index; keys must be plain decimal
    and name each layer once ('3' and '03' are the same layer)."""
    seen: dict[int, str] = {}
    items = []
    for key, value in mapping.items():
        if not _LAYER_KEY.fullmatch(key):
            raise MoecraftError(f"{path}: layer index {key!r} is not a non-negative integer (plain decimal "
                                f"digits, in '{what}')")
        layer = int(key)
        if layer in seen:
            raise MoecraftError(f"{path}: layer keys {seen[layer]!r} and {key!r} in '{what}' name the same layer")
        seen[layer] = key
        items.append((layer, key, value))
    return items


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def official_flags(shared_experts: bool, non_expert_modules: bool) -> dict:
    """The official ESFT names of moecraft's ``train_shared_experts`` / ``train_non_expert_modules``."""
    return {"shared_experts": bool(shared_experts), "non_expert_modules": bool(non_expert_modules)}


def select_experts(cfg: SelectConfig, scores=None) -> ExpertConfig:
    """``moecraft select``: eq. 8 (or the top share) in every layer of every scores file, the files' sets
    combined per layer; writes ``cfg.out`` (unless empty) and returns the config.

    ``scores``: statistics already in memory (one :class:`ExpertScores` or a list of them) instead of the
    files of ``cfg.scores``."""
    from contextlib import nullcontext

    inputs = list(cfg.scores) if scores is None else []
    claim = output_file(cfg.out, inputs=inputs, overwrite=cfg.overwrite) if cfg.out else nullcontext()
    with claim:  # checked before any work; the lock is held until the file is written
        return _select(cfg, scores)


def _named_scores(cfg: SelectConfig, scores) -> list[tuple[str, object]]:
    """(name, ExpertScores) of every input: the files of ``cfg.scores`` or the objects given."""
    from moecraft.esft.stats import ExpertScores

    if scores is not None:
        given = [scores] if isinstance(scores, ExpertScores) else list(scores)
        if not given:
            raise MoecraftError("no scores to select from")
        return [(f"scores[{i}]", s) for i, s in enumerate(given)] if len(given) > 1 else [("scores", given[0])]
    seen: dict[Path, str] = {}
    for path in cfg.scores:
        real = Path(path).resolve()
        if real in seen:
            raise MoecraftError(f"scores file {path} given more than once (as {seen[real]} too)")
        seen[real] = str(path)
    return [(str(path), ExpertScores.load(path)) for path in cfg.scores]


def check_compatible(named: Sequence[tuple[str, object]]) -> list[str]:
    """Several scores files must describe one model: same family, MoE layers, routed experts and top-k,
    else a MoecraftError naming the file that disagrees. A different model name (a hub id and a local copy
    of it) is allowed, with a warning; the scores files record no weights fingerprint."""
    first_name, first = named[0]
    warnings = []
    for name, other in named[1:]:
        for what, a, b in (("family", first.family, other.family), ("routed experts per layer", first.num_experts,
                           other.num_experts), ("MoE layers", first.layers, other.layers), ("top_k", first.top_k,
                           other.top_k)):
            if a != b:
                raise MoecraftError(f"{name}: {what} {b!r}, but {a!r} in {first_name}; scores files to combine "
                                    "must come from one model")
        if other.model != first.model:
            warnings.append(f"{name} scored model '{other.model}', {first_name} scored '{first.model}' (same "
                            "family, layers and experts: combined)")
    return warnings


def _select_one(cfg: SelectConfig, scores, p: float | None, name: str | None) -> tuple[dict, list[str]]:
    """One scores file: layer -> selected ids (best first), and warnings (prefixed by ``name``)."""
    table = scores.scores(cfg.score)
    experts, warnings = {}, []
    for row, layer in enumerate(scores.layers):
        if p is None:
            experts[layer] = select_top_share(table[row], cfg.top_share, cfg.max_experts)
            continue
        experts[layer] = select_layer(table[row], p, cfg.normalize, cfg.max_experts)
        total = float(table[row].sum())
        if not cfg.normalize and total < p - _EPS:
            warnings.append(
                f"{name + ': ' if name else ''}layer {layer}: total {cfg.score} score {total:.4f} < p={p}; all "
                "experts selected (use --normalize to make p a share of the layer's mass)"
            )
    return experts, warnings


def combine_sets(selections: Sequence[list[int]], how: str, scores: list[float]) -> list[int]:
    """Union or intersection of one layer's expert sets, best first by ``scores`` (ties: lower id first)."""
    sets = [set(ids) for ids in selections]
    kept = set.union(*sets) if how == "union" else set.intersection(*sets)
    return sorted(kept, key=lambda i: (-scores[i], i))


def _select(cfg: SelectConfig, scores) -> ExpertConfig:
    named = _named_scores(cfg, scores)
    warnings = check_compatible(named)
    p = None if cfg.top_share is not None else check_p(cfg.p if cfg.p is not None else DEFAULT_P[cfg.score])
    several = len(named) > 1
    selections = {}
    for name, sc in named:
        selections[name], more = _select_one(cfg, sc, p, name if several else None)
        warnings += more
    first = named[0][1]
    tables = [sc.scores(cfg.score) for _, sc in named]
    mean = sum(tables) / len(tables) if several else tables[0]
    kept = {layer: mean[row].tolist() for row, layer in enumerate(first.layers)}
    if several:
        experts = {layer: combine_sets([sel[layer] for sel in selections.values()], cfg.combine, kept[layer])
                   for layer in first.layers}
        if not any(experts.values()):
            raise MoecraftError(f"the expert sets of {', '.join(selections)} have no expert in common in any layer "
                                "(--combine intersection): nothing to train; use --combine union or a larger "
                                f"{'--top-share' if p is None else '--p'}")
    else:
        experts = selections[named[0][0]]
    result = ExpertConfig(
        model=first.model, family=first.family, score_function=cfg.score, p=p, experts=experts,
        num_experts=first.num_experts, top_k=first.top_k, normalized=cfg.normalize,
        max_experts_per_layer=cfg.max_experts, train_shared_experts=cfg.train_shared_experts,
        train_non_expert_modules=cfg.train_non_expert_modules, scores=kept, warnings=warnings,
        top_share=cfg.top_share, combine=cfg.combine if several else None,
        sources=[str(x) for x in cfg.scores] if scores is None else [],
        selections=selections if several else {},
    )
    if cfg.out:
        result.save(cfg.out)
    return result


def _rule(cfg: ExpertConfig) -> str:
    if cfg.top_share is not None:
        n = top_share_count(cfg.top_share, cfg.num_experts, cfg.max_experts_per_layer)
        return f"{cfg.score_function} score, top share {cfg.top_share} ({n} of {cfg.num_experts} experts per layer)"
    return f"{cfg.score_function} score, p={cfg.p}{' (normalised)' if cfg.normalized else ''}"


def summary_table(cfg: ExpertConfig, show: int = 8) -> str:
    """A short per-layer table: how many experts were selected, the score mass they hold, the best ones."""
    head = f"{'layer':>5}  {'selected':>8}  {'mass':>6}  experts (best first)"
    title = _rule(cfg)
    if cfg.selections:
        title += f"; {cfg.combine} of {len(cfg.selections)} scores files (mass and order: their mean score)"
    lines = [title, head]
    for layer, ids in cfg.experts.items():
        shown = ", ".join(map(str, ids[:show])) + (", ..." if len(ids) > show else "")
        lines.append(f"{layer:>5}  {len(ids):>4}/{cfg.num_experts:<3}  {cfg.selected_mass(layer):6.3f}  {shown}")
    lines.append(f"selected {cfg.selected_fraction:.1%} of routed-expert parameters")
    lines += [f"warning: {w}" for w in cfg.warnings]
    return "\n".join(lines)


def overlap_table(cfg: ExpertConfig) -> str:
    """Per layer, the sizes of each scores file's expert set, of their intersection and union, and the
    Jaccard index |intersection| / |union|; says which layers the combination leaves empty."""
    names = list(cfg.selections)
    lines = [f"expert sets per scores file ({cfg.combine} kept):"]
    lines += [f"  [{i}] {name}" for i, name in enumerate(names, 1)]
    lines.append(f"{'layer':>5}  " + "  ".join(f"{f'[{i}]':>4}" for i in range(1, len(names) + 1))
                 + f"  {'inter':>5}  {'union':>5}  {'jaccard':>7}")
    for layer, ids in cfg.experts.items():
        sets = [set(cfg.selections[name].get(layer, [])) for name in names]
        inter, union = set.intersection(*sets), set.union(*sets)
        jaccard = len(inter) / len(union) if union else float("nan")
        line = (f"{layer:>5}  " + "  ".join(f"{len(x):>4}" for x in sets)
                + f"  {len(inter):>5}  {len(union):>5}  {jaccard:7.3f}")
        if not ids:
            line += "  empty: this layer trains nothing"
        lines.append(line)
    return "\n".join(lines)
