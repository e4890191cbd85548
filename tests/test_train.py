"""Training loop: ESFT changes only the selected experts, optimiser holds only them, resume, FFT/LoRA."""

import json

import pytest
import torch

from moecraft.cli import main
from moecraft.errors import MoecraftError
from moecraft.esft.sparse import remove_sparse_experts
from moecraft.families import moe_layers
from moecraft.models import tiny_model
from moecraft.train import TrainConfig, train
from moecraft.train.loop import lr_factor

SELECTION = {"deepseek_v2": {"1": [3, 7], "2": [0, 5, 9]}, "qwen3_moe": {"0": [1], "1": [2, 6]},
             "mixtral": {"1": [0, 4]}}


def _expert_config(tmp_path, kind):
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps({"format": "moecraft.expert_config/1", "family": kind, "experts": SELECTION[kind]}))
    return str(path)


def _cfg(tmp_path, kind, method="esft", **kw):
    base = dict(model=f"tiny:{kind}", data="builtin:intent", out=str(tmp_path / f"run_{kind}_{method}"),
                method=method, experts=_expert_config(tmp_path, kind), seq_len=128, max_steps=2,
                eval_sequences=2, lr=1e-3, progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("kind", ["deepseek_v2", "qwen3_moe", "mixtral"])
def test_esft_changes_only_selected_experts(tmp_path, kind):
    summary = train(_cfg(tmp_path, kind))
    trained = remove_sparse_experts(summary["model"])
    base = tiny_model(kind)
    sel = {int(k): v for k, v in SELECTION[kind].items()}
    expert_tensors, n_selected = {}, 0
    for layer in moe_layers(base):
        for name, p in layer.experts.named_parameters(recurse=False):
            expert_tensors[f"{layer.block_path}.experts.{name}"] = (layer.index, p.shape[0])
            if layer.index in sel:
                n_selected += p[sel[layer.index]].numel()
    sd, sd_ref = trained.state_dict(), base.state_dict()
    assert sd.keys() == sd_ref.keys()
    for key, ref in sd_ref.items():
        if key in expert_tensors and expert_tensors[key][0] in sel:
            rows = torch.zeros(ref.shape[0], dtype=torch.bool)
            rows[sel[expert_tensors[key][0]]] = True
            assert torch.equal(sd[key][~rows], ref[~rows]), key
            assert not torch.equal(sd[key][rows], ref[rows]), key
        else:
            assert torch.equal(sd[key], ref), key  # everything else bit-identical
    assert summary["optimizer_parameters"] == n_selected
    assert summary["artifact_bytes"] < summary["base_bytes"] / 5
    out = tmp_path / f"run_{kind}_esft"
    for f in ("artifact.json", "trained.safetensors", "expert_config.json", "train_config.yaml", "run_info.json"):
        assert (out / f).is_file(), f
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2] and lines[-1]["final"]


def test_esft_shared_and_non_expert_flags(tmp_path):
    s = train(_cfg(tmp_path, "deepseek_v2", train_shared_experts=True, max_steps=1))
    shared = sum(p.numel() for layer in moe_layers(tiny_model("deepseek_v2")) for _, m in layer.shared
                 for p in m.parameters())
    assert s["optimizer_parameters"] == 5 * (64 * 64 + 64 * 32) + shared
    s2 = train(_cfg(tmp_path, "deepseek_v2", train_non_expert_modules=True, max_steps=1, out=str(tmp_path / "ne")))
    total = sum(p.numel() for p in tiny_model("deepseek_v2").parameters())
    routed = sum(layer.experts.gate_up_proj.numel() + layer.experts.down_proj.numel()
                 for layer in moe_layers(tiny_model("deepseek_v2")))
    assert s2["optimizer_parameters"] == total - routed - shared + 5 * (64 * 64 + 64 * 32)


def test_resume_matches_uninterrupted_run(tmp_path):
    full = train(_cfg(tmp_path, "deepseek_v2", max_steps=4, out=str(tmp_path / "full"), warmup_steps=1))
    cfg = _cfg(tmp_path, "deepseek_v2", max_steps=4, out=str(tmp_path / "killed"), save_every=2, warmup_steps=1)
    stopped = train(cfg, stop_after=3)  # "killed" after step 3; last checkpoint is step 2
    assert stopped["stopped"] and (tmp_path / "killed" / "checkpoint").is_dir()
    cfg.resume = True
    resumed = train(cfg)
    a = remove_sparse_experts(full["model"]).state_dict()
    b = remove_sparse_experts(resumed["model"]).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-7)
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], abs=1e-6)
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4]  # metrics past the checkpoint were dropped and redone once


