"""Official ESFT interop: `export --format esft`, `import-esft`, and the official key names in `select` output.

The reference is :func:`official_add_adapter`, written here from reading deepseek-ai/ESFT ``esft.py``
(``add_adapter``, ``to_esft``, ``to_buffer``/``to_param``, ``load_state_dict``; commit 4bfa994) and
``eval_multigpu.py`` (which calls ``add_adapter(model, adapter_dir)`` on the remote-code DeepSeek-V2 model). It
works on the per-expert state dict that transformers writes for the base (``save_original_format=True``: the
hub / remote-code names), not on moecraft's code.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_bad_inputs import fails  # the CLI error contract: exit 2, one line, no traceback
from transformers import AutoModelForCausalLM

from moecraft.artifacts import load_artifact, read_tensors, save_tensors
from moecraft.cli import main
from moecraft.errors import MoecraftError
from moecraft.esft.official import export_esft, import_esft
from moecraft.esft.selection import ExpertConfig, SelectConfig, select_experts
from moecraft.esft.sparse import remove_sparse_experts
from moecraft.models import tiny_model
from moecraft.train import TrainConfig, train

IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(11))
BASE = "tiny:deepseek_v2"


def official_add_adapter(base_state: dict, adapter_dir) -> dict:
    """deepseek-ai/ESFT ``esft.add_adapter`` re-implemented on a remote-code (per-expert) state dict.

    ``load_state_dict``: every ``*.safetensors`` of the folder merged, v1 keys ``layers.*`` get ``model.``.
    ``to_esft``: without ``non_expert_modules`` every parameter becomes a non-persistent buffer (so it leaves
    the state dict); in each MoE layer (remote code ``DeepseekV2MoE``: the layers with routed experts) the
    shared experts become parameters iff ``shared_experts``, and routed expert ``e`` iff ``e in
    experts[str(layer)]`` (a missing layer is a KeyError). ``load_state_dict(strict=True)`` then needs the
    adapter's keys to be exactly the remaining parameters, with the same shapes.
    """
    cfg = json.loads((adapter_dir / "expert_cfg.json").read_text())
    adapter = {}
    for name in os.listdir(adapter_dir):
        if name.endswith(".safetensors"):
            adapter.update(load_file(str(adapter_dir / name)))
    adapter = {("model." + k if k.startswith("layers") else k): v for k, v in adapter.items()}
    moe_layers = sorted({int(k.split(".")[2]) for k in base_state if ".mlp.experts." in k})
    n_experts = len({k.split(".")[5] for k in base_state if k.startswith(f"model.layers.{moe_layers[0]}.mlp.experts.")})
    params = set(base_state) if cfg.get("non_expert_modules", False) else set()
    for layer in moe_layers:
        shared = {k for k in base_state if k.startswith(f"model.layers.{layer}.mlp.shared_experts.")}
        params = params | shared if cfg.get("shared_experts", False) else params - shared
        trainable = cfg["experts"][str(layer)]
        for e in range(n_experts):
            expert = {k for k in base_state if k.startswith(f"model.layers.{layer}.mlp.experts.{e}.")}
            params = params | expert if e in trainable else params - expert
    assert set(adapter) == params, (sorted(set(adapter) - params)[:4], sorted(params - set(adapter))[:4])
    for k, v in adapter.items():
        assert v.shape == base_state[k].shape, k
    return {**base_state, **adapter}


def _state(folder) -> dict:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(str(folder / name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def _per_expert(model, folder) -> dict:
    """The model's weights under the hub/remote-code names (per-expert keys), as transformers writes them."""
    model.save_pretrained(str(folder), save_original_format=True)
    return _state(folder)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    return folder, _per_expert(tiny_model("deepseek_v2"), folder)


@pytest.fixture(scope="module")
def esft_run(tmp_path_factory):
    """A real (short) moecraft ESFT run on selected experts and the shared experts."""
    tmp = tmp_path_factory.mktemp("esft_official")
    ec = tmp / "ec.json"
    ec.write_text(json.dumps({"family": "deepseek_v2", "experts": {"1": [7, 3], "2": [0, 5, 9]},
                              "train_shared_experts": True}))
    s = train(TrainConfig(model=BASE, data="builtin:intent", out=str(tmp / "run"), experts=str(ec),
                          seq_len=128, max_steps=2, eval_sequences=1, lr=1e-3, progress=False))
    return tmp / "run", _logits(remove_sparse_experts(s["model"]))


