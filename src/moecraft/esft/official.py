"""Interop with the official ESFT code (github.com/deepseek-ai/ESFT): its expert configs and adapter folders.

The official scripts run DeepSeek-V2 with its remote code (``modeling_deepseek.py``), where every routed
expert is its own ``DeepseekV2MLP``. Their ``esft.add_adapter(model, adapter_dir)`` reads
``adapter_dir/expert_cfg.json`` (``experts``: decoder-layer index as a string -> trained expert ids, one entry
for *every* MoE layer; ``shared_experts``; ``non_expert_modules``), turns every parameter it will not train
into a non-persistent buffer, merges all ``*.safetensors`` of the folder into one state dict and loads it with
``strict=True``. So an adapter folder must hold exactly the trained parameters, under the remote code's names::

    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight    selected routed experts
    model.layers.{i}.mlp.shared_experts.{gate,up,down}_proj.weight  when shared_experts
    every other parameter (attention, norms, routers, embeddings, lm_head, dense MLPs)  when non_expert_modules

(their older checkpoints drop the leading ``model.``). transformers 5 fuses a layer's experts instead:
``experts.gate_up_proj`` [E, 2I, H] (gate rows first, then up) and ``experts.down_proj`` [E, H, I]; every other
DeepSeek-V2 parameter has the same name in both. A moecraft ESFT artifact holds the selected rows of the fused
tensors (``expert_rows`` metadata), so exporting splits them and importing stacks them back, bit for bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moecraft.errors import MoecraftError

OFFICIAL_CONFIG = "expert_cfg.json"  # the name add_adapter reads
ADAPTER_FILE = "model.safetensors"  # the name their train.py (Trainer.save_model) writes; any *.safetensors loads
FAMILY = "deepseek_v2"  # their to_esft only converts remote-code DeepseekV2MoE layers
PROJS = ("gate", "up", "down")

_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_SHARED = re.compile(r"^model\.layers\.\d+\.mlp\.shared_experts\.")


def expert_key(layer: int, expert: int, proj: str) -> str:
    """The remote-code (and hub checkpoint) name of one routed expert's weight."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.weight"


def official_expert_config(experts: dict[int, list[int]], moe_layers: list[int], shared_experts: bool,
                           non_expert_modules: bool) -> dict:
    """``expert_cfg.json`` content: every MoE layer listed (their loader indexes each one), ids as given."""
    return {"experts": {str(i): [int(e) for e in experts.get(i, [])] for i in moe_layers},
            "shared_experts": bool(shared_experts), "non_expert_modules": bool(non_expert_modules)}


