"""Router statistics over a sample of task data, and the ESFT expert relevance scores (ESFT §3.3).

For every MoE layer l and routed expert i we accumulate over the sampled tokens t:
  - ``gate_sum[l, i]  = sum_t g^l_{i,t}``  with g the routing weight of eq. 2 (zero unless i is in the
    token's top-k), taken from the live router's output divided by the family's routed scaling factor,
  - ``token_count[l, i] = sum_t 1(g^l_{i,t} > 0)``, i.e. how many tokens pick i in their top-k.
From these (:class:`ExpertScores`):
  - average gate score      (eq. 5)  g^l_i = gate_sum / N,
  - token selection ratio   (eq. 6)  r^l_i = token_count / (N K)  (sums to 1 over i in each layer).
The paper averages per sample then over samples; with its fixed-length packed samples (all of length
``seq_len``) that equals the plain token mean used here.

Statistics come from forward hooks on the router modules (several families never return router
logits), only counting valid tokens (no padding; optionally only response tokens). Accumulators have
a fixed size ``[layers, experts]``, so memory does not grow with the number of tokens.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from moecraft.errors import MoecraftError
from moecraft.esft.config import ScoreConfig
from moecraft.families import get_family, moe_layers, routing_spec
from moecraft.files import output_file, read_json, write_json

FORMAT = "moecraft.scores/1"


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu; a device this machine does not have is a MoecraftError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise MoecraftError(f"device '{device}' is not available here ({torch.cuda.device_count()} CUDA "
                            "device(s)); use --device cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise MoecraftError(f"device '{device}' is not available here; use --device cpu or auto")
    return dev


@dataclass
class ExpertScores:
    """Accumulated router statistics of one model on one task sample; scores derive from them."""

    model: str
    family: str
    layers: list[int]  # decoder-layer index of each row
    num_experts: int
    top_k: int
    n_tokens: int
    gate_sum: torch.Tensor  # float64 [len(layers), num_experts]
    token_count: torch.Tensor  # float64 [len(layers), num_experts] (integer valued)
    meta: dict = field(default_factory=dict)

    def gate_scores(self) -> torch.Tensor:
        """Average gate score g^l_i, ESFT eq. 5: mean over tokens of the routing weight."""
        return self.gate_sum / self.n_tokens

    def token_scores(self) -> torch.Tensor:
        """Token selection ratio r^l_i, ESFT eq. 6: share of the N*K top-k slots that pick expert i."""
        return self.token_count / (self.n_tokens * self.top_k)

    def scores(self, kind: Literal["gate", "token"]) -> torch.Tensor:
        if kind == "gate":
            return self.gate_scores()
        if kind == "token":
            return self.token_scores()
        raise MoecraftError(f"unknown score function '{kind}'; choose 'gate' or 'token'")

    # JSON keeps float64 exactly (shortest repr round-trips), so save -> load is bit-exact.
    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "model": self.model,
            "family": self.family,
            "layers": self.layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "n_tokens": self.n_tokens,
            "gate_sum": self.gate_sum.tolist(),
            "token_count": [[int(c) for c in row] for row in self.token_count.tolist()],
            "gate_scores": self.gate_scores().tolist(),
            "token_scores": self.token_scores().tolist(),
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> ExpertScores:
        d = read_json(path, "scores file")
        if d.get("format") != FORMAT:
            raise MoecraftError(f"{path}: not a moecraft scores file (expected format '{FORMAT}')")
        def count(key: str) -> int:
            value = d[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise MoecraftError(f"{path}: damaged scores file ('{key}' must be a non-negative integer, got "
                                    f"{str(value)[:40]})")
            return value

        try:
            layers, num_experts = d["layers"], count("num_experts")
            if (not isinstance(layers, list) or len(set(map(repr, layers))) != len(layers)
                    or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers)):
                raise MoecraftError(f"{path}: damaged scores file ('layers' must be distinct non-negative integers)")
            if not isinstance(d["family"], str) or not isinstance(d.get("model", ""), str):
                raise MoecraftError(f"{path}: damaged scores file ('family' and 'model' must be strings)")
            gate_sum = torch.tensor(d["gate_sum"], dtype=torch.float64)
            token_count = torch.tensor(d["token_count"], dtype=torch.float64)
            shape = (len(layers), num_experts)
            scores = cls(
                model=d.get("model", ""), family=d["family"], layers=list(layers), num_experts=num_experts,
                top_k=count("top_k"), n_tokens=count("n_tokens"), gate_sum=gate_sum, token_count=token_count,
                meta=d.get("meta", {}),
            )
        except KeyError as exc:
            raise MoecraftError(f"{path}: damaged scores file (no {exc})") from exc
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:  # ragged or non-numeric lists
            if isinstance(exc, MoecraftError):
                raise
            raise MoecraftError(f"{path}: damaged scores file ({exc})") from exc
        if tuple(gate_sum.shape) != shape or tuple(token_count.shape) != shape:
            raise MoecraftError(f"{path}: statistics shape {tuple(gate_sum.shape)} does not match {shape}")
        if scores.n_tokens < 1 or not 1 <= scores.top_k <= max(num_experts, 1):
            raise MoecraftError(f"{path}: damaged scores file (n_tokens must be >= 1 and top_k in [1, num_experts])")
        # statistics are sums of routing weights and counts: finite, non-negative, counts whole
        if (not bool(torch.isfinite(gate_sum).all() and torch.isfinite(token_count).all())
                or bool((gate_sum < 0).any() or (token_count < 0).any())
                or not bool((token_count == token_count.round()).all())):
            raise MoecraftError(f"{path}: damaged scores file (gate_sum and token_count must be finite and "
                                ">= 0, token_count whole numbers)")
        return scores


class RouterStatsCollector:
    """Forward hooks on every router of a model that accumulate eq. 2 gate sums and top-k counts.

    Set :attr:`valid` to a flat bool mask of the tokens of the next forward pass (``batch*seq``) to
    exclude padding or prompt tokens; ``None`` counts all tokens.
    """

    def __init__(self, model: nn.Module):
        self.family = get_family(model)
        self.layers = moe_layers(model)
        self.spec = routing_spec(model)
        n_layers, n_exp = len(self.layers), self.spec.num_experts
        device = next(model.parameters()).device
        self.gate_sum = torch.zeros(n_layers, n_exp, dtype=torch.float64, device=device)
        self.token_count = torch.zeros(n_layers, n_exp, dtype=torch.float64, device=device)
        self.n_tokens = 0
        self.valid: torch.Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> RouterStatsCollector:
        for row, layer in enumerate(self.layers):
            self._handles.append(layer.router.register_forward_hook(self._make_hook(row)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, row: int):
        k, scale = self.spec.top_k, self.spec.scaling_factor

        def hook(_module, _inputs, output):
            _, weights, indices = output  # transformers 5 routers: (logits, top-k weights, top-k indices)
            flat = indices.reshape(-1)
            gates = weights.reshape(-1).to(torch.float64) / scale
            if self.valid is None:
                counted = torch.ones_like(gates)
            else:
                if self.valid.numel() * k != flat.numel():
                    raise RuntimeError(f"token mask has {self.valid.numel()} entries, router saw {flat.numel() // k}")
                # weight by the mask instead of indexing with it: boolean indexing (and bincount) would
                # force a device-to-host sync on every router call
                counted = self.valid.to(torch.float64).repeat_interleave(k)
                gates = gates * counted
            self.gate_sum[row].scatter_add_(0, flat, gates)
            self.token_count[row].scatter_add_(0, flat, counted)

        return hook

    def count_tokens(self, n: int) -> None:
        self.n_tokens += n


@torch.no_grad()
def collect_router_stats(
    model: nn.Module,
    sequences: list[tuple[list[int], list[int]]],
    batch_size: int = 1,
    pad_token_id: int = 0,
    model_name: str = "",
    progress: bool = True,
    process: tuple[int, int] = (0, 1),
) -> ExpertScores:
    """Run ``sequences`` (``(input_ids, count_mask)`` pairs) through ``model`` and accumulate statistics.

    Only the decoder runs (no LM head: the vocabulary projection is not needed for routing).
    ``process`` = (rank, world) of a model sharded over several processes (expert parallelism): each runs
    every world-th batch, all run the same number of forwards (the experts' all-to-all is a collective;
    a process out of batches runs one that counts nothing), and the statistics are summed over processes.
    """
    if not sequences:
        raise MoecraftError("no sequences to score")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rank, world = process
    if world > 1:  # transformers FSDP2-sharded the model from its root: the decoder alone cannot run, so run
        # the whole model with one position of the LM head
        decoder = partial(model, logits_to_keep=1)
    else:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    starts = list(range(0, len(sequences), batch_size))
    per_process = -(-len(starts) // world)
    mine = (starts[rank::world] + [None] * per_process)[:per_process]  # None: a batch that counts nothing
    with RouterStatsCollector(model) as stats:
        for start in tqdm(mine, desc="scoring experts", unit="batch", disable=not progress or rank != 0):
            chunk = sequences[:1] if start is None else sequences[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            count = torch.zeros((len(chunk), width), dtype=torch.bool)
            for r, (ids, mask) in enumerate(chunk):
                input_ids[r, : len(ids)] = torch.tensor(ids)
                attention[r, : len(ids)] = 1
                count[r, : len(ids)] = torch.tensor(mask, dtype=torch.bool)
            if start is None:
                count.zero_()
            stats.valid = count.reshape(-1).to(device)
            decoder(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
            stats.count_tokens(int(count.sum()))
    if world > 1:
        import torch.distributed as dist

        total = torch.tensor(float(stats.n_tokens), dtype=torch.float64, device=device)
        for t in (stats.gate_sum, stats.token_count, total):
            dist.all_reduce(t)
        stats.n_tokens = int(total.item())
    model.train(was_training)
    if stats.n_tokens == 0:
        raise MoecraftError("the sample has no tokens to count")
    return ExpertScores(
        model=model_name or getattr(model.config, "_name_or_path", ""),
        family=stats.family.name,
        layers=[layer.index for layer in stats.layers],
        num_experts=stats.spec.num_experts,
        top_k=stats.spec.top_k,
        n_tokens=stats.n_tokens,
        gate_sum=stats.gate_sum.cpu(),
        token_count=stats.token_count.cpu(),
    )


def score_experts(cfg: ScoreConfig, model: nn.Module | None = None, tokenizer=None) -> ExpertScores:
    """``moecraft score``: sample the task data (§3.3), gather router statistics, save them to ``cfg.out``.

    Pass an already loaded ``model``/``tokenizer`` to skip loading ``cfg.model``.
    """
    import os
    from contextlib import nullcontext

    from moecraft.runinfo import seed_everything

    seed_everything(cfg.seed)
    writer = int(os.environ.get("RANK", 0)) == 0  # one writer under torchrun; the others only check
    claim = (output_file(cfg.out, inputs=[cfg.model, cfg.data], overwrite=cfg.overwrite, lock=writer)
             if cfg.out else nullcontext())
    with claim:  # checked before any work; the lock is held until the file is written
        scores = _score(cfg, model, tokenizer)
    return scores


def _score(cfg: ScoreConfig, model: nn.Module | None, tokenizer) -> ExpertScores:
    from moecraft.data import DataOptions, load_records, sample_sequences
    from moecraft.data.packing import NoResponseTokensError
    from moecraft.data.render import early_tokenizer, template_options
    from moecraft.esft.expert_parallel import expert_parallel_config, is_expert_parallel
    from moecraft.models import check_sequence_length, load_model
    from moecraft.runinfo import run_info

    if cfg.n_sequences < 1 or cfg.seq_len < 2 or cfg.batch_size < 1:
        raise MoecraftError("n_sequences and batch_size must be >= 1 and seq_len >= 2")
    if cfg.expert_parallel < 1:
        raise MoecraftError(f"expert_parallel must be at least 1, got {cfg.expert_parallel}")
    sharding = {}
    if cfg.expert_parallel > 1:
        import os

        sharding["distributed_config"] = expert_parallel_config(cfg.expert_parallel,
                                                                int(os.environ.get("WORLD_SIZE", 1)))
    sequences, options = None, template_options(cfg.chat_template_kwargs)
    if model is None or tokenizer is None:
        # data first: bad records and chat template errors fail before the model loads
        early = early_tokenizer(cfg.model)
        if early is not None:
            records = load_records(cfg.data, limit=cfg.limit, options=DataOptions.from_config(cfg))
            with suppress(NoResponseTokensError):  # reported after the model checks, as before
                sequences = sample_sequences(records, early, cfg.n_sequences, cfg.seq_len, cfg.seed,
                                             cfg.response_only, source=cfg.data, template_kwargs=options)
        # cfg.seed drives the data sample only: the model (tiny:<family> included) is the same for every seed
        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=resolve_device(cfg.device), **sharding)
    process = (0, 1)
    if is_expert_parallel(model):
        import torch.distributed as dist

        process = (dist.get_rank(), dist.get_world_size())
    get_family(model)  # unsupported models fail before any scoring work
    check_sequence_length(model, cfg.seq_len)
    if sequences is None:
        records = load_records(cfg.data, limit=cfg.limit, options=DataOptions.from_config(cfg))
        sequences = sample_sequences(records, tokenizer, cfg.n_sequences, cfg.seq_len, cfg.seed, cfg.response_only,
                                     source=cfg.data, template_kwargs=options)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = collect_router_stats(model, sequences, cfg.batch_size, pad, model_name=cfg.model, process=process)
    scores.meta = {"data": cfg.data, "n_sequences": len(sequences), **run_info(cfg)}
    if cfg.out and process[0] == 0:  # one writer; every process holds the summed statistics
        scores.save(cfg.out)
    return scores