def test_export_loads_with_the_official_loader_bit_exactly(esft_run, base, tmp_path):
    run, trained = esft_run
    base_dir, base_state = base
    assert main(["export", "--artifact", str(run), "--output", str(tmp_path / "off"), "--format", "esft"]) == 0
    off = tmp_path / "off"
    cfg = json.loads((off / "expert_cfg.json").read_text())
    assert cfg == {"experts": {"1": [3, 7], "2": [0, 5, 9]}, "shared_experts": True, "non_expert_modules": False}
    official = official_add_adapter(base_state, off)
    # moecraft's own reading of the run, written under the same names by transformers
    ours = _per_expert(load_artifact(tiny_model("deepseek_v2"), run), tmp_path / "ours")
    assert set(ours) == set(official)
    for k in ours:
        assert torch.equal(ours[k], official[k]), k
    changed = [k for k in _state(off) if not torch.equal(official[k], base_state[k])]
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in changed and len(changed) > 10  # training moved them
    # the officially loaded weights, read back by transformers, give the trained model's logits
    save_file(official, str(tmp_path / "model.safetensors"))
    folder = tmp_path / "official_model"
    folder.mkdir()
    shutil.copy(base_dir / "config.json", folder / "config.json")
    shutil.move(tmp_path / "model.safetensors", folder / "model.safetensors")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(folder)), trained)


def test_non_expert_training_exports_exactly_the_official_trainable_set(base, tmp_path):
    """moecraft's §6.3 variant trains the same parameters as the official to_esft with non_expert_modules."""
    _, base_state = base
    ec = tmp_path / "ec.json"
    ec.write_text(json.dumps({"experts": {"1": [3, 7], "2": []}, "shared_experts": False,
                              "non_expert_modules": True}))
    s = train(TrainConfig(model=BASE, data="builtin:intent", out=str(tmp_path / "run"), experts=str(ec),
                          seq_len=128, max_steps=1, eval_sequences=1, lr=1e-3, progress=False))
    export_esft(tmp_path / "run", tmp_path / "off")
    official = official_add_adapter(base_state, tmp_path / "off")  # asserts the strict key set
    ours = _per_expert(remove_sparse_experts(s["model"]), tmp_path / "ours")
    assert set(ours) == set(official) and all(torch.equal(ours[k], official[k]) for k in ours)
    assert not torch.equal(official["model.norm.weight"], base_state["model.norm.weight"])


def test_export_import_round_trip_is_bit_exact(esft_run, tmp_path):
    run, trained = esft_run
    export_esft(run, tmp_path / "off")
    assert main(["import-esft", "--adapter", str(tmp_path / "off"), "--base", BASE, "--out", str(tmp_path / "back")]) == 0
    (t0, r0), (t1, r1) = read_tensors(run / "trained.safetensors"), read_tensors(tmp_path / "back/trained.safetensors")
    assert r0 == r1 and set(t0) == set(t1)
    for k in t0:
        assert t0[k].dtype == t1[k].dtype and torch.equal(t0[k], t1[k]), k
    ec = ExpertConfig.load(tmp_path / "back/expert_config.json")
    assert ec.experts == {1: [3, 7], 2: [0, 5, 9]} and ec.train_shared_experts and not ec.train_non_expert_modules
    assert torch.equal(_logits(load_artifact(tiny_model("deepseek_v2"), tmp_path / "back")), trained)


