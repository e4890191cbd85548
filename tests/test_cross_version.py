"""Merged checkpoints that transformers 4.57 reads as transformers 5 does (issue 14, part 1).

A second transformers (4.57.6) is installed by the test into its own folder (``pip install --target``, cached
under ``~/.cache/moecraft-tests``) and runs in a subprocess (tests/transformers4_worker.py). It builds tiny
hub-style bases (4.x config, per-expert weight keys, a 4.x tokenizer; DeepSeek-V2 with YaRN) of every MoE
family; moecraft (transformers 5) trains ESFT on each and merges; transformers 4.57 then loads the merged
folder and must give the logits of the artifact applied in moecraft. Also checked: the merged folder keeps
the base's key names and shapes (only trained experts' tensors differ), its config and tokenizer files are
the base's byte for byte, and a merge of a built-in tiny model (no base files) loads in 4.57 too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moecraft.artifacts import load_artifact
from moecraft.commands.merge import MergeConfig, merge
from moecraft.families import moe_layers
from moecraft.hf_folder import TOKENIZER_FILES, add_legacy_keys, save_model_folder
from moecraft.models import load_model, tiny_model
from moecraft.train import TrainConfig, train

TRANSFORMERS4 = "4.57.6"
WORKER = Path(__file__).with_name("transformers4_worker.py")
FAMILIES = ["deepseek_v2", "deepseek_v3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def transformers4() -> Path:
    """A folder holding transformers 4.57 and its dependencies, installed once per machine."""
    cache = Path(os.environ.get("MOECRAFT_TEST_CACHE", Path.home() / ".cache" / "moecraft-tests"))
    target = cache / f"transformers-{TRANSFORMERS4}"
    if not (target / ".complete").is_file():
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--target", str(target), "--upgrade",
               f"transformers=={TRANSFORMERS4}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            if os.environ.get("CI"):
                pytest.fail(f"could not install transformers {TRANSFORMERS4}: {done.stderr[-2000:]}")
            pytest.skip(f"transformers {TRANSFORMERS4} could not be installed (no PyPI?): {done.stderr[-300:]}")
        (target / ".complete").write_text("ok\n")
    return target


def run4(transformers4: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(transformers4), "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def read4(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def state(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


@pytest.fixture(scope="module")
def merged(transformers4, tmp_path_factory):
    """Per family: base folder, merged folder, moecraft's logits (artifact applied), 4.57's reading of it."""
    root = tmp_path_factory.mktemp("xver")
    run4(transformers4, "bases", str(root / "bases"))
    out = {}
    for family in FAMILIES:
        base = root / "bases" / family
        model, _ = load_model(str(base))
        picks = {str(layer.index): [1, 3] for layer in moe_layers(model)}
        experts = root / f"{family}.experts.json"
        experts.write_text(json.dumps({"family": family, "experts": picks}))
        run = root / "runs" / family
        train(TrainConfig(model=str(base), data="builtin:intent", out=str(run), method="esft", experts=str(experts),
                          seq_len=256, max_steps=1, eval_sequences=1, lr=1e-2, progress=False))
        merge(MergeConfig(artifact=str(run), out=str(root / "merged" / family)))
        applied = load_artifact(load_model(str(base))[0], run)
        out[family] = {"base": base, "merged": root / "merged" / family, "picks": picks, "moecraft": logits(applied)}
    (root / "ids.json").write_text(json.dumps(IDS.tolist()))
    run4(transformers4, "logits", str(root / "ids.json"), str(root), *(str(v["merged"]) for v in out.values()))
    for family, entry in out.items():
        entry["t4"], entry["t4_meta"] = read4(root / f"{family}.safetensors")
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers4_reads_the_merge_as_moecraft_applies_it(merged, family):
    entry = merged[family]
    assert entry["t4_meta"]["transformers"] == TRANSFORMERS4
    torch.testing.assert_close(entry["t4"]["logits"], entry["moecraft"], rtol=1e-4, atol=1e-4)
    # and the merge changed the model: the base alone gives other logits
    assert not torch.allclose(logits(load_model(str(entry["base"]))[0]), entry["moecraft"], atol=1e-4)


def test_deepseek_v2_keeps_yarn_under_transformers4(merged):
    entry = merged["deepseek_v2"]
    assert json.loads(entry["t4_meta"]["rope_scaling"])["type"] == "yarn"
    # YaRN changes the logits of these weights, so matching them above means 4.57 applied it
    assert (entry["t4"]["logits_without_rope_scaling"] - entry["t4"]["logits"]).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_keeps_the_base_layout_and_files(merged, family):
    entry = merged[family]
    base, out = entry["base"], entry["merged"]
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            assert (out / name).read_bytes() == (base / name).read_bytes(), name
    before, after = state(base), state(out)
    assert {k: tuple(v.shape) for k, v in after.items()} == {k: tuple(v.shape) for k, v in before.items()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the merge changed no tensor"
    # per-expert keys of the trained experts, nothing else: "...layers.{i}.<mlp>.experts.{e}.<proj>.weight"
    for key in changed:
        parts = key.split(".")
        i, e = parts[parts.index("layers") + 1], parts[parts.index("experts") + 1]
        assert int(e) in entry["picks"][i], key
    assert entry["t4_meta"]["num_experts"] == str(16 if family.startswith("deepseek") else 8)


def test_tiny_merge_without_base_files_loads_in_transformers4(transformers4, tmp_path):
    """No base folder (``tiny:``): transformers' config gets the 4.x keys, the tokenizer a class 4.x knows."""
    model = tiny_model("qwen3_moe")
    from moecraft.models import byte_tokenizer

    save_model_folder(model, byte_tokenizer(), tmp_path / "qwen3_moe", base="tiny:qwen3_moe")
    config = json.loads((tmp_path / "qwen3_moe" / "config.json").read_text())
    assert config["num_experts"] == 8 and config["torch_dtype"] == "float32"
    (tmp_path / "ids.json").write_text(json.dumps(IDS.tolist()))
    run4(transformers4, "logits", str(tmp_path / "ids.json"), str(tmp_path), str(tmp_path / "qwen3_moe"))
    got, meta = read4(tmp_path / "qwen3_moe.safetensors")
    torch.testing.assert_close(got["logits"], logits(model), rtol=1e-4, atol=1e-4)
    assert meta["num_experts"] == "8"