# ----------------------------------------------------------------------------- fused rows <-> per-expert keys
def split_fused(tensors: dict[str, torch.Tensor], rows: dict[str, list[int]], where: str) -> dict[str, torch.Tensor]:
    """moecraft artifact tensors -> the official per-expert state dict (other tensors keep their names)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name not in rows:
            out[name] = t
            continue
        m = _FUSED.match(name)
        if m is None or t.dim() != 3 or t.shape[0] != len(rows[name]):
            raise MoecraftError(f"{where}: '{name}' {tuple(t.shape)} is not a DeepSeek-V2 fused expert tensor "
                                "with one row per listed expert")
        layer, kind = int(m.group(1)), m.group(2)
        if kind == "gate_up_proj" and t.shape[1] % 2:
            raise MoecraftError(f"{where}: '{name}' has an odd gate_up row count {t.shape[1]}")
        half = t.shape[1] // 2
        for j, e in enumerate(rows[name]):
            if kind == "gate_up_proj":  # transformers chunks the product in two: gate first, then up
                out[expert_key(layer, e, "gate")] = t[j, :half].clone()
                out[expert_key(layer, e, "up")] = t[j, half:].clone()
            else:
                out[expert_key(layer, e, "down")] = t[j].clone()
    return out


def stack_per_expert(state: dict[str, torch.Tensor], where: str
                     ) -> tuple[dict[str, torch.Tensor], dict[str, list[int]], dict[int, list[int]]]:
    """The official per-expert state dict -> fused rows (experts in ascending id order, as moecraft saves them).

    Returns the tensors, their ``expert_rows`` and the experts found per layer. An expert with only some of
    its three weights is an error (the official strict load would fail on it too).
    """
    found: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = _PER_EXPERT.match(name)
        if m is None:
            out[name] = t
        else:
            found.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = t
    experts: dict[int, list[int]] = {}
    for (layer, e), parts in sorted(found.items()):
        missing = [p for p in PROJS if p not in parts]
        if missing:
            raise MoecraftError(f"{where}: layer {layer} expert {e} lacks {[expert_key(layer, e, p) for p in missing]}")
        experts.setdefault(layer, []).append(e)
    rows: dict[str, list[int]] = {}
    for layer, ids in experts.items():
        gate_up = [torch.cat([found[layer, e]["gate"], found[layer, e]["up"]], dim=0) for e in ids]
        down = [found[layer, e]["down"] for e in ids]
        try:
            out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
            out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(down)
        except RuntimeError as exc:
            raise MoecraftError(f"{where}: layer {layer}: experts {ids} have weights of different shapes ({exc})"
                                ) from exc
        rows[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = list(ids)
        rows[f"model.layers.{layer}.mlp.experts.down_proj"] = list(ids)
    return out, rows, experts


def read_adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every ``*.safetensors`` of ``folder`` merged (as the official loader does); their v1 names
    (``layers.*``, relative to the decoder) get the leading ``model.`` their newer loader adds."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MoecraftError(f"{folder}: no *.safetensors adapter weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
                    name = "model." + k if k.startswith("layers.") else k
                    if name in state:
                        raise MoecraftError(f"{folder}: tensor '{name}' is in more than one *.safetensors file")
                    state[name] = fh.get_tensor(k)
        except MoecraftError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
            raise MoecraftError(f"{f}: not a readable safetensors file ({exc})") from exc
    return state


# ----------------------------------------------------------------------------- which parameters are whose
@dataclass
class Layout:
    """The parameter names of a DeepSeek-V2 model, grouped as the official ``to_esft`` groups them."""

    moe_layers: list[int]
    num_experts: int
    shapes: dict[str, tuple[int, ...]]  # transformers-5 name -> shape
    shared: set[str]  # shared-expert parameters of MoE layers
    non_expert: set[str]  # everything that is neither a routed nor a shared expert

    @classmethod
    def of(cls, model: nn.Module) -> Layout:
        from moecraft.families import get_family, moe_layers

        family = get_family(model)
        if family.name != FAMILY:
            raise MoecraftError(f"the official ESFT code loads DeepSeek-V2 only (remote-code DeepseekV2MoE layers); "
                                f"this model is '{family.name}'")
        layers = moe_layers(model)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        routed = {f"{m.block_path}.{family.experts_attr}" for m in layers}
        shared = {f"{m.block_path}.{attr}.{n}" for m in layers for attr, mod in m.shared
                  for n, _ in mod.named_parameters()}
        non_expert = {n for n in shapes if n not in shared and not any(n.startswith(r + ".") for r in routed)}
        return cls([m.index for m in layers], layers[0].experts.num_experts, shapes, shared, non_expert)

    def check_trained(self, names: set[str], shared_flag: bool, non_expert_flag: bool, where: str) -> None:
        """``names`` (non-routed tensors) must be exactly the shared / non-expert sets the flags name."""
        unknown = sorted(names - self.shared - self.non_expert)
        if unknown:
            raise MoecraftError(f"{where}: tensors {unknown[:4]} are not parameters of this DeepSeek-V2 model")
        for flag, group, key in ((shared_flag, self.shared, "shared_experts"),
                                 (non_expert_flag, self.non_expert, "non_expert_modules")):
            held = names & group
            if flag and held != group:
                raise MoecraftError(f"{where}: {key} is true but {len(group - held)} of its {len(group)} tensors "
                                    f"are missing (e.g. {sorted(group - held)[0]}); the official loader needs all")
            if not flag and held:
                raise MoecraftError(f"{where}: {key} is false but the weights hold {len(held)} such tensors "
                                    f"(e.g. {sorted(held)[0]})")


def check_shapes(layout: Layout, tensors: dict[str, torch.Tensor], rows: dict[str, list[int]], where: str) -> None:
    for name, t in tensors.items():
        base = layout.shapes.get(name)
        want = base[1:] if name in rows and base is not None else base
        got = tuple(t.shape[1:]) if name in rows else tuple(t.shape)
        if want is None or got != want:
            raise MoecraftError(f"{where}: '{name}' of shape {tuple(t.shape)} does not fit the base "
                                f"({'no such parameter' if base is None else f'shape {base}'}; wrong base?)")
        bad = [e for e in rows.get(name, []) if not 0 <= e < layout.num_experts]
        if bad:
            raise MoecraftError(f"{where}: '{name}': expert ids {bad} out of range [0, {layout.num_experts})")


def meta_model(base: str) -> nn.Module:
    """The base's module tree on the meta device (names and shapes, no weights): export needs no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moecraft.models import TINY_PREFIX, byte_tokenizer, tiny_config

    if base.startswith(TINY_PREFIX):
        config = tiny_config(base[len(TINY_PREFIX):], vocab_size=len(byte_tokenizer()))
    else:
        try:
            config = AutoConfig.from_pretrained(base)
        except (OSError, ValueError) as exc:
            raise MoecraftError(f"could not read the config of base model '{base}' ({str(exc).splitlines()[0]})"
                                ) from exc
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# ----------------------------------------------------------------------------- export / import
def export_esft(artifact: str | Path, out: str | Path, base: str | None = None) -> Path:
    """A moecraft ESFT training output -> a folder the official ``add_adapter`` / eval scripts load."""
    from moecraft.artifacts import TENSORS, read_manifest, read_tensors
    from moecraft.files import check_output_folder, write_json

    artifact, out = Path(artifact), Path(out)
    manifest = read_manifest(artifact)
    if manifest["method"] != "esft":
        raise MoecraftError(f"{artifact}: --format esft exports ESFT training outputs; this one was trained with "
                            f"--method {manifest['method']}")
    check_output_folder(out, "--output")
    stale = sorted(p.name for p in out.glob("*.safetensors")) if out.is_dir() else []
    if stale:  # the official loader merges every *.safetensors of the folder: an old file would load too
        raise MoecraftError(f"--output {out} already holds {stale}; the official loader would read them too: "
                            "give an empty or new folder")
    model_type = manifest["fingerprint"].get("model_type")
    if model_type and model_type != FAMILY:
        raise MoecraftError(f"{artifact}: the official ESFT code loads DeepSeek-V2 only; this artifact's base is "
                            f"'{model_type}'")
    layout = Layout.of(meta_model(base or manifest["base"]))
    tensors, rows = read_tensors(artifact / TENSORS)
    where = str(artifact / TENSORS)
    check_shapes(layout, tensors, rows, where)
    state = split_fused(tensors, rows, where)  # also checks that every row-sliced tensor is a fused expert tensor
    experts: dict[int, list[int]] = {}
    fused: dict[int, int] = {}
    for name, ids in rows.items():
        layer = int(_FUSED.match(name).group(1))
        fused[layer] = fused.get(layer, 0) + 1
        if experts.setdefault(layer, list(ids)) != list(ids):
            raise MoecraftError(f"{where}: layer {layer}: gate_up_proj and down_proj hold different experts")
    half = sorted(layer for layer, n in fused.items() if n != 2)
    if half:  # an expert without its down (or gate/up) weights would fail the official strict load
        raise MoecraftError(f"{where}: layers {half}: only one of gate_up_proj / down_proj holds trained rows")
    others = {n for n in tensors if n not in rows}
    shared, non_expert = bool(others & layout.shared), bool(others & layout.non_expert)
    layout.check_trained(others, shared, non_expert, where)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / ADAPTER_FILE), metadata={"format": "pt"})
    write_json(out / OFFICIAL_CONFIG, official_expert_config(experts, layout.moe_layers, shared, non_expert))
    return out