def _official_adapter(folder, base_state, cfg, legacy=False, seed=0) -> dict:
    """An adapter folder as the official train.py leaves it: trained parameters only, perturbed from the base."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir()
    (folder / "expert_cfg.json").write_text(json.dumps(cfg))
    wanted = _trainable(base_state, cfg)
    tensors = {k: base_state[k] + 0.01 * torch.randn(base_state[k].shape, generator=gen) for k in sorted(wanted)}
    if legacy:
        tensors = {k[len("model."):] if k.startswith("model.layers") else k: v for k, v in tensors.items()}
    save_file(tensors, str(folder / "model.safetensors"))
    return tensors


def _trainable(base_state, cfg) -> set:
    moe = sorted({int(k.split(".")[2]) for k in base_state if ".mlp.experts." in k})
    keep = set(base_state) if cfg["non_expert_modules"] else set()
    for layer in moe:
        shared = {k for k in base_state if k.startswith(f"model.layers.{layer}.mlp.shared_experts.")}
        keep = keep | shared if cfg["shared_experts"] else keep - shared
        keep -= {k for k in base_state if k.startswith(f"model.layers.{layer}.mlp.experts.")}
        keep |= {k for k in base_state for e in cfg["experts"][str(layer)]
                 if k.startswith(f"model.layers.{layer}.mlp.experts.{e}.")}
    return keep


@pytest.mark.parametrize("cfg, legacy", [
    ({"experts": {"1": [2, 11], "2": []}, "shared_experts": False, "non_expert_modules": False}, True),
    ({"experts": {"1": [4], "2": [15, 0]}, "shared_experts": False, "non_expert_modules": True}, False),
])
def test_import_of_an_official_adapter_matches_the_official_loader(base, tmp_path, cfg, legacy):
    base_dir, base_state = base
    _official_adapter(tmp_path / "official", base_state, cfg, legacy=legacy)
    official = official_add_adapter(base_state, tmp_path / "official")
    import_esft(tmp_path / "official", BASE, tmp_path / "run")
    ours = _per_expert(load_artifact(tiny_model("deepseek_v2"), tmp_path / "run"), tmp_path / "ours")
    assert set(ours) == set(official)
    for k in ours:
        assert torch.equal(ours[k], official[k]), k
    ec = json.loads((tmp_path / "run/expert_config.json").read_text())
    assert ec["train_non_expert_modules"] == ec["non_expert_modules"] == cfg["non_expert_modules"]
    # and back: the export is the official folder again, key for key and bit for bit
    export_esft(tmp_path / "run", tmp_path / "again")
    assert json.loads((tmp_path / "again/expert_cfg.json").read_text()) == \
        {**cfg, "experts": {k: sorted(v) for k, v in cfg["experts"].items()}}
    first = {("model." + k if k.startswith("layers") else k): v for k, v in _state(tmp_path / "official").items()}
    again = _state(tmp_path / "again")
    assert set(first) == set(again) and all(torch.equal(first[k], again[k]) for k in first)


def test_select_output_carries_the_official_keys(tmp_path):
    from moecraft.esft.stats import ScoreConfig, score_experts

    scores = score_experts(ScoreConfig(model=BASE, data="builtin:intent", seq_len=128, n_sequences=2,
                                       out=str(tmp_path / "scores.json")))
    for shared, non_expert in ((False, False), (True, False), (False, True)):
        out = tmp_path / f"experts_{shared}_{non_expert}.json"
        select_experts(SelectConfig(p=0.2, train_shared_experts=shared, train_non_expert_modules=non_expert,
                                    out=out), scores)
        d = json.loads(out.read_text())
        # the official to_esft reads exactly these: experts[str(layer)] for every MoE layer, and the two flags
        assert d["shared_experts"] is shared and d["non_expert_modules"] is non_expert
        assert d["train_shared_experts"] is shared and d["train_non_expert_modules"] is non_expert
        assert sorted(d["experts"], key=int) == ["1", "2"] and all(isinstance(e, int) for v in d["experts"].values()
                                                                  for e in v)
        ec = ExpertConfig.load(out)
        assert (ec.train_shared_experts, ec.train_non_expert_modules) == (shared, non_expert)


# ----------------------------------------------------------------------------- bad inputs (docs/errors.md §12)


def test_expert_config_with_disagreeing_official_keys(capsys, tmp_path):
    path = tmp_path / "ec.json"
    path.write_text(json.dumps({"experts": {"1": [2]}, "train_shared_experts": True, "shared_experts": False}))
    with pytest.raises(MoecraftError, match=r"'train_shared_experts' is True but 'shared_experts' \(its official "):
        ExpertConfig.load(path)
    path.write_text(json.dumps({"experts": {"1": [2]}, "non_expert_modules": True, "train_non_expert_modules": False}))
    assert fails(capsys, "train", "--method", "esft", "--model", BASE, "--data", "builtin:intent", "--experts", path,
                 "--out", tmp_path / "run") == (
        f"{path}: 'train_non_expert_modules' is False but 'non_expert_modules' (its official ESFT name) is True; "
        "make them agree or drop one")
    assert not (tmp_path / "run").exists()
    path.write_text(json.dumps({"experts": {"1": [2]}, "non_expert_modules": True, "train_non_expert_modules": True}))
    assert ExpertConfig.load(path).train_non_expert_modules  # agreeing keys are fine


def test_export_esft_bad_inputs(capsys, tmp_path, esft_run):
    run, _ = esft_run
    other = tmp_path / "other"
    shutil.copytree(run, other)
    manifest = json.loads((other / "artifact.json").read_text())
    (other / "artifact.json").write_text(json.dumps({**manifest, "method": "fft"}))
    assert fails(capsys, "export", "--artifact", other, "--output", tmp_path / "o", "--format", "esft") == \
        f"{other}: --format esft exports ESFT training outputs; this one was trained with --method fft"
    fp = {**manifest["fingerprint"], "model_type": "qwen3_moe"}
    (other / "artifact.json").write_text(json.dumps({**manifest, "fingerprint": fp}))
    assert fails(capsys, "export", "--artifact", other, "--output", tmp_path / "o", "--format", "esft") == \
        f"{other}: the official ESFT code loads DeepSeek-V2 only; this artifact's base is 'qwen3_moe'"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "old.safetensors").write_bytes(b"")
    assert fails(capsys, "export", "--artifact", run, "--output", busy, "--format", "esft") == \
        f"--out {busy} is not empty; use --overwrite to replace it".replace("--out ", "--output ")
    from moecraft.esft.official import export_esft

    with pytest.raises(MoecraftError) as exc:  # from Python, where no output-folder claim comes first
        export_esft(run, busy)
    assert str(exc.value) == f"--output {busy} already holds ['old.safetensors']; the official loader would read " \
        "them too: give an empty or new folder"
    assert fails(capsys, "export", "--artifact", run, "--output", tmp_path / "o", "--format", "esft",
                 "--model", "tiny:qwen3_moe") == \
        "the official ESFT code loads DeepSeek-V2 only (remote-code DeepseekV2MoE layers); this model is 'qwen3_moe'"
    (other / "artifact.json").write_text(json.dumps(manifest))
    tensors, rows = read_tensors(other / "trained.safetensors")
    del tensors["model.layers.1.mlp.experts.down_proj"], rows["model.layers.1.mlp.experts.down_proj"]
    save_tensors(other / "trained.safetensors", tensors, rows)
    assert fails(capsys, "export", "--artifact", other, "--output", tmp_path / "o", "--format", "esft") == \
        f"{other / 'trained.safetensors'}: layers [1]: only one of gate_up_proj / down_proj holds trained rows"
    assert not (tmp_path / "o").exists()


def test_import_esft_bad_inputs(capsys, tmp_path, base):
    _, base_state = base
    cfg = {"experts": {"1": [2, 11], "2": [5]}, "shared_experts": False, "non_expert_modules": False}
    adapter = tmp_path / "official"
    tensors = _official_adapter(adapter, base_state, cfg)
    out = tmp_path / "run"

    def imp(*extra):
        return fails(capsys, "import-esft", "--adapter", adapter, "--base", BASE, "--out", out, *extra)

    assert fails(capsys, "import-esft", "--adapter", tmp_path / "none", "--base", BASE, "--out", out) == \
        f"adapter folder not found: {tmp_path / 'none'}"
    (adapter / "expert_cfg.json").unlink()
    assert imp().startswith(f"expert config not found: {adapter / 'expert_cfg.json'} (the official train.py")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert imp("--expert-config", tmp_path / "cfg.json", "--base", "tiny:qwen3_moe") == \
        "the official ESFT code loads DeepSeek-V2 only (remote-code DeepseekV2MoE layers); this model is 'qwen3_moe'"
    (adapter / "expert_cfg.json").write_text(json.dumps({**cfg, "experts": {"1": [2, 11], "2": [5, 6]}}))
    assert imp() == f"{adapter}: layer 2: the weights hold experts [5], expert_cfg.json lists [5, 6]"
    (adapter / "expert_cfg.json").write_text(json.dumps({**cfg, "experts": {"1": [2, 11]}}))
    assert imp() == (f"{adapter / 'expert_cfg.json'}: MoE layers [2] are not listed (the official loader needs every "
                     "MoE layer, [] for none)")
    (adapter / "expert_cfg.json").write_text(json.dumps({**cfg, "shared_experts": True}))
    assert imp().startswith(f"{adapter} (expert_cfg.json): shared_experts is true but 6 of its 6 tensors are missing")
    (adapter / "expert_cfg.json").write_text(json.dumps(cfg))
    partial = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.experts.11.up_proj.weight"}
    save_file(partial, str(adapter / "model.safetensors"))
    assert imp() == (f"{adapter}: layer 1 expert 11 lacks ['model.layers.1.mlp.experts.11.up_proj.weight']")
    save_file({**tensors, "model.norm.weight": base_state["model.norm.weight"]}, str(adapter / "model.safetensors"))
    assert imp() == (f"{adapter} (expert_cfg.json): non_expert_modules is false but the weights hold 1 such tensors "
                     "(e.g. model.norm.weight)")
    (adapter / "model.safetensors").unlink()
    assert imp() == f"{adapter}: no *.safetensors adapter weights"
    assert not out.exists()