def test_legacy_keys_sit_beside_the_new_ones():
    v5 = {"model_type": "deepseek_v2", "dtype": "bfloat16",
          "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707}}
    got = add_legacy_keys(v5)
    assert got["torch_dtype"] == "bfloat16" and got["rope_theta"] == 10000.0
    assert got["rope_scaling"] == {"rope_type": "yarn", "type": "yarn", "factor": 40.0, "mscale": 0.707}
    assert got["rope_parameters"] == v5["rope_parameters"]  # 5.x keys untouched
    assert add_legacy_keys({"model_type": "qwen3_moe", "num_local_experts": 128})["num_experts"] == 128
    assert "rope_scaling" not in add_legacy_keys({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})


# Per family: (MoE block, router, checkpoint names of the gate / down / up projections of one expert), as the
# serving engines' loaders expect them. vLLM: vllm/model_executor/layers/fused_moe/layer.py
# (FusedMoE.make_expert_params_mapping: "experts.{expert_id}.{weight_name}." for weight_name in gate, down,
# up) called from vllm/model_executor/models/{mixtral,deepseek_v2,qwen2_moe,qwen3_moe,olmoe}.py with
# w1/w2/w3 for Mixtral and gate_proj/down_proj/up_proj for the others; SGLang's
# python/sglang/srt/layers/moe/fused_moe_triton/layer.py builds the same names.
SERVING_NAMES = {
    "mixtral": ("block_sparse_moe", "gate", ("w1", "w2", "w3")),
    **{f: ("mlp", "gate", ("gate_proj", "down_proj", "up_proj"))
       for f in ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "olmoe")},
}


def expert_params_mapping(gate: str, down: str, up: str, num_experts: int) -> list[tuple[str, int, str]]:
    """(checkpoint name fragment, expert id, shard) for every expert, as the engines' mapping builds them."""
    return [(f"experts.{e}.{name}.", e, shard) for e in range(num_experts)
            for shard, name in (("w1", gate), ("w2", down), ("w3", up))]


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_names_are_those_vllm_and_sglang_load(merged, family):
    block, router, projs = SERVING_NAMES[family]
    keys = set(state(merged[family]["merged"]))
    n_experts = 16 if family.startswith("deepseek") else 8
    mapping = expert_params_mapping(*projs, n_experts)
    for layer in merged[family]["picks"]:
        prefix = f"model.layers.{layer}.{block}."
        assert f"{prefix}{router}.weight" in keys
        routed = {k for k in keys if k.startswith(prefix + "experts.")}
        # every routed-expert weight matches exactly one mapping entry, and every entry finds its weight
        hits = {k: [m for m in mapping if (prefix + m[0]) in k] for k in routed}
        assert all(len(h) == 1 for h in hits.values()), {k: h for k, h in hits.items() if len(h) != 1}
        assert {(prefix + frag + "weight") for frag, _, _ in mapping} == routed


def test_remote_code_and_generation_config_come_from_the_base(tmp_path):
    """A base whose config has ``auto_map`` (DeepSeek's hub checkpoints): its modules travel with the merge."""
    from moecraft.models import byte_tokenizer

    model, base = tiny_model("mixtral"), tmp_path / "base"
    model.save_pretrained(base)
    byte_tokenizer().save_pretrained(base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (base / "config.json").write_text(json.dumps(config, indent=1))
    (base / "configuration_x.py").write_text("# the base's configuration module\n")
    (base / "modeling_x.py").write_text("from .configuration_x import *  # noqa\n")
    (base / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.3}\n')
    copied = save_model_folder(model, byte_tokenizer(), tmp_path / "out", base=str(base))
    for name in ("config.json", "configuration_x.py", "modeling_x.py", "generation_config.json",
                 "tokenizer_config.json", "tokenizer.json"):
        assert name in copied and (tmp_path / "out" / name).read_bytes() == (base / name).read_bytes(), name


def test_pesc_mixtral_export_loads_in_transformers4(transformers4, tmp_path):
    """PESC's LoRA kind on a Llama base exports to a new Mixtral config: 4.57 reads it as 5.x does."""
    from moecraft.models import byte_tokenizer
    from moecraft.pesc import CraftConfig, craft_model, export_model

    model = tiny_model("llama")
    craft_model(model, CraftConfig(expert="lora", num_experts=4, top_k=2, adapter_dim=4, seed=0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as if trained: non-zero experts and routers
        for name, p in model.named_parameters():
            if ".experts." in name or ".router." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    export_model(model, tmp_path / "pesc", tokenizer=byte_tokenizer())
    config = json.loads((tmp_path / "pesc" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4 and "rope_theta" in config
    (tmp_path / "ids.json").write_text(json.dumps(IDS.tolist()))
    run4(transformers4, "logits", str(tmp_path / "ids.json"), str(tmp_path), str(tmp_path / "pesc"))
    got, meta = read4(tmp_path / "pesc.safetensors")
    torch.testing.assert_close(got["logits"], logits(model), rtol=1e-4, atol=1e-4)
    assert meta["num_experts"] == "4" and json.loads(meta["encoded"]) == byte_tokenizer()("User: hello 世界")["input_ids"]