@pytest.mark.parametrize("method", ["fft", "lora"])
def test_baselines_run_and_save(tmp_path, method):
    s = train(_cfg(tmp_path, "qwen3_moe", method=method, max_steps=1))
    out = tmp_path / f"run_qwen3_moe_{method}"
    assert json.loads((out / "artifact.json").read_text())["method"] == method
    total = sum(p.numel() for p in tiny_model("qwen3_moe").parameters())
    if method == "fft":
        assert s["optimizer_parameters"] == total and (out / "trained.safetensors").is_file()
    else:
        assert 0 < s["optimizer_parameters"] < total / 2 and (out / "adapter").is_dir()


def test_schedule():
    cfg = TrainConfig(model="m", data="d", out="o", max_steps=10, warmup_steps=2, schedule="cosine")
    assert [lr_factor(s, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, cfg) == 1.0 and lr_factor(10, cfg) == pytest.approx(0.0)
    assert lr_factor(6, cfg) == pytest.approx(0.5)


def test_cli_train_and_errors(tmp_path, capsys):
    ec = _expert_config(tmp_path, "deepseek_v2")
    rc = main(["train", "--model", "tiny:deepseek_v2", "--data", "builtin:arithmetic", "--experts", ec,
               "--out", str(tmp_path / "cli"), "--seq-len", "128", "--max-steps", "1", "--eval-sequences", "1",
               "--progress", "false"])
    assert rc == 0 and "artifact" in capsys.readouterr().out
    rc = main(["train", "--model", "tiny:mixtral", "--data", "builtin:intent", "--experts", ec,
               "--out", str(tmp_path / "bad"), "--max-steps", "1"])
    assert rc == 2 and "family 'deepseek_v2'" in capsys.readouterr().err
    rc = main(["train", "--model", "tiny:mixtral", "--data", "builtin:intent", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--experts" in capsys.readouterr().err


def test_bf16_esft_at_the_paper_lr_updates_through_fp32_masters(tmp_path):
    """ESFT's lr 1e-5 on bf16 experts: with master weights (the default) the experts move; without, the
    updates round away (and a warning says so)."""

    def moved(**kw):
        cfg = _cfg(tmp_path, "qwen3_moe", dtype="bfloat16", lr=1e-5, max_steps=6, schedule="constant", **kw)
        result = train(cfg)
        base = tiny_model("qwen3_moe").to(torch.bfloat16)
        trained = remove_sparse_experts(result["model"])
        changed = total = 0
        for layer, ref in zip(moe_layers(trained), moe_layers(base)):
            for idx in SELECTION["qwen3_moe"].get(str(layer.index), []):
                a, b = layer.experts.gate_up_proj[idx], ref.experts.gate_up_proj[idx]
                changed, total = changed + int((a != b).sum()), total + a.numel()
        return changed / total

    with pytest.warns(UserWarning, match="--master-weights is off"):
        without = moved(out=str(tmp_path / "plain"), master_weights=False)
    with_masters = moved(out=str(tmp_path / "masters"))
    # an Adam step of ~1e-5 rounds away on every bf16 weight above ~0.0025 (spacing 2^-8 of the weight), so
    # in place only the smallest weights move; the masters accumulate the steps until they show
    assert with_masters > 2 * without, (without, with_masters)


def test_bf16_run_with_masters_resumes_exactly(tmp_path):
    common = dict(dtype="bfloat16", lr=1e-4, max_steps=4, save_every=2, deterministic=True)
    full = train(_cfg(tmp_path, "deepseek_v2", out=str(tmp_path / "full"), **common))
    cfg = _cfg(tmp_path, "deepseek_v2", out=str(tmp_path / "killed"), **common)
    train(cfg, stop_after=3)
    cfg.resume = True
    resumed = train(cfg)  # the masters come back from the checkpoint's optimiser state
    a = remove_sparse_experts(full["model"]).state_dict()
    b = remove_sparse_experts(resumed["model"]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_routed_experts_but_shared_experts_trains_only_the_shared_ones(tmp_path):
    # paper Table 3: shared experts (or non-expert modules) alone, no routed expert selected
    path = tmp_path / "none.json"
    path.write_text(json.dumps({"format": "moecraft.expert_config/1", "family": "deepseek_v2", "experts": {}}))
    cfg = _cfg(tmp_path, "deepseek_v2", experts=str(path), train_shared_experts=True)
    before = tiny_model("deepseek_v2").state_dict()
    after = train(cfg)["model"].state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".shared_experts." in k for k in changed)
    cfg.train_shared_experts, cfg.overwrite = False, True
    with pytest.raises(MoecraftError, match="selects no experts at all"):
        train(cfg)
