"""ESFT expert selection (ESFT §3.3, eq. 8) and the expert config that training reads.

Per MoE layer l, sort the experts by relevance score R^l_i (average gate score, eq. 5, or token
selection ratio, eq. 6) and keep the smallest top-scoring set E^l_s whose cumulative score reaches the
threshold p in (0, 1]:  sum_{i in E^l_s} R^l_i >= p  (eq. 8).

About p across families: token selection ratios sum to 1 in every layer, but gate scores sum to 1 only
for routers that renormalise the top-k weights (Mixtral, Qwen3-MoE, DeepSeek-V3, GPT-OSS). DeepSeek-V2,
OLMoE and Qwen2-MoE keep raw softmax values, whose top-k mass is well under 1, so the same p selects
relatively more experts there, and a p above a layer's total mass selects every expert. ``normalize``
divides each layer's scores by their sum first, which makes p mean "share of the layer's mass" everywhere.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from moecraft.config import MAY_BE_EMPTY, checked
from moecraft.errors import MoecraftError
from moecraft.files import output_file, read_json, write_json

FORMAT = "moecraft.expert_config/1"
# The paper's thresholds: p = 0.1 for the average gate score, p = 0.2 for the token selection ratio.
DEFAULT_P = {"gate": 0.1, "token": 0.2}
# Cumulative sums of floats may land a hair under an exactly reachable p (e.g. 0.1 + 0.2 < 0.3).
_EPS = 1e-12


@dataclass
@checked(p="(0, 1]", max_experts=">= 1", out=MAY_BE_EMPTY)
class SelectConfig:
    """Options of ``moecraft select``: pick each layer's task experts from router statistics."""

    scores: Path = field(default=Path("scores.json"), metadata={"help": "statistics written by `moecraft score`"})
    score: Literal["gate", "token"] = field(
        default="token", metadata={"help": "gate = average gate score (eq. 5), token = token selection ratio (eq. 6)"})
    p: float | None = field(
        default=None, metadata={"help": "cumulative-score threshold in (0, 1] (eq. 8); default 0.1 gate, 0.2 token"})
    normalize: bool = field(default=False, metadata={"help": "divide each layer's scores by their sum first"})
    max_experts: int | None = field(default=None, metadata={"help": "cap on selected experts per layer"})
    train_shared_experts: bool = field(default=False, metadata={"help": "also train shared experts (paper §6.3)"})
    train_non_expert_modules: bool = field(
        default=False, metadata={"help": "also train attention, norms, embeddings (paper §6.3)"})
    out: Path = field(default=Path("experts.json"), metadata={"help": "where to write the expert config"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out file (once the new one is complete)"})


def check_p(p: float) -> float:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or math.isnan(p) or not 0.0 < p <= 1.0:
        raise MoecraftError(f"threshold p must be in (0, 1], got {p!r}")
    return float(p)


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
    p: float
    experts: dict[int, list[int]]  # decoder-layer index -> routed expert ids (best first)
    num_experts: int
    top_k: int
    normalized: bool = False
    max_experts_per_layer: int | None = None
    train_shared_experts: bool = False
    train_non_expert_modules: bool = False
    scores: dict[int, list[float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

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
        experts: dict[int, list[int]] = {}
        for layer, key, ids in _layer_items(d["experts"], path, "experts"):
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
            p=number("p", float, float("nan")), experts=experts, num_experts=num_experts,
            top_k=number("top_k", int, 0), normalized=flag("normalized"),
            max_experts_per_layer=number("max_experts_per_layer", int, None),
            train_shared_experts=flag("train_shared_experts", "shared_experts"),
            train_non_expert_modules=flag("train_non_expert_modules", "non_expert_modules"),
            scores=score_rows, warnings=list(warnings),
        )


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
    """``moecraft select``: eq. 8 in every layer; writes ``cfg.out`` (unless empty) and returns the config."""
    from contextlib import nullcontext

    inputs = [cfg.scores] if scores is None else []
    claim = output_file(cfg.out, inputs=inputs, overwrite=cfg.overwrite) if cfg.out else nullcontext()
    with claim:  # checked before any work; the lock is held until the file is written
        return _select(cfg, scores)


def _select(cfg: SelectConfig, scores) -> ExpertConfig:
    from moecraft.esft.stats import ExpertScores

    scores = scores if scores is not None else ExpertScores.load(cfg.scores)
    p = check_p(cfg.p if cfg.p is not None else DEFAULT_P[cfg.score])
    table = scores.scores(cfg.score)
    experts, kept, warnings = {}, {}, []
    for row, layer in enumerate(scores.layers):
        experts[layer] = select_layer(table[row], p, cfg.normalize, cfg.max_experts)
        kept[layer] = table[row].tolist()
        total = float(table[row].sum())
        if not cfg.normalize and total < p - _EPS:
            warnings.append(
                f"layer {layer}: total {cfg.score} score {total:.4f} < p={p}; all experts selected "
                "(use --normalize to make p a share of the layer's mass)"
            )
    result = ExpertConfig(
        model=scores.model, family=scores.family, score_function=cfg.score, p=p, experts=experts,
        num_experts=scores.num_experts, top_k=scores.top_k, normalized=cfg.normalize,
        max_experts_per_layer=cfg.max_experts, train_shared_experts=cfg.train_shared_experts,
        train_non_expert_modules=cfg.train_non_expert_modules, scores=kept, warnings=warnings,
    )
    if cfg.out:
        result.save(cfg.out)
    return result


def summary_table(cfg: ExpertConfig, show: int = 8) -> str:
    """A short per-layer table: how many experts were selected, the score mass they hold, the best ones."""
    head = f"{'layer':>5}  {'selected':>8}  {'mass':>6}  experts (best first)"
    lines = [f"{cfg.score_function} score, p={cfg.p}{' (normalised)' if cfg.normalized else ''}", head]
    for layer, ids in cfg.experts.items():
        shown = ", ".join(map(str, ids[:show])) + (", ..." if len(ids) > show else "")
        lines.append(f"{layer:>5}  {len(ids):>4}/{cfg.num_experts:<3}  {cfg.selected_mass(layer):6.3f}  {shown}")
    lines.append(f"selected {cfg.selected_fraction:.1%} of routed-expert parameters")
    lines += [f"warning: {w}" for w in cfg.warnings]
    return "\n".join(lines)