def import_esft(adapter: str | Path, base: str, out: str | Path, expert_config: str | Path | None = None,
                dtype: str = "auto") -> Path:
    """An official ESFT adapter folder (+ its base) -> a moecraft ESFT training output (``artifact.json`` etc.)."""
    from moecraft.artifacts import TENSORS, base_fingerprint, model_bytes, save_tensors, write_manifest
    from moecraft.esft.selection import FORMAT, ExpertConfig
    from moecraft.files import check_output_folder, write_json
    from moecraft.methods.esft import EXPERT_CONFIG, check_expert_config
    from moecraft.models import load_model

    adapter, out = Path(adapter), Path(out)
    if not adapter.is_dir():
        raise MoecraftError(f"adapter folder not found: {adapter}")
    check_output_folder(out, "--out")
    cfg_path = Path(expert_config) if expert_config else adapter / OFFICIAL_CONFIG
    if not cfg_path.is_file():
        raise MoecraftError(f"expert config not found: {cfg_path} (the official train.py does not copy it into its "
                            "output: pass --expert-config with the file it trained from)")
    ec = ExpertConfig.load(cfg_path)  # ids, layers, and official/moecraft key agreement
    state = read_adapter_tensors(adapter)
    model, _ = load_model(base, dtype=dtype)
    layout = Layout.of(model)
    shared, non_expert = ec.train_shared_experts, ec.train_non_expert_modules
    check_expert_config(ec, model, str(cfg_path), others_trained=True)
    missing_layers = [i for i in layout.moe_layers if i not in ec.experts]
    if missing_layers:  # their to_esft indexes every MoE layer
        raise MoecraftError(f"{cfg_path}: MoE layers {missing_layers} are not listed (the official loader needs every "
                            "MoE layer, [] for none)")
    where = str(adapter)
    tensors, rows, found = stack_per_expert(state, where)
    for layer in layout.moe_layers:
        want, got = set(ec.experts.get(layer, [])), set(found.get(layer, []))
        if want != got:
            raise MoecraftError(f"{where}: layer {layer}: the weights hold experts {sorted(got)}, {cfg_path.name} "
                                f"lists {sorted(want)}")
    check_shapes(layout, tensors, rows, where)
    layout.check_trained({n for n in tensors if n not in rows}, shared, non_expert, f"{where} ({cfg_path.name})")
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / TENSORS, tensors, rows)
    config = {"format": FORMAT, "model": base, "family": FAMILY, "num_experts": layout.num_experts,
              "top_k": int(getattr(model.config, "num_experts_per_tok", 0) or 0),
              "experts": {str(i): ec.experts[i] for i in layout.moe_layers},
              "train_shared_experts": shared, "train_non_expert_modules": non_expert,
              "shared_experts": shared, "non_expert_modules": non_expert,
              "imported_from": str(adapter)}
    write_json(out / EXPERT_CONFIG, config)
    fingerprint = base_fingerprint(model)
    fingerprint["base_bytes"] = model_bytes(model)
    write_manifest(out, method="esft", base=base, fingerprint=fingerprint,
                   extra={"imported_from": str(adapter.resolve()), "engine": "official ESFT import"})
    return out
